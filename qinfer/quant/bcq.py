"""Binary-coding quantization (BCQ; Xu et al. 2018, as LUT-GEMM uses it: Park et al.,
arXiv 2206.09557), in numpy.

Each group of `group_size` consecutive weights of an output row is written as

    w  ~  alpha_1 b_1 + ... + alpha_B b_B + offset,      b_i in {-1, +1}^group_size

with B = `bits` planes, a float scale alpha_i per plane and an offset per group and
row. A lookup-table kernel multiplies by the planes without unpacking codes: for a
chunk of activations it tabulates every signed sum once, and each plane's bits index
that table.

Started from the better, group by group, of two fits: the greedy one (offset =
the group's mean; then plane by plane b_i = sign(r), alpha_i = mean |r| of the
residual r), and the group's min/max uniform grid written as binary coding
(round to nearest's codes, `from_uniform`'s identity: on weights that lie on
such a grid, as a dequantized Q4_1 model's do, the greedy start misses it and
ALS does not find it again: SmolLM2's down_proj at 4 planes in groups of 32,
squared error 81.6 against 6e-12). Then refined by alternating least squares:
given the planes, the alphas and offset that minimise the group's squared error
(a least-squares solve); given those, each weight's signs that bring it nearest (all
2^B sign patterns tried). Neither step can raise the error, so the rounds never do
(`history`). The seed runs 30 rounds.

Uniform b-bit codes are a special case: q = sum_i 2^i c_i with c_i = (b_i + 1) / 2,
so w = s (q - z) = sum_i (s 2^(i-1)) b_i + s ((2^B - 1) / 2 - z): alpha_i = s 2^(i-1),
offset = s ((2^B - 1) / 2 - z) (`from_uniform`), exactly.
"""
from dataclasses import dataclass

import numpy as np

from ..errors import QinferError, ShapeError, UnsupportedError

BCQ_BITS = (1, 2, 3, 4)
DEFAULT_ROUNDS = 30


@dataclass
class BcqResult:
    bits: int
    group_size: int
    planes: np.ndarray     # int8 [bits, out, in], each -1 or +1
    alphas: np.ndarray     # float32 [groups, out, bits]
    offsets: np.ndarray    # float32 [groups, out]
    history: list = None   # the squared error before refinement and after each round

    @property
    def out_features(self):
        return self.planes.shape[1]

    @property
    def in_features(self):
        return self.planes.shape[2]

    def dequantize(self):
        """float32 [out, in]: sum_i alpha_i b_i + offset, group by group."""
        groups = self.in_features // self.group_size
        b = self.planes.reshape(self.bits, self.out_features, groups, self.group_size).astype(np.float32)
        a = self.alphas.transpose(2, 1, 0)[..., None]                  # [bits, out, groups, 1]
        w = (a * b).sum(axis=0) + self.offsets.T[..., None]
        return w.reshape(self.out_features, self.in_features).astype(np.float32)


def check_settings(bits, group_size, in_features, rounds=0):
    if isinstance(bits, bool) or bits not in BCQ_BITS:
        raise UnsupportedError(f"BCQ takes {', '.join(map(str, BCQ_BITS))} bit planes, got {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 \
            or in_features % group_size:
        raise UnsupportedError(f"the BCQ group size must be an integer >= 2 dividing in_features "
                               f"({in_features}), got {group_size!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise UnsupportedError(f"refinement rounds must be an integer >= 0, got {rounds!r}")


def sign_patterns(bits):
    """float64 [2^bits, bits]: every choice of signs, pattern p's plane i = +1 where bit i of p is set."""
    p = np.arange(2 ** bits)[:, None]
    return np.where((p >> np.arange(bits)) & 1, 1.0, -1.0)


def _fit_scales(w, b):
    """Least-squares alphas and offset for fixed planes: w [N, G], b [N, G, B] -> [N, B], [N]."""
    design = np.concatenate([b, np.ones(b.shape[:2] + (1,))], axis=2)          # [N, G, B + 1]
    # the min-norm least-squares solution pinv(D) w, as pinv(D^T D) D^T w: the same
    # numbers from (B+1) x (B+1) matrices instead of G x (B+1) ones (~10x faster at G 128)
    dt = design.transpose(0, 2, 1)
    gram, rhs = dt @ design, dt @ w[:, :, None]
    coef = (np.linalg.pinv(gram, hermitian=True) @ rhs)[:, :, 0]
    return coef[:, :-1], coef[:, -1]


def _nearest_signs(w, alphas, offsets):
    """For each weight, the sign pattern whose value sum_i alpha_i b_i + offset is nearest: [N, G, B]."""
    patterns = sign_patterns(alphas.shape[1])                                  # [P, B]
    values = alphas @ patterns.T + offsets[:, None]                            # [N, P]
    pick = np.abs(w[:, :, None] - values[:, None, :]).argmin(axis=2)           # [N, G]
    return patterns[pick]


def _error(w, b, alphas, offsets):
    return float((((b * alphas[:, None, :]).sum(axis=2) + offsets[:, None] - w) ** 2).sum())


def _greedy(w, bits):
    """(planes [N, G, B], alphas [N, B], offsets [N]): offset the mean, then each plane the
    residual's signs scaled by its mean magnitude."""
    offsets = w.mean(axis=1)
    r = w - offsets[:, None]
    b = np.empty(w.shape + (bits,))
    alphas = np.empty((len(w), bits))
    for i in range(bits):
        b[:, :, i] = np.where(r >= 0, 1.0, -1.0)
        alphas[:, i] = np.abs(r).mean(axis=1)
        r = r - alphas[:, i, None] * b[:, :, i]
    return b, alphas, offsets


def _uniform_grid(w, bits):
    """The same, from each group's 2^bits-level grid over its min..max, rounded to nearest:
    q = sum_i 2^i c_i, c_i = (b_i + 1) / 2, so alpha_i = s 2^(i-1), offset = min + s (2^B - 1) / 2."""
    lo, hi = w.min(axis=1), w.max(axis=1)
    levels = 2 ** bits - 1
    s = (hi - lo) / levels
    s = np.where(s > 0, s, 1.0)                   # a constant group: every code 0, the offset is the value
    q = np.clip(np.rint((w - lo[:, None]) / s[:, None]), 0, levels).astype(np.int64)
    b = np.stack([np.where((q >> i) & 1, 1.0, -1.0) for i in range(bits)], axis=2)
    alphas = s[:, None] * 2.0 ** (np.arange(bits) - 1)
    return b, np.where((hi > lo)[:, None], alphas, 0.0), lo + np.where(hi > lo, s * levels / 2, 0.0)


def _better(w, first, second):
    """Group by group, whichever of two (planes, alphas, offsets) fits w with less squared error."""
    def errors(fit):
        b, a, o = fit
        return (((b * a[:, None, :]).sum(axis=2) + o[:, None] - w) ** 2).sum(axis=1)

    pick = errors(second) < errors(first)
    return (np.where(pick[:, None, None], second[0], first[0]), np.where(pick[:, None], second[1], first[1]),
            np.where(pick, second[2], first[2]))


def bcq_quantize(weight, bits, group_size=128, rounds=DEFAULT_ROUNDS):
    """BCQ of a float [out, in] weight -> BcqResult (module docstring)."""
    W = np.asarray(weight, dtype=np.float64)
    if W.ndim != 2:
        raise ShapeError(f"weight must be 2-D [out, in], got shape {W.shape}")
    out_f, in_f = W.shape
    check_settings(bits, group_size, in_f, rounds)
    if not np.all(np.isfinite(W)):
        raise QinferError("the weight holds NaN or infinity")
    groups = in_f // group_size
    w = W.reshape(out_f * groups, group_size)                                   # row-major: [out][group]

    b, alphas, offsets = _better(w, _greedy(w, bits), _uniform_grid(w, bits))
    history = [_error(w, b, alphas, offsets)]
    for _ in range(rounds):                                                     # alternating least squares
        alphas, offsets = _fit_scales(w, b)
        b = _nearest_signs(w, alphas, offsets)
        history.append(_error(w, b, alphas, offsets))

    planes = b.reshape(out_f, groups, group_size, bits).transpose(3, 0, 1, 2).reshape(bits, out_f, in_f)
    return BcqResult(bits, group_size, planes.astype(np.int8),
                     alphas.reshape(out_f, groups, bits).transpose(1, 0, 2).astype(np.float32),
                     offsets.reshape(out_f, groups).T.astype(np.float32), history)


def from_uniform(codes, scales, zeros, bits, group_size):
    """Uniform codes [out, in] in [0, 2^bits) with scale and zero [groups, out] (w = s (q - z))
    -> the BcqResult of the same weights: alpha_i = s 2^(i-1), offset = s ((2^bits - 1)/2 - z)."""
    codes = np.asarray(codes)
    out_f, in_f = codes.shape
    check_settings(bits, group_size, in_f)
    if codes.min(initial=0) < 0 or codes.max(initial=0) >= 2 ** bits:
        raise ShapeError(f"codes must lie in [0, {2 ** bits})")
    scales, zeros = np.asarray(scales, dtype=np.float64), np.asarray(zeros, dtype=np.float64)
    planes = np.stack([np.where((codes >> i) & 1, 1, -1) for i in range(bits)]).astype(np.int8)
    alphas = scales[..., None] * 2.0 ** (np.arange(bits) - 1)                   # [groups, out, bits]
    offsets = scales * ((2 ** bits - 1) / 2 - zeros)
    return BcqResult(bits, group_size, planes, alphas.astype(np.float32), offsets.astype(np.float32))
