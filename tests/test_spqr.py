"""SpQR's quantizer (qinfer/quant/spqr.py) against references written here: a loop-by-loop
dequantizer with its own compressed-sparse-row add, the bits formula of the paper,
a brute-force leave-one-out, and GPTQ's error on the same layer and Hessian."""
import numpy as np
import pytest

from qinfer.errors import UnsupportedError
from qinfer.quant.gptq import gptq_quantize, output_error
from qinfer.quant.quantizer import group_params
from qinfer.quant.spqr import leave_one_out_gain, spqr_quantize


def _layer(n_out=64, n_in=128, planted=0.004, seed=0):
    """Heavy-tailed weights (Student t, 8 degrees of freedom) with a few planted large ones,
    and the Hessian of inputs whose channels differ in scale, as a transformer's do."""
    rng = np.random.default_rng(seed)
    W = rng.standard_t(8, (n_out, n_in)) * 0.02
    where = rng.random(W.shape) < planted
    W[where] = rng.choice([-0.3, 0.3], where.sum())        # ten of the weights' deviations
    X = rng.standard_normal((1024, n_in)) * np.exp(0.7 * rng.standard_normal(n_in))
    return W, 2 * X.T @ X / len(X), where


def _dequantize_by_loops(r):
    """The stored layer, element by element: scale = s2 * (code - z2) of the row's run of
    beta2 rows, weight = scale * (code - zero), then each row's outliers added."""
    w = np.zeros((r.out_features, r.in_features), dtype=np.float32)
    position = list(range(r.in_features)) if r.perm is None else {int(c): k for k, c in enumerate(r.perm)}
    for o in range(r.out_features):
        run = o // r.stat_group
        for i in range(r.in_features):
            g = position[i] // r.group_size        # act-order: groups of consecutive quantized columns
            scale = np.float32(r.scale_scale[g, run]) * (np.float32(r.scale_codes[g, o]) - np.float32(r.scale_zero[g, run]))
            w[o, i] = scale * (np.float32(r.codes[o, i]) - np.float32(r.zeros[g, o]))
        for k in range(r.outlier_rows[o], r.outlier_rows[o + 1]):
            w[o, int(r.outlier_cols[k])] += np.float32(r.outlier_values[k])
    return w


@pytest.mark.parametrize("act_order", [False, True])
def test_dequantized_weights_match_a_loop_reference(act_order):
    W, H, _ = _layer(n_out=40, n_in=64)     # 40 rows: a short last run of beta2 = 16
    r = spqr_quantize(W, H, bits=3, act_order=act_order)
    if act_order:
        assert sorted(r.perm.tolist()) == list(range(64)) and r.perm.tolist() != list(range(64))
        assert np.all(np.diff(np.diag(H)[r.perm]) <= 0), "columns by decreasing Hessian diagonal"
    assert r.n_outliers > 0
    np.testing.assert_allclose(r.dequantize(), _dequantize_by_loops(r), rtol=1e-6, atol=0)
    assert r.codes.max() < 8 and r.scale_codes.max() < 8 and r.zeros.max() < 8


@pytest.mark.parametrize("bits, stat_bits, beta1, beta2", [(3, 3, 16, 16), (2, 3, 16, 16), (4, 3, 32, 8),
                                                           (3, 4, 16, 32)])
def test_bits_per_weight_follow_the_formula(bits, stat_bits, beta1, beta2):
    W, H, _ = _layer(n_out=64, n_in=128)
    r = spqr_quantize(W, H, bits=bits, group_size=beta1, stat_bits=stat_bits, stat_group=beta2)
    outlier_rate = r.n_outliers / W.size
    formula = bits + (stat_bits + bits) / beta1 + 32 / (beta1 * beta2) + 32 * outlier_rate
    assert r.bits_per_weight() == pytest.approx(formula, rel=1e-12)
    plain = spqr_quantize(W, H, bits=3, outlier_threshold=float("inf"))
    assert plain.n_outliers == 0 and plain.bits_per_weight() == 3.5


@pytest.mark.parametrize("act_order", [False, True])
def test_outliers_are_the_planted_weights_kept_in_float16(act_order):
    W, H, planted = _layer(n_out=64, n_in=128, planted=0.004)
    r = spqr_quantize(W, H, bits=3, outlier_threshold=1.0, act_order=act_order)
    rows = np.repeat(np.arange(r.out_features), np.diff(r.outlier_rows))
    cols = r.outlier_cols.astype(int)
    assert 0 < r.n_outliers <= 0.01 * W.size
    # the dense part holds exactly 0.0 there (the code is the row's zero point) ...
    assert np.all(r.dense()[rows, cols] == 0.0)
    # ... and the outlier's float16 value is the whole weight
    np.testing.assert_array_equal(r.dequantize()[rows, cols], r.outlier_values.astype(np.float32))
    # in the weight's own order most planted weights are found (GPTQ's updates move the later
    # columns a little first); act-order takes the columns that matter most first, and the
    # error its outliers leave is what the error test checks
    found = np.zeros_like(planted)
    found[rows, cols] = True
    assert (found & planted).sum() >= (0.85 if not act_order else 0.4) * planted.sum()
    # entries sorted by row, then column
    assert np.all(np.diff(rows * r.in_features + cols) > 0)


def test_error_beats_gptq_g16_with_fewer_bits():
    W, H, _ = _layer(n_out=64, n_in=256, seed=1)
    spqr = spqr_quantize(W, H, bits=3, outlier_threshold=1.0)
    plain = spqr_quantize(W, H, bits=3, outlier_threshold=float("inf"))
    gptq = gptq_quantize(W, H, 3, group_size=16)
    gptq_bits = 3 + (16 + 3) / 16            # a float16 scale and a 3-bit zero per group of 16
    assert spqr.bits_per_weight() < gptq_bits and plain.bits_per_weight() < gptq_bits
    wide = spqr_quantize(W, H, bits=3, stat_bits=8, outlier_threshold=float("inf"))
    ordered = spqr_quantize(W, H, bits=3, outlier_threshold=1.0, act_order=True)
    clipped = spqr_quantize(W, H, bits=3, outlier_threshold=float("inf"), clip=True)
    np.testing.assert_allclose(clipped.dequantize(), _dequantize_by_loops(clipped), rtol=1e-6, atol=0)
    assert output_error(W, clipped.dequantize(), H) < 1.1 * output_error(W, plain.dequantize(), H)
    assert output_error(W, ordered.dequantize(), H) < 0.7 * output_error(W, gptq_quantize(
        W, H, 3, group_size=16, act_order=True).dequantize(), H)
    e_spqr, e_plain, e_wide, e_gptq = (output_error(W, x.dequantize(), H) for x in (spqr, plain, wide, gptq))
    assert e_spqr < 0.7 * e_gptq, (e_spqr, e_gptq)
    assert e_plain < 1.15 * e_wide, (e_plain, e_wide)     # 3-bit scales cost ~10% of error against 8-bit ones


def test_leave_one_out_gain_against_brute_force():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((5, 8))
    w[2, 3] = 9.0
    u = rng.uniform(0.5, 2.0, 8)

    def err(x, uu):
        scale, zero = group_params(x[None], 3, sym=False)
        s, z = float(scale[0]), float(zero[0])
        q = np.clip(np.round(x / s) + z, 0, 7)
        return float((((x - s * (q - z)) / uu) ** 2).sum())

    got = leave_one_out_gain(w, u, 3)
    for r in range(5):
        for k in range(8):
            keep = [j for j in range(8) if j != k]
            assert got[r, k] == pytest.approx(err(w[r], u) - err(w[r, keep], u[keep]), rel=1e-9, abs=1e-12)
    assert got[2].argmax() == 3


@pytest.mark.parametrize("kwargs, word", [
    (dict(outlier_threshold=0), "threshold"), (dict(outlier_threshold=-1.0), "threshold"),
    (dict(outlier_threshold=float("nan")), "threshold"), (dict(bits=5), "bits"),
    (dict(group_size=24), "group size"), (dict(stat_bits=1), "statistics"), (dict(stat_group=1), "statistics"),
])
def test_bad_settings_are_refused(kwargs, word):
    W, H, _ = _layer(n_out=16, n_in=32)
    with pytest.raises(UnsupportedError, match=word):
        spqr_quantize(W, H, **kwargs)
