"""SpqrLinear (qinfer/spqr_linear.py, pyx/spqr.h): the run-time SpQR layer against
references written here: a record packer and a dequantizer that follow the layout
docs/FORMAT.md gives bit by bit, numpy products, and the dense kernels run with the
statistics widened to float32 (the same sums, so equal bit for bit)."""
import numpy as np
import pytest

from qinfer import kernels, packing
from qinfer.errors import ShapeError, UnsupportedError
from qinfer.linear import QuantizedLinear
from qinfer.spqr_linear import SpqrLinear, pack_records

pytestmark = pytest.mark.usefixtures("restore_threads")      # conftest.py


def paths():
    return ("avx2", "scalar") if kernels.cpu_has_avx2() else ("scalar",)


def random_layer(rng, out_f, in_f, bits, group_size, stat_bits=3, outlier_rate=0.01, act_order=False):
    """Stored arrays as the quantizer makes them, drawn at random: codes, scale codes, integer
    zeros, float16 second-level scale and zero per run of 16 rows, and a sorted outlier table."""
    groups, runs = in_f // group_size, -(-out_f // 16)
    codes = rng.integers(0, 2 ** bits, (out_f, in_f))
    scale_codes = rng.integers(0, 2 ** stat_bits, (groups, out_f))
    zeros = rng.integers(0, 2 ** bits, (groups, out_f))
    s2 = (rng.random((groups, runs)) * 0.01 + 0.001).astype(np.float16).astype(np.float32)
    z2 = (rng.random((groups, runs)) * -2.0).astype(np.float16).astype(np.float32)
    where = rng.random((out_f, in_f)) < outlier_rate
    rows = np.concatenate([[0], np.cumsum(where.sum(axis=1))]).astype(np.int32)
    cols = np.nonzero(where)[1].astype(np.uint16)
    vals = (rng.standard_normal(len(cols)) * 0.5).astype(np.float16)
    perm = rng.permutation(in_f).astype(np.int32) if act_order else None
    return dict(codes=codes, scale_codes=scale_codes, zeros=zeros, s2=s2, z2=z2, rows=rows, cols=cols,
                vals=vals, perm=perm, bits=bits, group_size=group_size, stat_bits=stat_bits)


def records_by_loops(a):
    """The records of docs/FORMAT.md, one bit at a time: [runs][groups][planes..., s2, z2]."""
    groups, out_f = a["scale_codes"].shape
    runs, sb, b = -(-out_f // 16), a["stat_bits"], a["bits"]
    rec = np.zeros((runs, groups, sb + b + 2), dtype=np.uint16)
    for run in range(runs):
        for g in range(groups):
            for i in range(16):
                row = run * 16 + i
                if row >= out_f:
                    continue
                for p in range(sb):
                    rec[run, g, p] |= ((int(a["scale_codes"][g, row]) >> p) & 1) << i
                for p in range(b):
                    rec[run, g, sb + p] |= ((int(a["zeros"][g, row]) >> p) & 1) << i
            rec[run, g, sb + b] = np.float16(a["s2"][g, run]).view(np.uint16)
            rec[run, g, sb + b + 1] = np.float16(a["z2"][g, run]).view(np.uint16)
    return rec


def dense_and_weight(a):
    """(dense part, whole weight) float32 [out, in]: scale = s2 * (code - z2) of the row's run,
    w = scale * (q - zero) with input column c in group position(c) // group_size (act-order:
    position in perm), then the outliers added."""
    out_f, in_f = a["codes"].shape
    position = np.arange(in_f) if a["perm"] is None else np.argsort(a["perm"])
    group = position // a["group_size"]
    run = np.arange(out_f) // 16
    scale = a["s2"][:, run] * (a["scale_codes"].astype(np.float32) - a["z2"][:, run])     # [groups, out]
    dense = scale[group].T * (a["codes"].astype(np.float32) - a["zeros"][group].T.astype(np.float32))
    w = dense.copy()
    for r in range(out_f):
        for k in range(a["rows"][r], a["rows"][r + 1]):
            w[r, a["cols"][k]] += np.float32(a["vals"][k])
    return dense.astype(np.float32), w


def outlier_sums(a, x):
    """[n, out] float32: each row's outliers times x as the kernels sum them: entry k of a
    row into partial sum k % 4 (each in table order), then (a0 + a1) + (a2 + a3)."""
    sums = np.zeros((len(x), len(a["rows"]) - 1), dtype=np.float32)
    for r in range(len(a["rows"]) - 1):
        parts = np.zeros((4, len(x)), dtype=np.float32)
        for i, k in enumerate(range(a["rows"][r], a["rows"][r + 1])):
            parts[i % 4] += np.float32(a["vals"][k]) * x[:, a["cols"][k]]
        sums[:, r] = (parts[0] + parts[1]) + (parts[2] + parts[3])
    return sums


def build(a):
    out_f, in_f = a["codes"].shape
    return SpqrLinear(packing.pack(a["codes"].T, a["bits"]), records_by_loops(a), a["rows"], a["cols"], a["vals"],
                      a["bits"], a["group_size"], a["stat_bits"], in_f, out_f, a["perm"])


def test_records_match_a_bit_by_bit_packer():
    rng = np.random.default_rng(1)
    for bits, stat_bits, out_f in [(3, 3, 48), (2, 3, 37), (4, 4, 16), (3, 8, 5)]:
        a = random_layer(rng, out_f, 64, bits, 16, stat_bits)
        got = pack_records(a["scale_codes"], a["zeros"], a["s2"], a["z2"], stat_bits, bits)
        np.testing.assert_array_equal(got, records_by_loops(a))


CASES = [(out_f, in_f, bits, g, act) for (out_f, in_f) in [(16, 64), (37, 128), (200, 256), (96, 1024)]
         for bits in (2, 3, 4) for g in (16, 32, 128) if in_f % g == 0 and in_f > g for act in (False, True)]


@pytest.mark.parametrize("out_f,in_f,bits,group_size,act_order", CASES)
def test_layer_matches_numpy(out_f, in_f, bits, group_size, act_order):
    rng = np.random.default_rng(out_f * 7 + in_f + bits + group_size + act_order)
    a = random_layer(rng, out_f, in_f, bits, group_size, act_order=act_order)
    layer = build(a)
    dense, w = dense_and_weight(a)
    np.testing.assert_array_equal(layer.dequantize(), w)
    for path in paths():
        for n in (1, 5, 40):
            x = rng.standard_normal((n, in_f)).astype(np.float32)
            want = x.astype(np.float64) @ w.T.astype(np.float64)
            for threads in (1, 2):
                with kernels.use_path(path):
                    y = layer(x, threads=threads)
                scale = np.abs(x).astype(np.float64) @ np.abs(w).T.astype(np.float64) + 1e-30
                assert np.max(np.abs(y - want) / scale) < 1e-5, (path, n, threads)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_dense_part_equals_the_dense_kernel_bit_for_bit(bits):
    """Without act-order the SpQR layer's dense part is the dense kernel on float32 scales,
    tile for tile; each row's outlier sum (outlier_sums) is then added to it."""
    rng = np.random.default_rng(bits)
    out_f, in_f = 160, 512
    a = random_layer(rng, out_f, in_f, bits, 16)
    layer = build(a)
    run = np.arange(out_f) // 16
    scales = (a["s2"][:, run] * (a["scale_codes"].astype(np.float32) - a["z2"][:, run])).astype(np.float32)
    plain = QuantizedLinear.from_packed(packing.pack(a["codes"].T, bits), scales, a["zeros"].astype(np.float32),
                                        bits, 16, scale_dtype="float32")
    for path in paths():
        for n in (1, 7):
            x = rng.standard_normal((n, in_f)).astype(np.float32)
            with kernels.use_path(path):
                for threads in (1, 2):
                    want = plain(x, threads=threads) + outlier_sums(a, x)
                    np.testing.assert_array_equal(layer(x, threads=threads), want)


@pytest.mark.parametrize("bits", [2, 4])
def test_int8_activations_round_like_the_dense_layer(bits):
    """With int8 activations the dense part rounds x as the dense int8 kernel does; the
    outliers take x as it is."""
    rng = np.random.default_rng(10 + bits)
    out_f, in_f = 64, 256
    a = random_layer(rng, out_f, in_f, bits, 16)
    layer = build(a)
    if not layer._matrix.has_int8(kernels.active_path() == "avx2"):
        pytest.skip("no int8 kernel for this bitwidth here")
    run = np.arange(out_f) // 16
    scales = (a["s2"][:, run] * (a["scale_codes"].astype(np.float32) - a["z2"][:, run])).astype(np.float32)
    plain = QuantizedLinear.from_packed(packing.pack(a["codes"].T, bits), scales, a["zeros"].astype(np.float32),
                                        bits, 16, scale_dtype="float32")
    x = rng.standard_normal((3, in_f)).astype(np.float32)
    with kernels.use_activations("int8"):
        y, dense = layer(x), plain(x)
    np.testing.assert_array_equal(y, dense + outlier_sums(a, x))


def test_quantizer_result_runs_as_stored():
    """SpqrLinear.from_result: the quantizer's SpqrResult dequantizes to the same weight."""
    from qinfer.quant.spqr import spqr_quantize

    rng = np.random.default_rng(3)
    W = rng.standard_t(6, (48, 128)) * 0.02
    X = rng.standard_normal((256, 128))
    for act_order in (False, True):
        r = spqr_quantize(W, X.T @ X, bits=3, act_order=act_order)
        layer = SpqrLinear.from_result(r)
        np.testing.assert_array_equal(layer.dequantize(), r.dequantize())
        assert layer.bits_per_weight() == pytest.approx(r.bits_per_weight(), rel=1e-12)
        rows, cols, vals = layer.outliers
        np.testing.assert_array_equal(vals, r.outlier_values)
        np.testing.assert_array_equal(cols, r.outlier_cols)


def test_bad_arrays_are_refused():
    rng = np.random.default_rng(4)
    a = random_layer(rng, 32, 64, 3, 16)
    qweight, records = packing.pack(a["codes"].T, 3), records_by_loops(a)
    args = lambda **kw: dict(dict(qweight=qweight, records=records, outlier_rows=a["rows"], outlier_cols=a["cols"],
                                  outlier_vals=a["vals"], bits=3, group_size=16, stat_bits=3, in_features=64,
                                  out_features=32), **kw)
    with pytest.raises(ShapeError, match="row pointers end"):
        SpqrLinear(**args(outlier_cols=a["cols"][:-1], outlier_vals=a["vals"][:-1]))
    with pytest.raises(ShapeError, match="non-decreasing"):
        SpqrLinear(**args(outlier_rows=a["rows"][::-1].copy()))
    with pytest.raises(ShapeError, match="past in_features"):
        SpqrLinear(**args(outlier_cols=np.full_like(a["cols"], 64)))
    with pytest.raises(ShapeError, match="statistics must be"):
        SpqrLinear(**args(records=records[:1]))
    with pytest.raises(ShapeError, match="permutation"):
        SpqrLinear(**args(perm=np.zeros(64, dtype=np.int32)))
    with pytest.raises(UnsupportedError, match="bits"):
        SpqrLinear(**args(bits=5))
