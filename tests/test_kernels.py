"""Tests for qinfer's quantized matrix kernels (QuantizedLinear).

Everything the implementation is checked against -- the round-to-nearest
(GPTQ) quantizer, the GPTQ word packer, the unpacker and the dequantizer --
is written independently here, in plain numpy:

* ``rtn_quantize``   GPTQ's RTN quantizer, float32, per (group, output column)
* ``pack_gptq``      GPTQ's packing loop, word by word, vectorised over columns
                     (tests/helpers.py: the one reference packer of the tests)
* ``unpack_stream``  reads the words back as one little-endian bit stream per
                     column (a deliberately different formulation than the
                     packer, so each helper checks the other)
* ``dequant``        w[k, j] = scale[g(k), j] * (q[k, j] - zero[g(k), j])

Accuracy: relative error is max|y - ref| / max|ref| (<= 1e-4) and
||y - ref|| / ||ref|| (<= 1e-5), ref computed in float64.  For tiny outputs
(e.g. out=1, n=1) the denominators are floored by the natural size of the
dot products, sqrt(sum_k (x_k w_kj)^2), so a single output that happens to
cancel to ~0 cannot make a correct float32 kernel fail.

Conventions used throughout: codes ``q`` are [in_features, out_features]
(GPTQ orientation, like ``qweight``); weights passed to ``from_float`` and
returned by ``dequantize()`` are [out_features, in_features].
"""

import functools

import os

import numpy as np
import pytest

import qinfer
from helpers import needs_avx2, pack_gptq  # the reference packer, GPTQ's loop

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (16, 32, 64, 128, -1)
F32 = np.float32

# Accuracy targets of the issue.
MAX_REL = 1e-4     # max|y - ref| / max|ref|
NORM_REL = 1e-5    # ||y - ref|| / ||ref||


# --------------------------------------------------------------------------
# Reference helpers
# --------------------------------------------------------------------------

def n_groups(in_features, group_size):
    return 1 if group_size == -1 else in_features // group_size


def group_index(in_features, group_size):
    """Group of each input row for contiguous groups."""
    gs = in_features if group_size == -1 else group_size
    return np.arange(in_features) // gs


def rtn_quantize(weight, bits, group_size, sym=False):
    """GPTQ round-to-nearest quantizer, done in float32.

    weight: float32 [out, in].  Returns (codes uint8 [in, out],
    scales float32 [G, out], zeros float32 [G, out]).
    """
    w = np.asarray(weight, dtype=F32)
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    G = in_f // gs
    maxq = F32(2 ** bits - 1)

    wg = w.reshape(out_f, G, gs)
    xmin = np.minimum(wg.min(axis=2), F32(0))          # [out, G]
    xmax = np.maximum(wg.max(axis=2), F32(0))
    if sym:
        xmax = np.maximum(np.abs(xmin), xmax)
        xmin = np.where(xmin < 0, -xmax, xmin)
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = np.where(both_zero, F32(-1), xmin)
    xmax = np.where(both_zero, F32(1), xmax)

    scale = (xmax - xmin) / maxq
    if sym:
        zero = np.full_like(scale, (maxq + 1) / F32(2))
    else:
        zero = np.round(-xmin / scale)
    q = np.clip(np.round(wg / scale[:, :, None]) + zero[:, :, None], 0, maxq)

    assert scale.dtype == F32 and zero.dtype == F32 and q.dtype == F32
    codes = q.astype(np.uint8).reshape(out_f, in_f).T
    return (np.ascontiguousarray(codes), np.ascontiguousarray(scale.T),
            np.ascontiguousarray(zero.T))


def dequant(codes, scales, zeros, group_size=None, g_idx=None):
    """float32 [in, out] weights: scale[g(k)] * (q[k] - zero[g(k)])."""
    in_f = codes.shape[0]
    if g_idx is None:
        G = scales.shape[0]
        gs = in_f // G
        q = codes.astype(F32).reshape(G, gs, -1)
        w = (q - zeros[:, None, :]) * scales[:, None, :]
        return w.reshape(in_f, -1)
    g_idx = np.asarray(g_idx)
    return (codes.astype(F32) - zeros[g_idx]) * scales[g_idx]


def unpack_stream(qweight, bits, in_features):
    """Inverse of the GPTQ layout, read as a little-endian bit stream.

    For every bit width the words of one column, concatenated, form a
    little-endian stream in which input row k occupies bits [k*b, k*b+b).
    """
    u = np.ascontiguousarray(np.asarray(qweight).view(np.uint32).T)   # [out, W]
    out_f = u.shape[0]
    as_bytes = u.astype("<u4").view(np.uint8).reshape(out_f, -1)
    stream = np.unpackbits(as_bytes, axis=1, bitorder="little")
    stream = stream[:, :in_features * bits].reshape(out_f, in_features, bits)
    weights = (1 << np.arange(bits)).astype(np.int64)
    codes = (stream.astype(np.int64) * weights).sum(axis=2)
    return np.ascontiguousarray(codes.T.astype(np.uint8))


def random_codes(rng, in_f, out_f, bits):
    return rng.integers(0, 2 ** bits, size=(in_f, out_f), dtype=np.uint8)


def random_scales_zeros(rng, G, out_f, bits, integer_zeros=True):
    """Scales of a realistic size for std-0.02 weights; zeros inside [0, maxq]."""
    maxq = 2 ** bits - 1
    scales = (rng.uniform(0.5, 1.5, size=(G, out_f)) * 0.16 / maxq).astype(F32)
    if integer_zeros:
        zeros = rng.integers(0, maxq + 1, size=(G, out_f)).astype(F32)
    else:
        zeros = rng.uniform(0, maxq, size=(G, out_f)).astype(F32)
    return scales, zeros


def act_order_g_idx(rng, in_f, group_size):
    """Each group owns group_size rows, scattered over the input dimension."""
    G = in_f // group_size
    return rng.permutation(np.repeat(np.arange(G), group_size)).astype(np.int32)


def ref_matmul(X, w_in_out):
    """float64 X @ W, W given as [in, out]."""
    return np.asarray(X, np.float64) @ np.asarray(w_in_out, np.float64)


def dot_size(X, w_in_out):
    """Natural size of each output, sqrt(sum_k (x_k * w_kj)^2), in float64.

    Used as a floor for the error denominators: an output that happens to
    cancel to almost zero (likely when there is only one, e.g. out=1, n=1)
    would otherwise turn float32 rounding into a huge "relative" error.
    """
    X = np.asarray(X, np.float64)
    w = np.asarray(w_in_out, np.float64)
    return np.sqrt(np.square(X) @ np.square(w))


def rel_errors(y, ref, size=None):
    """max|y-ref|/max|ref| and ||y-ref||/||ref|| (denominators floored by size)."""
    y = np.asarray(y, np.float64)
    denom_max = np.abs(ref).max()
    denom_norm = np.linalg.norm(ref)
    if size is not None:
        denom_max = max(denom_max, np.abs(size).max())
        denom_norm = max(denom_norm, np.linalg.norm(size))
    assert denom_max > 0, "degenerate reference (all zeros)"
    return (np.abs(y - ref).max() / denom_max,
            np.linalg.norm(y - ref) / denom_norm)


def assert_matches(y, ref, what, size=None, max_rel=MAX_REL, norm_rel=NORM_REL):
    assert isinstance(y, np.ndarray), f"{what}: result is {type(y)}"
    assert y.shape == ref.shape, f"{what}: shape {y.shape} != {ref.shape}"
    assert y.dtype == F32, f"{what}: dtype {y.dtype}"
    assert np.all(np.isfinite(y)), f"{what}: non-finite output"
    emax, enorm = rel_errors(y, ref, size)
    assert emax <= max_rel, f"{what}: max rel error {emax:.3g} > {max_rel:g}"
    assert enorm <= norm_rel, f"{what}: norm rel error {enorm:.3g} > {norm_rel:g}"


def check_layer_outputs(layer, X, w_in_out, what):
    """layer(x) for 1-D x and for batches n = 1, 7, 64 (X must have 64 rows)."""
    assert X.shape[0] == 64
    ref = ref_matmul(X, w_in_out)
    size = dot_size(X, w_in_out)
    assert_matches(layer(X[0]), ref[0], f"{what} gemv 1-D", size[0])
    for n in (1, 7, 64):
        lo = 64 - n  # use different rows than the gemv check
        assert_matches(layer(X[lo:]), ref[lo:], f"{what} gemm n={n}", size[lo:])


def weights(rng, out_f, in_f):
    return (rng.standard_normal((out_f, in_f), dtype=F32) * F32(0.02))


def inputs(rng, n, in_f):
    return rng.standard_normal((n, in_f), dtype=F32)


pytestmark = pytest.mark.usefixtures("restore_threads")      # conftest.py


# --------------------------------------------------------------------------
# 0. The reference helpers agree with the documented layout and each other
# --------------------------------------------------------------------------

def test_helpers_3bit_straddling_values():
    codes = np.zeros((32, 2), np.uint8)
    codes[10, 0] = 0b101     # stream bits 30..32
    codes[21, 0] = 0b110     # stream bits 63..65
    codes[0, 1] = 0b111      # stream bits 0..2
    codes[31, 1] = 0b011     # stream bits 93..95
    w = pack_gptq(codes, 3).view(np.uint32)
    assert w.shape == (3, 2)
    assert w[0, 0] == 0b01 << 30 and w[1, 0] == 1 and w[2, 0] == 0b11
    assert w[0, 1] == 0b111 and w[1, 1] == 0 and w[2, 1] == 0b011 << 29
    assert np.array_equal(unpack_stream(w.view(np.int32), 3, 32), codes)


@pytest.mark.parametrize("bits", BITS)
def test_helpers_pack_unpack_roundtrip(bits):
    rng = np.random.default_rng(0)
    codes = random_codes(rng, 256, 9, bits)
    packed = pack_gptq(codes, bits)
    assert packed.dtype == np.int32 and packed.shape == (256 * bits // 32, 9)
    assert np.array_equal(unpack_stream(packed, bits, 256), codes)
    if 32 % bits == 0:  # explicit position check: row r*(32/b)+i at bits [b*i, b*i+b)
        per = 32 // bits
        r, i = 3, per - 1
        k = r * per + i
        expect = (int(packed.view(np.uint32)[r, 4]) >> (bits * i)) & (2 ** bits - 1)
        assert expect == codes[k, 4]
    else:  # value i of a unit of b words sits at stream bits [b*i, b*i+b): check one that straddles
        i = next(i for i in range(32) if (bits * i) // 32 != (bits * i + bits - 1) // 32)
        word, offset = divmod(bits * i, 32)
        u = packed.view(np.uint32).astype(np.uint64)[bits:2 * bits, 4]      # the second unit
        expect = ((int(u[word]) | (int(u[word + 1]) << 32)) >> offset) & (2 ** bits - 1)
        assert expect == codes[32 + i, 4]


# --------------------------------------------------------------------------
# 1a. Small and odd shapes, every bit width x group size, from_float
# --------------------------------------------------------------------------

SMALL_SHAPES = [(o, i) for o in (1, 13, 77) for i in (128, 256, 384)]
SMALL_SHAPES += [(13, 96), (77, 32), (200, 640)]
SMALL_CASES = [(o, i, b, g) for (o, i) in SMALL_SHAPES for b in BITS
               for g in GROUP_SIZES if g == -1 or i % g == 0]


@pytest.mark.parametrize("out_f,in_f,bits,group_size", SMALL_CASES)
def test_small_shapes_match_numpy(out_f, in_f, bits, group_size):
    rng = np.random.default_rng(0)
    layer = qinfer.QuantizedLinear.from_float(weights(rng, out_f, in_f), bits, group_size)
    assert (layer.out_features, layer.in_features) == (out_f, in_f)
    assert (layer.bits, layer.group_size) == (bits, group_size)
    deq = layer.dequantize()
    assert deq.dtype == F32 and deq.shape == (out_f, in_f)
    X = inputs(rng, 64, in_f)
    check_layer_outputs(layer, X, deq.T, f"[{out_f}x{in_f}] b={bits} g={group_size}")


# --------------------------------------------------------------------------
# 1b. LLaMA-sized shapes, every bit width x group size, from_packed
# --------------------------------------------------------------------------

BIG_SHAPES = [(4096, 4096), (11008, 4096)]
BIG_CASES = [(o, i, b, g) for (o, i) in BIG_SHAPES for b in BITS for g in GROUP_SIZES]


@functools.lru_cache(maxsize=1)
def _big_codes(out_f, in_f, bits):
    """Random codes + their packed words, shared by all group sizes."""
    rng = np.random.default_rng([out_f, in_f, bits])
    codes = random_codes(rng, in_f, out_f, bits)
    return codes, pack_gptq(codes, bits)


@functools.lru_cache(maxsize=1)
def _big_inputs(in_f):
    return inputs(np.random.default_rng(1), 64, in_f)


@pytest.mark.parametrize("out_f,in_f,bits,group_size", BIG_CASES)
def test_big_shapes_match_numpy(out_f, in_f, bits, group_size):
    codes, packed = _big_codes(out_f, in_f, bits)
    rng = np.random.default_rng([out_f, bits, group_size + 1])
    scales, zeros = random_scales_zeros(rng, n_groups(in_f, group_size), out_f, bits)
    layer = qinfer.QuantizedLinear.from_packed(packed, scales, zeros, bits, group_size)
    if out_f == 4096:   # a multiple of any tile width: nothing to pad, so exact
        assert layer.nbytes == packed.nbytes + scales.nbytes + zeros.nbytes

    X = _big_inputs(in_f)
    ref = np.empty((64, out_f))
    deq = layer.dequantize()
    assert deq.shape == (out_f, in_f)
    chunk = 2048
    for c0 in range(0, out_f, chunk):
        c1 = min(out_f, c0 + chunk)
        w = dequant(codes[:, c0:c1], scales[:, c0:c1], zeros[:, c0:c1])
        assert np.array_equal(deq[c0:c1], w.T), f"dequantize() differs in rows {c0}:{c1}"
        ref[:, c0:c1] = ref_matmul(X, w)
    del deq

    what = f"[{out_f}x{in_f}] b={bits} g={group_size}"
    assert_matches(layer(X[0]), ref[0], f"{what} gemv 1-D")
    for n in (1, 7, 64):
        assert_matches(layer(X[64 - n:]), ref[64 - n:], f"{what} gemm n={n}")


@functools.lru_cache(maxsize=1)
def _big_float_weight():
    return weights(np.random.default_rng(2), 11008, 4096)


@pytest.mark.parametrize("bits", BITS)
def test_big_from_float(bits):
    """from_float on an 11008x4096 MLP matrix: packing, dequantize, matmul."""
    w = _big_float_weight()
    layer = qinfer.QuantizedLinear.from_float(w, bits, 128)
    codes, scales, zeros = rtn_quantize(w, bits, 128)
    np.testing.assert_allclose(layer.scales, scales, rtol=1e-6, atol=0)
    assert np.array_equal(layer.zeros, zeros)
    qw = layer.qweight
    assert qw.dtype == np.int32 and qw.shape == (4096 * bits // 32, 11008)
    assert np.array_equal(qw, pack_gptq(codes, bits)), "qweight differs from GPTQ packing"
    deq = layer.dequantize()
    ref_w = dequant(codes, scales, zeros).T
    np.testing.assert_allclose(deq, ref_w, rtol=1e-6, atol=1e-6 * np.abs(ref_w).max())
    X = _big_inputs(4096)
    ref = ref_matmul(X, deq.T)
    assert_matches(layer(X[0]), ref[0], f"from_float b={bits} gemv")
    for n in (1, 7, 64):
        assert_matches(layer(X[64 - n:]), ref[64 - n:], f"from_float b={bits} gemm n={n}")


# --------------------------------------------------------------------------
# 2 + 3. from_float == the reference RTN quantizer, packed bit for bit
# --------------------------------------------------------------------------

RTN_CASES = [(b, g, sym) for b in BITS for g in GROUP_SIZES for sym in (False, True)]


def _check_from_float(w, bits, group_size, sym):
    out_f, in_f = w.shape
    layer = qinfer.QuantizedLinear.from_float(w, bits, group_size, sym=sym)
    codes, scales, zeros = rtn_quantize(w, bits, group_size, sym)
    G = n_groups(in_f, group_size)

    qw = layer.qweight
    assert qw.dtype == np.int32 and qw.shape == (in_f * bits // 32, out_f)
    assert layer.scales.dtype == F32 and layer.scales.shape == (G, out_f)
    assert layer.zeros.dtype == F32 and layer.zeros.shape == (G, out_f)

    got_codes = unpack_stream(qw, bits, in_f)
    bad = np.argwhere(got_codes != codes)
    assert bad.size == 0, (f"{len(bad)} codes differ, first at [in, out]={bad[0].tolist()}: "
                           f"got {got_codes[tuple(bad[0])]} want {codes[tuple(bad[0])]}")
    assert np.array_equal(qw, pack_gptq(codes, bits)), "packing differs from GPTQ layout"
    np.testing.assert_allclose(layer.scales, scales, rtol=1e-6, atol=0)
    assert np.array_equal(layer.zeros, zeros)

    ref_w = dequant(codes, scales, zeros).T
    deq = layer.dequantize()
    assert deq.dtype == F32 and deq.shape == (out_f, in_f)
    np.testing.assert_allclose(deq, ref_w, rtol=1e-6, atol=1e-6 * np.abs(ref_w).max())
    return layer, codes, scales, zeros


@pytest.mark.parametrize("bits,group_size,sym", RTN_CASES)
def test_from_float_matches_rtn_reference(bits, group_size, sym):
    rng = np.random.default_rng(0)
    _check_from_float(weights(rng, 77, 384), bits, group_size, sym)
    w = weights(rng, 13, 256)
    w[::3, ::17] *= 25          # a few outliers, as in real checkpoints
    _check_from_float(w, bits, group_size, sym)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", (False, True))
def test_from_float_degenerate_groups(bits, sym):
    """All-zero, all-positive and all-negative groups, and a zero output row."""
    rng = np.random.default_rng(0)
    gs = 32
    w = weights(rng, 6, 128)
    w[0, 32:64] = 0                        # xmin == xmax == 0 -> [-1, 1] range
    w[1, :] = 0                            # whole output row zero
    w[2, 0:32] = np.abs(w[2, 0:32]) + 0.01  # all positive: xmin = 0
    w[3, 64:96] = -np.abs(w[3, 64:96]) - 0.01  # all negative: xmax = 0
    w[4, 96:128] = 0.03                    # constant group
    layer, codes, scales, zeros = _check_from_float(w, bits, gs, sym)

    maxq = 2 ** bits - 1
    # The zero-group path: scale = 2/maxq and every code equals the zero point,
    # so those weights dequantize to exactly 0.
    assert np.allclose(scales[1, 0], 2 / maxq)
    assert np.all(codes[32:64, 0] == zeros[1, 0])
    deq = layer.dequantize()
    assert np.all(deq[0, 32:64] == 0) and np.all(deq[1] == 0)
    if not sym:
        assert zeros[0, 2] == 0 and zeros[2, 3] == maxq

    X = inputs(rng, 7, 128)
    y = layer(X)
    # A kernel may compute scale * (sum q*x - zero * sum x), so the zero row
    # need not come out as exactly 0 -- only within the usual tolerance.
    assert np.abs(y[:, 1]).max() <= MAX_REL * np.abs(y).max(), "all-zero output row"
    assert_matches(y, ref_matmul(X, deq.T), f"degenerate b={bits} sym={sym}",
                   dot_size(X, deq.T))


def test_from_float_accepts_noncontiguous_weight():
    rng = np.random.default_rng(0)
    w = weights(rng, 256, 64)
    a = qinfer.QuantizedLinear.from_float(np.ascontiguousarray(w.T), 4, 32)
    b = qinfer.QuantizedLinear.from_float(w.T, 4, 32)          # F-ordered view
    assert np.array_equal(a.qweight, b.qweight)
    assert np.array_equal(a.scales, b.scales) and np.array_equal(a.zeros, b.zeros)


# --------------------------------------------------------------------------
# 4. from_packed round trip
# --------------------------------------------------------------------------

@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("integer_zeros", (True, False))
def test_from_packed_roundtrip(bits, group_size, integer_zeros):
    rng = np.random.default_rng(0)
    out_f, in_f = 45, 256
    G = n_groups(in_f, group_size)
    codes = random_codes(rng, in_f, out_f, bits)
    scales, zeros = random_scales_zeros(rng, G, out_f, bits, integer_zeros)
    packed = pack_gptq(codes, bits)

    layer = qinfer.QuantizedLinear.from_packed(packed, scales, zeros, bits, group_size)
    assert (layer.bits, layer.group_size) == (bits, group_size)
    assert (layer.in_features, layer.out_features) == (in_f, out_f)
    assert np.array_equal(layer.qweight, packed) and layer.qweight.dtype == np.int32
    assert np.array_equal(layer.scales, scales) and layer.scales.dtype == F32
    assert np.array_equal(layer.zeros, zeros) and layer.zeros.dtype == F32
    # nbytes is the memory held; the layer may pad out_features to its tile
    # width internally, so allow up to 64 columns of padding here (the
    # 4096-wide case in test_big_shapes_match_numpy checks it exactly).
    logical = in_f * out_f * bits // 8 + 2 * 4 * G * out_f
    padded = (in_f * bits // 8 + 2 * 4 * G) * (-(-out_f // 64) * 64)
    assert logical <= layer.nbytes <= padded, (layer.nbytes, logical)

    deq = layer.dequantize()
    assert deq.dtype == F32
    assert np.array_equal(deq, dequant(codes, scales, zeros).T)

    X = inputs(rng, 64, in_f)
    check_layer_outputs(layer, X, deq.T, f"from_packed b={bits} g={group_size}")


def test_from_packed_accepts_noncontiguous_qweight():
    rng = np.random.default_rng(0)
    codes = random_codes(rng, 128, 24, 3)
    scales, zeros = random_scales_zeros(rng, 4, 24, 3)
    packed = pack_gptq(codes, 3)
    ref = dequant(codes, scales, zeros).T
    wide = np.zeros((packed.shape[0], 48), np.int32)
    wide[:, ::2] = packed
    layer = qinfer.QuantizedLinear.from_packed(wide[:, ::2], scales, zeros, 3, 32)
    assert np.array_equal(layer.dequantize(), ref)


# --------------------------------------------------------------------------
# 5. act-order g_idx
# --------------------------------------------------------------------------

G_IDX_CASES = [(b, o, i, g) for b in BITS
               for (o, i, g) in ((77, 256, 32), (64, 384, 16), (300, 1024, 128))]


@pytest.mark.parametrize("bits,out_f,in_f,group_size", G_IDX_CASES)
def test_g_idx_act_order(bits, out_f, in_f, group_size):
    rng = np.random.default_rng(0)
    G = in_f // group_size
    codes = random_codes(rng, in_f, out_f, bits)
    scales, zeros = random_scales_zeros(rng, G, out_f, bits)
    g_idx = act_order_g_idx(rng, in_f, group_size)
    assert not np.array_equal(g_idx, group_index(in_f, group_size))

    packed = pack_gptq(codes, bits)
    layer = qinfer.QuantizedLinear.from_packed(packed, scales, zeros,
                                               bits, group_size, g_idx=g_idx)
    assert np.array_equal(layer.qweight, packed), "qweight not given back in checkpoint order"
    assert np.array_equal(layer.scales, scales) and np.array_equal(layer.zeros, zeros)
    w = dequant(codes, scales, zeros, g_idx=g_idx)          # [in, out]
    assert np.array_equal(layer.dequantize(), w.T)
    X = inputs(rng, 64, in_f)
    check_layer_outputs(layer, X, w, f"g_idx b={bits} [{out_f}x{in_f}] g={group_size}")


def test_g_idx_trivial_equals_no_g_idx():
    rng = np.random.default_rng(0)
    codes = random_codes(rng, 256, 40, 4)
    scales, zeros = random_scales_zeros(rng, 4, 40, 4)
    packed = pack_gptq(codes, 4)
    plain = qinfer.QuantizedLinear.from_packed(packed, scales, zeros, 4, 64)
    gi = group_index(256, 64).astype(np.int32)
    with_g = qinfer.QuantizedLinear.from_packed(packed, scales, zeros, 4, 64, g_idx=gi)
    assert np.array_equal(plain.dequantize(), with_g.dequantize())
    X = inputs(rng, 7, 256)
    ref = ref_matmul(X, plain.dequantize().T)
    assert_matches(with_g(X), ref, "trivial g_idx", dot_size(X, plain.dequantize().T))


# --------------------------------------------------------------------------
# 6. Threads: 1 and 2 threads give bitwise equal results
# --------------------------------------------------------------------------

THREAD_CASES = [(b, g) for b in BITS for g in (16, 128, -1)]


@pytest.mark.parametrize("bits,group_size", THREAD_CASES)
def test_threads_bitwise_equal(bits, group_size):
    rng = np.random.default_rng(0)
    out_f, in_f = 1001, 2048
    layer = qinfer.QuantizedLinear.from_float(weights(rng, out_f, in_f), bits, group_size)
    X = inputs(rng, 64, in_f)
    ref = ref_matmul(X, layer.dequantize().T)
    for x, r, name in ((X[0], ref[0], "gemv"), (X[:7], ref[:7], "gemm7"), (X, ref, "gemm64")):
        y1 = layer(x, threads=1)
        y2 = layer(x, threads=2)
        assert np.array_equal(y1, y2), f"{name}: 1 vs 2 threads differ"
        assert_matches(y2, r, f"{name} threads=2")

        qinfer.set_num_threads(1)
        assert qinfer.get_num_threads() == 1
        g1 = layer(x)
        qinfer.set_num_threads(2)
        assert qinfer.get_num_threads() == 2
        g2 = layer(x)
        assert np.array_equal(g1, g2), f"{name}: global 1 vs 2 threads differ"
        assert np.array_equal(g1, y1), f"{name}: global vs per-call threads differ"


def test_threads_tiny_layer():
    rng = np.random.default_rng(0)
    layer = qinfer.QuantizedLinear.from_float(weights(rng, 1, 32), 4, 16)
    x = inputs(rng, 3, 32)
    assert np.array_equal(layer(x, threads=1), layer(x, threads=2))


def test_per_call_threads_does_not_change_global():
    rng = np.random.default_rng(0)
    layer = qinfer.QuantizedLinear.from_float(weights(rng, 8, 64), 4, 32)
    qinfer.set_num_threads(2)
    layer(inputs(rng, 1, 64)[0], threads=1)
    assert qinfer.get_num_threads() == 2


# --------------------------------------------------------------------------
# 7. Scalar path == AVX2 path
# --------------------------------------------------------------------------

PATH_CASES = [(b, g, o, i) for b in BITS for g in (128, -1) for (o, i) in ((77, 384), (301, 1024))]
PATH_CASES += [(b, 16, 13, 96) for b in BITS]


@needs_avx2
def test_default_path_is_avx2_on_this_machine():
    assert qinfer.kernels.active_path() == "avx2"
    with qinfer.kernels.use_path("scalar"):
        assert qinfer.kernels.active_path() == "scalar"
    assert qinfer.kernels.active_path() == "avx2"
    with qinfer.kernels.use_path("avx2"):
        assert qinfer.kernels.active_path() == "avx2"


@needs_avx2
@pytest.mark.parametrize("bits,group_size,out_f,in_f", PATH_CASES)
def test_scalar_path_matches_avx2(bits, group_size, out_f, in_f):
    rng = np.random.default_rng(0)
    layer = qinfer.QuantizedLinear.from_float(weights(rng, out_f, in_f), bits, group_size)
    X = inputs(rng, 8, in_f)
    deq = layer.dequantize()
    ref = ref_matmul(X, deq.T)
    size = dot_size(X, deq.T)
    for sl, name in ((0, "n=1"), (slice(1, None), "n=7")):
        x, r, sz = X[sl], ref[sl], size[sl]
        with qinfer.kernels.use_path("avx2"):
            y_avx = layer(x)
        with qinfer.kernels.use_path("scalar"):
            y_sc = layer(x)
        assert_matches(y_avx, r, f"avx2 {name}", sz)
        assert_matches(y_sc, r, f"scalar {name}", sz)
        diff, _ = rel_errors(y_sc, y_avx.astype(np.float64), sz)
        assert diff <= 1e-5, f"{name}: scalar vs avx2 rel diff {diff:.3g}"


def test_environment_forces_scalar_path():
    """QINFER_KERNELS=scalar at import selects the portable path (how a CPU without AVX2 runs)."""
    import subprocess
    import sys
    code = ("import numpy as np, qinfer; print(qinfer.kernels.active_path()); "
            "l = qinfer.QuantizedLinear.from_float(np.eye(64, dtype=np.float32), 8, 32); "
            "print(float(abs(l(np.arange(64, dtype=np.float32)) - np.arange(64)).max()))")
    env = dict(os.environ, QINFER_KERNELS="scalar")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    path, err = out.stdout.split()
    assert path == "scalar"
    assert float(err) < 1e-3


def test_scalar_path_with_g_idx_and_threads():
    rng = np.random.default_rng(0)
    codes = random_codes(rng, 256, 50, 3)
    scales, zeros = random_scales_zeros(rng, 8, 50, 3)
    g_idx = act_order_g_idx(rng, 256, 32)
    layer = qinfer.QuantizedLinear.from_packed(pack_gptq(codes, 3), scales, zeros, 3, 32, g_idx=g_idx)
    X = inputs(rng, 7, 256)
    w = dequant(codes, scales, zeros, g_idx=g_idx)
    with qinfer.kernels.use_path("scalar"):
        y1 = layer(X, threads=1)
        y2 = layer(X, threads=2)
    assert np.array_equal(y1, y2)
    assert_matches(y1, ref_matmul(X, w), "scalar g_idx", dot_size(X, w))


# --------------------------------------------------------------------------
# Inputs: dtype, layout, shapes
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_layer():
    rng = np.random.default_rng(0)
    return qinfer.QuantizedLinear.from_float(weights(rng, 33, 256), 4, 128)


def test_float64_input_is_converted(small_layer):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 256))          # float64
    y = small_layer(x)
    assert y.dtype == F32 and y.shape == (5, 33)
    assert np.array_equal(y, small_layer(x.astype(F32)))
    y1 = small_layer(x[0])
    assert y1.shape == (33,)
    assert np.array_equal(y1, small_layer(x[0].astype(F32)))


def test_noncontiguous_input(small_layer):
    rng = np.random.default_rng(0)
    big = inputs(rng, 14, 512)
    x_strided = big[::2, ::2]                  # [7, 256], both axes strided
    x_fortran = np.asfortranarray(big[:7, :256])
    ref_s = small_layer(np.ascontiguousarray(x_strided))
    ref_f = small_layer(np.ascontiguousarray(x_fortran))
    assert np.array_equal(small_layer(x_strided), ref_s)
    assert np.array_equal(small_layer(x_fortran), ref_f)
    assert np.array_equal(small_layer(big[3, ::2]), small_layer(np.ascontiguousarray(big[3, ::2])))


def test_input_not_modified(small_layer):
    rng = np.random.default_rng(0)
    X = inputs(rng, 7, 256)
    keep = X.copy()
    small_layer(X)
    small_layer(X[0])
    assert np.array_equal(X, keep)


# --------------------------------------------------------------------------
# 8. Bad input raises QinferError
# --------------------------------------------------------------------------

def _w(out_f, in_f):
    return weights(np.random.default_rng(0), out_f, in_f)


def test_error_is_exception_class():
    assert issubclass(qinfer.QinferError, Exception)


def test_error_in_features_not_multiple_of_32():
    with pytest.raises(qinfer.QinferError, match=r"(?i)in_features|multiple|32"):
        qinfer.QuantizedLinear.from_float(_w(8, 100), 4, -1)


def test_error_group_does_not_divide_in_features():
    with pytest.raises(qinfer.QinferError, match=r"(?i)group"):
        qinfer.QuantizedLinear.from_float(_w(8, 192), 4, 128)


@pytest.mark.parametrize("bits", (1, 7, 16))
def test_error_unsupported_bits(bits):
    with pytest.raises(qinfer.QinferError, match=r"(?i)bit"):
        qinfer.QuantizedLinear.from_float(_w(8, 128), bits, 32)


@pytest.mark.parametrize("group_size", (48, 0, 256, 8, -2))
def test_error_unsupported_group_size(group_size):
    with pytest.raises(qinfer.QinferError, match=r"(?i)group"):
        qinfer.QuantizedLinear.from_float(_w(8, 768), 4, group_size)


def test_error_weight_ndim():
    with pytest.raises(qinfer.QinferError):
        qinfer.QuantizedLinear.from_float(_w(1, 128)[0], 4, 32)
    with pytest.raises(qinfer.QinferError):
        qinfer.QuantizedLinear.from_float(_w(4, 128).reshape(2, 2, 128), 4, 32)


def test_error_x_wrong_length(small_layer):
    for bad in (np.zeros(255, F32), np.zeros(257, F32), np.zeros((3, 128), F32)):
        with pytest.raises(qinfer.QinferError, match=r"(?i)in_features|length|shape|size|256"):
            small_layer(bad)


def test_error_x_wrong_ndim(small_layer):
    with pytest.raises(qinfer.QinferError):
        small_layer(np.zeros((2, 3, 256), F32))
    with pytest.raises(qinfer.QinferError):
        small_layer(np.float32(1.0))


def _packed_parts(bits=4, in_f=256, out_f=16, group_size=64):
    rng = np.random.default_rng(0)
    codes = random_codes(rng, in_f, out_f, bits)
    scales, zeros = random_scales_zeros(rng, n_groups(in_f, group_size), out_f, bits)
    return pack_gptq(codes, bits), scales, zeros


def test_error_from_packed_scales_shape():
    packed, scales, zeros = _packed_parts()
    with pytest.raises(qinfer.QinferError, match=r"(?i)scale|shape|group"):
        qinfer.QuantizedLinear.from_packed(packed, scales[:-1], zeros[:-1], 4, 64)
    with pytest.raises(qinfer.QinferError):
        qinfer.QuantizedLinear.from_packed(packed, scales, zeros, 4, 32)   # wrong n_groups
    with pytest.raises(qinfer.QinferError):
        qinfer.QuantizedLinear.from_packed(packed, scales[:, :-1], zeros, 4, 64)
    with pytest.raises(qinfer.QinferError):
        qinfer.QuantizedLinear.from_packed(packed, scales, zeros[:, :-1], 4, 64)
    with pytest.raises(qinfer.QinferError):
        qinfer.QuantizedLinear.from_packed(packed, scales[0], zeros[0], 4, 64)


def test_error_from_packed_qweight_inconsistent_with_bits():
    packed, scales, zeros = _packed_parts(bits=4, in_f=256)        # 32 word rows
    with pytest.raises(qinfer.QinferError):                        # 3-bit needs rows % 3 == 0
        qinfer.QuantizedLinear.from_packed(packed[:31], scales, zeros, 3, 64)
    with pytest.raises(qinfer.QinferError):                        # 4-bit: 6 rows -> in=48
        qinfer.QuantizedLinear.from_packed(packed[:6], scales[:1], zeros[:1], 4, -1)
    with pytest.raises(qinfer.QinferError, match=r"(?i)bit"):
        qinfer.QuantizedLinear.from_packed(packed, scales, zeros, 5, 64)


def test_error_from_packed_qweight_dtype():
    packed, scales, zeros = _packed_parts()
    with pytest.raises(qinfer.QinferError):
        qinfer.QuantizedLinear.from_packed(packed.astype(F32), scales, zeros, 4, 64)
    with pytest.raises(qinfer.QinferError):
        qinfer.QuantizedLinear.from_packed(packed[:, 0], scales, zeros, 4, 64)


def test_error_from_packed_bad_g_idx():
    packed, scales, zeros = _packed_parts(in_f=256, group_size=64)
    good = group_index(256, 64).astype(np.int32)
    with pytest.raises(qinfer.QinferError):                          # wrong length
        qinfer.QuantizedLinear.from_packed(packed, scales, zeros, 4, 64, g_idx=good[:-1])
    bad = good.copy()
    bad[17] = 4                                                      # only groups 0..3 exist
    with pytest.raises(qinfer.QinferError):
        qinfer.QuantizedLinear.from_packed(packed, scales, zeros, 4, 64, g_idx=bad)
    bad[17] = -1
    with pytest.raises(qinfer.QinferError):
        qinfer.QuantizedLinear.from_packed(packed, scales, zeros, 4, 64, g_idx=bad)


@pytest.mark.parametrize("group_size", (-1, 32))
def test_empty_in_features_rejected_cleanly(group_size):
    """in_features == 0 is refused with a ShapeError (a QinferError) naming the sizes, from either
    constructor, not a layer that computes on nothing."""
    with pytest.raises(qinfer.errors.ShapeError, match=r"in_features and out_features >= 1, got 0 and 4"):
        qinfer.QuantizedLinear.from_float(np.zeros((4, 0), F32), 4, group_size)
    with pytest.raises(qinfer.errors.ShapeError, match=r"in_features and out_features >= 1, got 0 and 4"):
        qinfer.QuantizedLinear.from_packed(
            np.zeros((0, 4), np.int32), np.ones((1, 4), F32), np.zeros((1, 4), F32), 4, group_size)
    assert issubclass(qinfer.errors.ShapeError, qinfer.QinferError)


# ------------------------------------------------------- stacking layers
def test_stack_and_split_layers():
    """QuantizedLinear.stack puts layers' outputs side by side (the forward pass runs q/k/v as one)."""
    rng = np.random.default_rng(12)
    parts = [qinfer.QuantizedLinear.from_float(rng.normal(size=(out, 96)).astype(np.float32), 4, 32)
             for out in (24, 40, 9)]
    whole = qinfer.QuantizedLinear.stack(parts)
    assert (whole.out_features, whole.in_features) == (73, 96)
    x = rng.normal(size=96).astype(np.float32)
    X = rng.normal(size=(7, 96)).astype(np.float32)
    np.testing.assert_array_equal(whole(x), np.concatenate([p(x) for p in parts]))
    np.testing.assert_allclose(whole(X), np.concatenate([p(X) for p in parts], axis=1), rtol=1e-5, atol=1e-5)
    for part, back in zip(parts, whole.split([24, 40, 9])):
        np.testing.assert_array_equal(back.qweight, part.qweight)
        np.testing.assert_array_equal(back.dequantize(), part.dequantize())
    with pytest.raises(qinfer.QinferError, match="cannot stack"):
        qinfer.QuantizedLinear.stack([parts[0], qinfer.QuantizedLinear.from_float(
            rng.normal(size=(8, 96)).astype(np.float32), 8, 32)])
    with pytest.raises(qinfer.QinferError, match="do not split"):
        whole.split([24, 40])


# ------------------------------------------------ scales and zeros held in float16
def float16_exact_scales_zeros(rng, G, out_f, bits, integer_zeros):
    """Scales and zeros every one of which float16 holds exactly: normal and
    subnormal scales, negative and fractional zeros when not integer."""
    scales, zeros = random_scales_zeros(rng, G, out_f, bits, integer_zeros)
    scales = scales.astype(np.float16).astype(F32)
    scales[0, ::3] = F32(2.0 ** -20) * rng.integers(1, 16, size=scales[0, ::3].shape)   # subnormal
    if not integer_zeros:
        zeros = (zeros - F32(1.5)).astype(np.float16).astype(F32)
    return scales, zeros


def test_scale_storage_is_float16_only_when_exact():
    rng = np.random.default_rng(3)
    codes = random_codes(rng, 64, 20, 4)
    scales, zeros = random_scales_zeros(rng, 2, 20, 4)            # float32 scales: not exact in float16
    packed = pack_gptq(codes, 4)
    assert qinfer.QuantizedLinear.from_packed(packed, scales, zeros, 4, 32).scale_dtype == "float32"
    with pytest.raises(qinfer.UnsupportedError, match="float16"):
        qinfer.QuantizedLinear.from_packed(packed, scales, zeros, 4, 32, scale_dtype="float16")
    with pytest.raises(qinfer.UnsupportedError, match="scale_dtype"):
        qinfer.QuantizedLinear.from_packed(packed, scales, zeros, 4, 32, scale_dtype="int8")
    s16 = scales.astype(np.float16).astype(F32)
    held = qinfer.QuantizedLinear.from_packed(packed, s16, zeros, 4, 32)
    assert held.scale_dtype == "float16"
    assert held.nbytes < qinfer.QuantizedLinear.from_packed(packed, s16, zeros, 4, 32, scale_dtype="float32").nbytes
    assert np.array_equal(held.scales, s16) and held.scales.dtype == F32
    big = s16.copy()
    big[0, 0] = F32(70000.0)                                       # beyond float16's range
    assert qinfer.QuantizedLinear.from_packed(packed, big, zeros, 4, 32).scale_dtype == "float32"


HALF_CASES = [(b, g, act) for b in BITS for g in GROUP_SIZES for act in (False, True) if not (act and g == -1)]


@pytest.mark.parametrize("bits,group_size,act_order", HALF_CASES)
def test_float16_held_scales_compute_the_same(bits, group_size, act_order):
    """The kernels widen float16 scales and zeros exactly: every path gives the same
    bits as with the same values held in float32, and matches numpy."""
    rng = np.random.default_rng(bits * 100 + group_size)
    out_f, in_f = 37, 256
    G = n_groups(in_f, group_size)
    codes = random_codes(rng, in_f, out_f, bits)
    scales, zeros = float16_exact_scales_zeros(rng, G, out_f, bits, integer_zeros=group_size != 32)
    g_idx = act_order_g_idx(rng, in_f, group_size) if act_order else None
    packed = pack_gptq(codes, bits)
    half = qinfer.QuantizedLinear.from_packed(packed, scales, zeros, bits, group_size, g_idx)
    full = qinfer.QuantizedLinear.from_packed(packed, scales, zeros, bits, group_size, g_idx, scale_dtype="float32")
    assert (half.scale_dtype, full.scale_dtype) == ("float16", "float32")
    rows = g_idx if act_order else group_index(in_f, group_size)
    want = scales[rows] * (codes.astype(F32) - zeros[rows])      # [in, out]
    assert np.array_equal(half.dequantize(), want.T)
    X = inputs(rng, 64, in_f)
    check_layer_outputs(half, X, want, f"float16 scales b={bits} g={group_size}")
    paths = ("avx2", "scalar") if qinfer.kernels.cpu_has_avx2() else ("scalar",)
    for path in paths:
        for activations in ("float", "int8"):
            with qinfer.kernels.use_path(path), qinfer.kernels.use_activations(activations):
                for x in (X[0], X[:7], X):
                    for threads in (1, 2):
                        np.testing.assert_array_equal(half(x, threads=threads), full(x, threads=threads),
                                                      err_msg=f"{path} {activations} n={x.ndim and len(x)}")


def test_codes_start_on_a_cache_line():
    """The packed codes the kernels stream start 64-byte aligned (no 32-byte load
    straddles two lines), for new layers, copies, stacks and splits alike, and the
    aligned copy holds the same codes (dequantize is unchanged)."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((48, 256)).astype(np.float32)
    layers = [qinfer.QuantizedLinear.from_float(w[:, :k] if k else w, bits, group_size=32)
              for bits in (2, 3, 4, 8) for k in (0, 96)]
    a = qinfer.QuantizedLinear.from_float(w, 4, group_size=32)
    b = qinfer.QuantizedLinear.from_float(w[:16], 4, group_size=32)
    stacked = qinfer.QuantizedLinear.stack([a, b])
    layers += [a.copy(), stacked, *stacked.split([48, 16])]
    for layer in layers:
        assert layer._words.ctypes.data % 64 == 0, layer
    np.testing.assert_array_equal(a.copy().dequantize(), a.dequantize())
    np.testing.assert_array_equal(stacked.split([48, 16])[0].dequantize(), a.dequantize())


# --------------------------------------------------------------------------
# The float kernels' AVX-512 twins (qgemv: the micro-kernels in 16-float
# vectors; qgemm: 12 rows of a 16-column tile a call) do each output's
# multiply-adds in the AVX2 ones' order: the same bits.
# --------------------------------------------------------------------------

AVX512_CASES = [(o, i, b, g, n) for (o, i) in [(13, 256), (77, 384), (1000, 4096)] for b in BITS
                for g in (16, 32, 128, -1) for n in (1, 2, 12, 29) if g == -1 or i % g == 0]


@pytest.mark.skipif(not qinfer.kernels.has_float_avx512(), reason="this CPU (or build) has no AVX-512F")
@pytest.mark.parametrize("out_f,in_f,bits,group_size,n", AVX512_CASES)
def test_float_kernels_avx512_equal_avx2(out_f, in_f, bits, group_size, n):
    rng = np.random.default_rng([out_f, in_f, bits, group_size + 1, n, 5])
    codes = random_codes(rng, in_f, out_f, bits)
    scales, zeros = random_scales_zeros(rng, n_groups(in_f, group_size), out_f, bits)
    layer = qinfer.QuantizedLinear.from_packed(pack_gptq(codes, bits), scales, zeros, bits, group_size)
    X = inputs(rng, n, in_f)
    if n == 1:
        X = X[0]
    with qinfer.kernels.use_path("avx2"):
        for threads in (1, 2):
            with qinfer.kernels.use_float_avx512(True):
                wide = layer(X, threads=threads)
            with qinfer.kernels.use_float_avx512(False):
                narrow = layer(X, threads=threads)
            assert np.array_equal(wide, narrow), f"[{out_f}x{in_f}] b={bits} g={group_size} n={n} t={threads}"
    w_in_out = dequant(codes, scales, zeros, group_size).astype(np.float64)
    assert_matches(wide, ref_matmul(X, w_in_out), f"avx512 [{out_f}x{in_f}] b={bits} g={group_size} n={n}",
                   size=dot_size(X, w_in_out))


# --------------------------------------------------------------------------
# A zero shared by every group of a column (symmetric formats) is held once
# --------------------------------------------------------------------------

def _per_group_twin(layer, zeros):
    """The same layer holding its zeros once per group, as a layer with varying zeros does."""
    import copy
    from qinfer.linear import _tiles
    twin = copy.copy(layer)
    twin._zeros = _tiles(np.ascontiguousarray(zeros), layer._tu, layer._scales.dtype).reshape(-1)
    twin._matrix = twin._build_matrix()
    return twin


SHARED_ZERO_CASES = [(b, g) for b in BITS for g in (16, 32, 128)]


@pytest.mark.parametrize("bits,group_size", SHARED_ZERO_CASES)
def test_shared_zero_held_once_same_results(bits, group_size):
    rng = np.random.default_rng([bits, group_size])
    out_f, in_f = 77, 512
    codes = random_codes(rng, in_f, out_f, bits)
    G = in_f // group_size
    scales = (rng.uniform(0.5, 1.5, (G, out_f)) * 0.02).astype(F32)
    column_zero = rng.integers(0, 2 ** bits, out_f).astype(F32)       # one zero per column, as Q8_0's 128
    zeros = np.repeat(column_zero[None], G, axis=0)
    layer = qinfer.QuantizedLinear.from_packed(pack_gptq(codes, bits), scales, zeros, bits, group_size)
    tiles = -(-out_f // layer._tu)
    assert layer._zeros.size == tiles * layer._tu                     # one row of zeros per tile
    np.testing.assert_array_equal(layer.zeros, zeros)
    twin = _per_group_twin(layer, zeros)
    assert twin._zeros.size == tiles * G * layer._tu and twin.nbytes > layer.nbytes
    w = scales[np.arange(in_f) // group_size] * (codes - zeros[np.arange(in_f) // group_size])
    X = inputs(rng, 64, in_f)
    check_layer_outputs(layer, X, w, f"b={bits} g={group_size} shared zero")
    paths = ("avx2", "scalar") if qinfer.kernels.cpu_has_avx2() else ("scalar",)
    for path in paths:
        for activations in ("float", "int8"):
            with qinfer.kernels.use_path(path), qinfer.kernels.use_activations(activations):
                for x in (X[0], X[:5], X[:40]):   # qgemv, few rows, the qgemm
                    assert np.array_equal(layer(x), twin(x)), (path, activations, x.shape)
