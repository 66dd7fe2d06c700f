"""Binary-coding quantization (qinfer/quant/bcq.py) against references written here: a
loop-by-loop dequantizer, brute-force nearest sign patterns, the uniform-code identity
computed element by element, and the refinement's error round by round."""
import itertools

import numpy as np
import pytest

from qinfer.errors import UnsupportedError
from qinfer.quant.bcq import bcq_quantize, from_uniform


def _weights(out_f=24, in_f=64, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_t(5, (out_f, in_f)) * 0.02 + rng.normal(0, 0.01, (out_f, 1))).astype(np.float32)


def _dequantize_by_loops(r):
    w = np.zeros((r.out_features, r.in_features))
    for o in range(r.out_features):
        for c in range(r.in_features):
            g = c // r.group_size
            w[o, c] = sum(float(r.alphas[g, o, i]) * int(r.planes[i, o, c]) for i in range(r.bits)) \
                + float(r.offsets[g, o])
    return w


@pytest.mark.parametrize("bits, group_size", [(1, 16), (2, 32), (3, 16), (4, 64)])
def test_refinement_never_raises_the_error_and_dequantizes_by_the_formula(bits, group_size):
    W = _weights()
    r = bcq_quantize(W, bits, group_size, rounds=30)
    assert len(r.history) == 31
    assert all(b <= a * (1 + 1e-12) + 1e-18 for a, b in zip(r.history, r.history[1:])), r.history
    assert r.history[-1] < r.history[0]                    # the rounds do improve on greedy
    assert set(np.unique(r.planes)) <= {-1, 1} and r.planes.shape == (bits, 24, 64)
    np.testing.assert_allclose(r.dequantize(), _dequantize_by_loops(r), rtol=1e-5, atol=1e-7)
    # the history's last error is the stored result's (float32 rounding aside)
    err = float(((r.dequantize().astype(np.float64) - W) ** 2).sum())
    assert err == pytest.approx(r.history[-1], rel=1e-3)


def test_each_weight_takes_its_nearest_sign_pattern():
    """After refinement every weight's planes give the nearest of the 2^B values its group can
    represent (brute force over the patterns here)."""
    W = _weights(out_f=6, in_f=32, seed=3)
    r = bcq_quantize(W, 3, 16, rounds=5)
    deq = r.dequantize()
    for o in range(6):
        for g in range(2):
            values = [sum(float(r.alphas[g, o, i]) * s[i] for i in range(3)) + float(r.offsets[g, o])
                      for s in itertools.product((-1, 1), repeat=3)]
            for c in range(16 * g, 16 * g + 16):
                best = min(abs(W[o, c] - v) for v in values)
                assert abs(W[o, c] - deq[o, c]) <= best + 1e-6


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_uniform_codes_convert_exactly(bits):
    rng = np.random.default_rng(bits)
    out_f, in_f, g = 8, 64, 32
    codes = rng.integers(0, 2 ** bits, (out_f, in_f))
    scales = (rng.random((in_f // g, out_f)) * 0.1 + 0.01).astype(np.float32)
    zeros = rng.integers(0, 2 ** bits, (in_f // g, out_f)).astype(np.float32)
    r = from_uniform(codes, scales, zeros, bits, g)
    want = np.empty((out_f, in_f))
    for o in range(out_f):
        for c in range(in_f):
            want[o, c] = float(scales[c // g, o]) * (int(codes[o, c]) - float(zeros[c // g, o]))
    np.testing.assert_allclose(r.dequantize(), want, rtol=1e-6, atol=1e-7)


def test_more_planes_fit_better():
    W = _weights(seed=5)
    errors = [bcq_quantize(W, b, 32).history[-1] for b in (1, 2, 3, 4)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0] / 20


@pytest.mark.parametrize("kwargs, words", [(dict(bits=5), "bit planes"), (dict(bits=0), "bit planes"),
                                           (dict(group_size=48), "group size"), (dict(group_size=1), "group size"),
                                           (dict(rounds=-1), "rounds")])
def test_bad_settings(kwargs, words):
    args = {**dict(bits=3, group_size=32, rounds=2), **kwargs}
    with pytest.raises(UnsupportedError, match=words):
        bcq_quantize(_weights(), args.pop("bits"), **args)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_weights_on_a_uniform_grid_are_found_again(bits):
    """Each group's weights on its own 2^bits-level grid (as a dequantized Q4_1 model's are):
    the fit starts from that grid and keeps it, where the greedy start alone misses it."""
    rng = np.random.default_rng(bits)
    groups, group = 24, 32
    scale = rng.uniform(0.01, 0.1, size=(groups, 1))
    low = rng.uniform(-0.5, 0.0, size=(groups, 1))
    codes = rng.integers(0, 2 ** bits, size=(groups, group))
    codes[:, 0], codes[:, 1] = 0, 2 ** bits - 1                  # each group spans its grid
    w = (low + scale * codes).reshape(4, -1)                      # 4 rows of 6 groups
    r = bcq_quantize(w, bits, group, rounds=3)
    np.testing.assert_allclose(r.dequantize(), w, atol=1e-6)
    assert max(r.history) < 1e-9          # from the start, to rounding
