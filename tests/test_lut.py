"""The lookup-table kernels (pyx/lut.h, qinfer/lut_linear.py).

* Outputs against numpy's dequantize-then-multiply for 2, 3 and 4 bits, groups of 16 to 128
  inputs and full columns, rows in order and act-order g_idx, one row and several: within
  the tables' int8 rounding, bounded here from the layout's definition (each looked-up
  table entry off by at most half its segment's step d = max|T| / 127, T the signed half
  sums of a run of four inputs), and well inside it in practice.
* The AVX-512 loops and the portable loop give the same bits (threads too).
* The planes' bytes against a packer written here from docs/FORMAT.md, section 6.
* Uniform codes as binary coding: the same weights (quant/bcq.from_uniform) run by the
  binary kind give the uniform kind's outputs.
* Bad input: bits, groups, g_idx, shapes: one clear error.
"""
import numpy as np
import pytest

from qinfer import kernels
from qinfer import _lut
from qinfer.errors import QinferError, ShapeError, UnsupportedError
from qinfer.lut_linear import LutLinear
from qinfer.quant.bcq import BcqResult, bcq_quantize, from_uniform

FAST = _lut.cpu_has_avx512() and kernels.cpu_has_avx2()


def segment(group):
    """Inputs per table step, as docs/FORMAT.md says: the group, or the largest of 128, 64, 32
    and 16 dividing it."""
    return next(s for s in (128, 64, 32, 16) if group % s == 0)


def random_uniform(rng, bits, out_f, in_f, group_size, act_order):
    group = in_f if group_size == -1 else group_size
    groups = in_f // group
    codes = rng.integers(0, 2 ** bits, size=(in_f, out_f))
    scales = rng.uniform(0.01, 0.1, size=(groups, out_f)).astype(np.float16).astype(np.float32)
    zeros = rng.integers(0, 2 ** bits, size=(groups, out_f)).astype(np.float32)
    g_idx = rng.permutation(np.arange(in_f) // group).astype(np.int32) if act_order else None
    return codes, scales, zeros, g_idx


def dense_weight(codes, scales, zeros, group, g_idx):
    """float64 [out, in]: s (q - z) of each input row's group."""
    in_f = codes.shape[0]
    gid = np.arange(in_f) // group if g_idx is None else g_idx
    return (scales[gid].astype(np.float64) * (codes - zeros[gid].astype(np.float64))).T


def rounding_bound(x, planes_scale, group, g_idx):
    """Per output row, the most the int8 tables can move it: sum over segments of
    d / 2 x (runs in the segment) x sum_i |a_i|, with d = max|T| / 127 over the segment's
    runs' signed half sums T and a_i the planes' multipliers [groups, bits, out]."""
    in_f = x.shape[-1]
    order = np.arange(in_f) if g_idx is None else np.argsort(g_idx, kind="stable")
    xs = x[order]
    seg = segment(group)
    signs = np.where((np.arange(16)[:, None] >> np.arange(4)) & 1, 0.5, -0.5)       # [idx, t]
    bound = np.zeros(planes_scale.shape[-1])
    for s0 in range(0, in_f, seg):
        runs = xs[s0:s0 + seg].reshape(-1, 4)
        d = np.abs(runs @ signs.T).max() / 127
        bound += d / 2 * len(runs) * np.abs(planes_scale[s0 // group]).sum(axis=0)
    return bound


SHAPES = [(16, 256), (40, 256), (33, 576)]          # one half tile; a partial tile; a 576-input layer


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [16, 32, 64, 128, -1])
@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
def test_uniform_layers_match_the_float_product(bits, group_size, act_order):
    rng = np.random.default_rng(bits * 100 + group_size + act_order)
    for out_f, in_f in SHAPES:
        if group_size > 0 and in_f % group_size:
            continue
        group = in_f if group_size == -1 else group_size
        codes, scales, zeros, g_idx = random_uniform(rng, bits, out_f, in_f, group_size, act_order)
        layer = LutLinear.from_uniform(codes, scales, zeros, bits, group_size, g_idx)
        w = dense_weight(codes, scales, zeros, group, g_idx)
        np.testing.assert_allclose(layer.dequantize(), w, rtol=1e-6, atol=1e-7)
        a = scales[:, None, :] * 2.0 ** np.arange(bits)[None, :, None]        # [groups, bits, out]
        x = rng.standard_normal((3, in_f)).astype(np.float32)
        with kernels.use_path("scalar"):
            portable = layer(x, threads=1)
        for r in range(3):
            want = w @ x[r].astype(np.float64)
            bound = rounding_bound(x[r].astype(np.float64), a, group, g_idx)
            err = np.abs(portable[r] - want)
            assert np.all(err <= bound + 1e-5 * np.abs(w) @ np.abs(x[r])), (out_f, in_f, (err - bound).max())
            assert err.max() < 0.05 * np.abs(want).max()          # the bound is loose; the error is small
        np.testing.assert_array_equal(layer(x[0], threads=1), layer(x[:1], threads=1)[0])
        if FAST:
            for threads in (1, 2):
                np.testing.assert_array_equal(layer(x, threads=threads), portable)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [16, 64, -1])
def test_binary_layers_match_the_float_product(bits, group_size):
    rng = np.random.default_rng(7 + bits)
    out_f, in_f = 40, 256
    group = in_f if group_size == -1 else group_size
    result = bcq_quantize(rng.standard_normal((out_f, in_f)).astype(np.float32), bits, group, rounds=2)
    g_idx = rng.permutation(np.arange(in_f) // group).astype(np.int32)
    # act-order: input k belongs to group g_idx[k]; the result's groups are then those inputs
    order = np.argsort(g_idx, kind="stable")
    scattered = BcqResult(bits, group, np.empty_like(result.planes), result.alphas, result.offsets)
    scattered.planes[:, :, order] = result.planes
    for res, gi in ((result, None), (scattered, g_idx)):
        layer = LutLinear.from_bcq(res, gi)
        alphas = res.alphas.astype(np.float16).astype(np.float64)                  # as held
        gid = np.arange(in_f) // group if gi is None else gi
        w = (res.planes.astype(np.float64) * alphas.transpose(2, 1, 0)[:, :, gid]).sum(axis=0) + \
            res.offsets.astype(np.float64).T[:, gid]
        np.testing.assert_allclose(layer.dequantize(), w, rtol=1e-6, atol=1e-6)
        x = rng.standard_normal((2, in_f)).astype(np.float32)
        with kernels.use_path("scalar"):
            portable = layer(x, threads=1)
        for r in range(2):
            want = w @ x[r].astype(np.float64)
            bound = rounding_bound(x[r].astype(np.float64), 2 * alphas.transpose(0, 2, 1), group, gi)
            assert np.all(np.abs(portable[r] - want) <= bound + 1e-5 * np.abs(w) @ np.abs(x[r]))
        if FAST:
            np.testing.assert_array_equal(layer(x, threads=2), portable)


def test_uniform_codes_run_as_binary_coding():
    """bcq.from_uniform's sign planes and scales (alpha_i = s 2^(i-1), offset s((2^b-1)/2 - z))
    through the binary kind give the uniform kind's outputs."""
    rng = np.random.default_rng(3)
    for bits in (2, 3, 4):
        codes, scales, zeros, _ = random_uniform(rng, bits, 48, 128, 32, False)
        uniform = LutLinear.from_uniform(codes, scales, zeros, bits, 32)
        binary = LutLinear.from_bcq(from_uniform(codes.T, scales, zeros, bits, 32))
        assert (uniform.kind, binary.kind) == ("uniform", "binary")
        np.testing.assert_allclose(binary.dequantize(), uniform.dequantize(), rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(binary.bit_planes(), uniform.bit_planes())
        x = rng.standard_normal((2, 128)).astype(np.float32)
        np.testing.assert_allclose(binary(x), uniform(x), rtol=1e-5, atol=1e-5 * np.abs(uniform(x)).max())


# ------------------------------------------------------------------ the layout
def pack_planes_here(bit_planes):
    """docs/FORMAT.md, section 6: tiles of 32 rows; per tile, block of 16 inputs and plane, 64
    bytes; byte m: low nibble row m // 4, high nibble row 16 + m // 4, the bits of inputs
    4 (m % 4) .. 4 (m % 4) + 3 of the block, the first at bit 0. Rows past the end are 0."""
    bits, out_f, in_f = bit_planes.shape
    tiles = -(-out_f // 32)
    out = bytearray()
    for tile in range(tiles):
        for block in range(in_f // 16):
            for i in range(bits):
                for m in range(64):
                    byte = 0
                    for half in (0, 1):
                        row = 32 * tile + 16 * half + m // 4
                        for t in range(4):
                            k = 16 * block + 4 * (m % 4) + t
                            if row < out_f and bit_planes[i, row, k]:
                                byte |= 1 << (4 * half + t)
                    out.append(byte)
    return np.frombuffer(bytes(out), dtype=np.uint8)


def test_the_planes_are_laid_out_as_documented():
    rng = np.random.default_rng(11)
    codes, scales, zeros, g_idx = random_uniform(rng, 3, 40, 64, 16, True)
    layer = LutLinear.from_uniform(codes, scales, zeros, 3, 16, g_idx)
    kernel_order = codes[np.argsort(g_idx, kind="stable")]
    planes = np.stack([(kernel_order.T >> i) & 1 for i in range(3)])
    np.testing.assert_array_equal(layer._planes, pack_planes_here(planes))
    np.testing.assert_array_equal(layer.bit_planes(), np.stack([(codes.T >> i) & 1 for i in range(3)]))


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("make,error,words", [
    (lambda c, s, z: LutLinear.from_uniform(c, s, z, 5, 32), UnsupportedError, ["2, 3, 4 bits", "5"]),
    (lambda c, s, z: LutLinear.from_uniform(c, s[:, :8].repeat(2, 0)[:4], z[:4], 3, 24), UnsupportedError,
     ["multiple of 16"]),
    (lambda c, s, z: LutLinear.from_uniform(c, s, z, 3, 32, np.zeros(128, np.int32)), ShapeError,
     ["g_idx", "exactly 32"]),
    (lambda c, s, z: LutLinear.from_uniform(c, s[:2], z[:2], 3, 32), ShapeError, ["scales and zeros"]),
    (lambda c, s, z: LutLinear.from_uniform(c[:, 0], s, z, 3, 32), ShapeError, ["2-D"]),
], ids=["bits", "group", "g_idx", "scales", "codes"])
def test_bad_layers_are_refused(make, error, words):
    rng = np.random.default_rng(0)
    codes, scales, zeros, _ = random_uniform(rng, 3, 16, 128, 32, False)
    with pytest.raises(error) as info:
        make(codes, scales, zeros)
    assert isinstance(info.value, QinferError)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_wrong_input_width_is_refused():
    rng = np.random.default_rng(0)
    layer = LutLinear.from_uniform(*random_uniform(rng, 2, 16, 64, 16, False)[:3], 2, 16)
    with pytest.raises(ShapeError, match="x must be"):
        layer(np.zeros(63, np.float32))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
def test_a_quantized_layer_converts_to_the_same_planes(bits, act_order):
    """from_quantized lays the GPTQ words into planes in C; from_uniform from unpacked codes."""
    from helpers import pack_gptq
    from qinfer.linear import QuantizedLinear

    rng = np.random.default_rng(bits)
    codes, scales, zeros, g_idx = random_uniform(rng, bits, 72, 256, 32, act_order)
    dense = QuantizedLinear.from_packed(pack_gptq(codes, bits), scales, zeros, bits, 32, g_idx)
    converted = LutLinear.from_quantized(dense)
    direct = LutLinear.from_uniform(codes, scales, zeros, bits, 32, g_idx)
    np.testing.assert_array_equal(converted._planes, direct._planes)
    np.testing.assert_array_equal(converted.dequantize(), direct.dequantize())
    x = rng.standard_normal((2, 256)).astype(np.float32)
    np.testing.assert_array_equal(converted(x), direct(x))
