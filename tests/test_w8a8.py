"""The int8-activation kernels of 8- and 4-bit weights (pyx/w8a8.h) and Int8Linear
(qinfer/int8_linear.py).

* Per-token rounding: each row of x to int8 with d = max|x| / 127, half to even, against a
  numpy reference written here.
* The product: exact integer dot products per group, then the float steps in one order,
  equal bit for bit to this file's numpy reference, on every instruction set this CPU has,
  at 1 and 2 threads, for row counts that hit every loop's tail, groups from 4 (8) inputs to
  whole rows, outputs that do not fill the last tile, and codes at both ends (-128 and 127;
  4-bit: -8 and 7).
* Int8Linear: the kernel settings (scalar path, int8 instruction set) pick the loops; from
  GPTQ tensors of 8-bit symmetric codes it holds the same weights; stacking and splitting.
"""
import numpy as np
import pytest

from qinfer import _w8a8, kernels
from qinfer.errors import FormatError, ShapeError, UnsupportedError
from qinfer.int8_linear import Int8Linear, kernel_isa

ISAS = _w8a8.cpu_isas()


def round_per_token(x):
    """q int64 [n, in], d float32 [n]: d = max|x| / 127 (float32), q = round(x * (1 / d)) half to even."""
    x = np.asarray(x, dtype=np.float32)
    d = np.float32(np.abs(x).max(axis=1)) / np.float32(127)
    d = d.astype(np.float32)
    inv = np.zeros_like(d)
    inv[d > 0] = np.float32(1) / d[d > 0]
    v = (x * inv[:, None]).astype(np.float32)
    return np.clip(np.rint(v), -127, 127).astype(np.int64), d


def reference(codes, scales, group, x):
    """y float32 [n, out]: per group g in order acc += s_g * float(dot_g) (each rounded to float32),
    then y = acc * d."""
    q, d = round_per_token(x)
    c = codes.astype(np.int64)
    acc = np.zeros((x.shape[0], codes.shape[0]), np.float32)
    for g in range(codes.shape[1] // group):
        cols = slice(g * group, (g + 1) * group)
        dot = q[:, cols] @ c[:, cols].T                                   # exact
        assert np.abs(dot).max(initial=0) < 2 ** 31
        acc = (acc + (scales[None, :, g] * dot.astype(np.float32)).astype(np.float32)).astype(np.float32)
    return (acc * d[:, None]).astype(np.float32)


def random_layer(rng, out_f, in_f, group, bits=8):
    top = 2 ** (bits - 1)
    codes = rng.integers(-top, top, size=(out_f, in_f)).astype(np.int8)
    codes[0, :] = -top                    # both ends of the code range
    codes[-1, :] = top - 1
    scales = (rng.random((out_f, in_f // group)) * 0.01 + 1e-4).astype(np.float32)
    return codes, scales


def test_per_token_rounding_matches_the_reference():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((7, 200)) * rng.uniform(0.01, 100, size=(7, 1))).astype(np.float32)
    x[3] = 0.0                                        # an all-zero row: d = 0, codes 0
    x[4, :5] = [127.0, -127.0, 0.5, 1.5, -2.5]        # exact ties round half to even
    q, d = _w8a8.quantize_rows(x)
    want_q, want_d = round_per_token(x)
    assert q.dtype == np.int8 and d.dtype == np.float32
    np.testing.assert_array_equal(q, want_q)
    np.testing.assert_array_equal(d, want_d)
    assert d[3] == 0 and not q[3].any()
    np.testing.assert_array_equal(q[4, :5], [127, -127, 0, 2, -2])
    assert np.abs(q).max() == 127 and (np.abs(q).max(axis=1)[d > 0] == 127).all()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("out_f,in_f,group", [(37, 64, 64), (96, 576, -1), (100, 1536, 128), (16, 32, 8),
                                              (5, 256, 16)])
def test_product_is_exact_integer_arithmetic_on_every_path(out_f, in_f, group, bits):
    rng = np.random.default_rng(out_f + in_f)
    g = in_f if group == -1 else group
    codes, scales = random_layer(rng, out_f, in_f, g, bits)
    for n in (1, 3, 4, 8, 9, 17):                     # the loops take 8 (AVX-512) or 4 (AVX2) rows a pass
        x = (rng.standard_normal((n, in_f)) * 3).astype(np.float32)
        want = reference(codes, scales, g, x)
        for isa in ISAS:
            m = _w8a8.Int8Matrix(codes, scales, g, isa, 1, bits)
            for threads in (1, 2):
                y = np.full((n, out_f), np.nan, np.float32)
                m.matmul(x, y, threads)
                np.testing.assert_array_equal(y, want, err_msg=f"{isa}, {threads} thread(s), {n} rows")


AMX_MODES = ["model"] + (["tiles"] if _w8a8.amx_available() else [])


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("amx", AMX_MODES)
@pytest.mark.parametrize("out_f,in_f,group", [(37, 64, 64), (96, 576, -1), (200, 1536, 128), (48, 256, 64)])
def test_amx_loop_is_exact_integer_arithmetic(out_f, in_f, group, bits, amx):
    """The AMX-INT8 loop (pyx/w8a8_amx.h) on its C model of the tiles here, and on the tiles
    where the CPU has them: the reference's bits, for row counts around its 16- and 32-row
    blocks, tile counts odd and even, outputs that do not fill the last tile; fewer than 16
    rows keep the vector loops."""
    rng = np.random.default_rng(out_f * in_f + bits)
    g = in_f if group == -1 else group
    codes, scales = random_layer(rng, out_f, in_f, g, bits)
    m = _w8a8.Int8Matrix(codes, scales, g, ISAS[0], 2, bits)
    m.amx = amx
    assert m.amx == amx
    for n in (1, 15, 16, 17, 31, 32, 45, 64):
        x = (rng.standard_normal((n, in_f)) * 3).astype(np.float32)
        x[0, :] = 0.0                                  # a zero row (d = 0) beside the others
        want = reference(codes, scales, g, x)
        for threads in (1, 2):
            y = np.full((n, out_f), np.nan, np.float32)
            m.matmul(x, y, threads)
            np.testing.assert_array_equal(y, want, err_msg=f"amx {amx}, {threads} thread(s), {n} rows")


def test_amx_loop_with_low_rank_and_settings():
    rng = np.random.default_rng(5)
    codes, scales = random_layer(rng, 40, 128, 64)
    lr = (rng.standard_normal((4, 128)).astype(np.float32) * 0.1, rng.standard_normal((40, 4)).astype(np.float32))
    x = rng.standard_normal((33, 128)).astype(np.float32)
    y = {}
    for amx in ("off", "model"):
        m = _w8a8.Int8Matrix(codes, scales, 64, ISAS[0], 1, 8, lr)
        m.amx = amx
        y[amx] = np.empty((33, 40), np.float32)
        m.matmul(x, y[amx], 2)
    np.testing.assert_array_equal(y["model"], y["off"])     # the low-rank term added the same way
    m = _w8a8.Int8Matrix(codes, scales, 64, ISAS[0], 1, 8)
    with pytest.raises(ValueError, match="amx must be one of"):
        m.amx = "bf16"
    if not _w8a8.amx_available():
        with pytest.raises(ValueError, match="no AMX-INT8 tiles"):
            m.amx = "tiles"
    # groups of 32 inputs (not a tile row): the vector loops run, the same bits
    codes32, scales32 = random_layer(rng, 20, 128, 32)
    x = rng.standard_normal((20, 128)).astype(np.float32)
    m = _w8a8.Int8Matrix(codes32, scales32, 32, ISAS[0], 1, 8)
    m.amx = "model"
    out = np.empty((20, 20), np.float32)
    m.matmul(x, out, 1)
    np.testing.assert_array_equal(out, reference(codes32, scales32, 32, x))


def test_layout_round_trips_and_isa_choice():
    rng = np.random.default_rng(3)
    for bits in (8, 4):
        codes, scales = random_layer(rng, 40, 128, 32, bits)
        m = _w8a8.Int8Matrix(codes, scales, 32, ISAS[-1], 1, bits)
        np.testing.assert_array_equal(m.codes(), codes)
        np.testing.assert_array_equal(m.scales(), scales)
        assert m.nbytes >= 48 * 128 * bits // 8
    codes, scales = random_layer(rng, 40, 128, 32)
    with pytest.raises(ValueError, match="groups"):
        _w8a8.Int8Matrix(codes, scales, 4, "portable", 1, 4)          # 4-bit steps are 8 inputs
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        _w8a8.Int8Matrix(codes, scales, 32, "portable", 1, 4)
    assert ISAS[-1] == "portable" and ISAS[0] in ("avx512vnni", "avx2", "portable")
    with pytest.raises(ValueError, match="isa"):
        _w8a8.Int8Matrix(codes, scales, 32, "sse9")
    for bad_group in (0, 3, 48, 256):
        with pytest.raises(ValueError, match="groups"):
            _w8a8.Int8Matrix(codes, scales, bad_group, "portable")


def test_kernel_settings_pick_the_loops():
    layer = Int8Linear(*random_layer(np.random.default_rng(4), 20, 64, 64))
    with kernels.use_path("scalar"):
        assert kernel_isa() == "portable"
    if kernels.active_path() == "avx2":
        with kernels.use_int8_isa("avx2"):
            assert kernel_isa() == "avx2"
        if "avx512vnni" in ISAS:
            with kernels.use_int8_isa("avx512vnni"):
                assert kernel_isa() == "avx512vnni"
    x = np.random.default_rng(5).standard_normal((3, 64)).astype(np.float32)
    want = reference(layer.codes(), layer.scales(), 64, x)
    with kernels.use_path("scalar"):
        np.testing.assert_array_equal(layer(x), want)
        assert layer.isa == "portable"
    np.testing.assert_array_equal(layer(x), want)
    np.testing.assert_array_equal(layer(x[1]), want[1])


def pack_words(codes_in_out, bits):
    """GPTQ qweight int32 [in * bits / 32, out]: 32 / bits codes a word, row r at bits bits * (r % (32 / bits))."""
    per = 32 // bits
    u = codes_in_out.astype(np.uint32)
    words = np.zeros((u.shape[0] // per, u.shape[1]), np.uint32)
    for i in range(per):
        words |= u[i::per] << np.uint32(bits * i)
    return words.view(np.int32)


@pytest.mark.parametrize("bits", [8, 4])
def test_from_gptq_tensors_of_symmetric_codes(bits):
    rng = np.random.default_rng(6)
    out_f, in_f, group, mid = 24, 128, 64, 2 ** (bits - 1)
    stored = rng.integers(0, 2 ** bits, size=(in_f, out_f)).astype(np.uint8)        # codes c + mid
    scales = (rng.random((in_f // group, out_f)) * 0.01).astype(np.float32)
    zeros = np.full_like(scales, mid)
    layer = Int8Linear.from_packed(pack_words(stored, bits), scales, zeros, bits, group)
    assert layer.bits == bits
    np.testing.assert_array_equal(layer.codes(), (stored.astype(np.int16) - mid).T)
    want_w = np.repeat(scales.T, group, axis=1) * (stored.T.astype(np.float32) - mid)
    np.testing.assert_allclose(layer.dequantize(), want_w, rtol=0, atol=0)
    x = rng.standard_normal((3, in_f)).astype(np.float32)
    np.testing.assert_array_equal(layer(x), reference(layer.codes(), layer.scales(), group, x))
    with pytest.raises(FormatError, match=f"zero point {mid}"):
        Int8Linear.from_packed(pack_words(stored, bits), scales, zeros + 1, bits, group, name="blk.q")
    with pytest.raises(FormatError, match="act-order"):
        Int8Linear.from_packed(pack_words(stored, bits), scales, zeros, bits, group,
                               g_idx=np.arange(in_f)[::-1] // group)
    with pytest.raises(FormatError, match="8- or 4-bit"):
        Int8Linear.from_packed(pack_words(stored % 4, 2), scales, zeros, 2, group)
    with pytest.raises(UnsupportedError, match="groups"):
        Int8Linear(np.zeros((4, 30), np.int8), np.ones((4, 1), np.float32), -1)
    with pytest.raises(ShapeError):
        Int8Linear(np.zeros((4, 32), np.int8), np.ones((4, 2), np.float32), -1)


def test_stack_and_split():
    rng = np.random.default_rng(7)
    parts = [Int8Linear(*random_layer(rng, n, 64, 32), 32) for n in (48, 16, 16)]
    whole = Int8Linear.stack(parts)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_array_equal(whole(x), np.concatenate([p(x) for p in parts], axis=1))
    for a, b in zip(whole.split([48, 16, 16]), parts):
        np.testing.assert_array_equal(a.codes(), b.codes())
        np.testing.assert_array_equal(a.scales(), b.scales())
    with pytest.raises(UnsupportedError, match="cannot stack"):
        Int8Linear.stack([parts[0], Int8Linear(*random_layer(rng, 8, 64, 64), 64)])
    with pytest.raises(UnsupportedError, match="cannot stack"):
        Int8Linear.stack([parts[0], Int8Linear(*random_layer(rng, 8, 64, 32, 4), 32, 4)])
