"""SpQR (Dettmers et al., 2023, arXiv 2306.03078) for one linear layer, in numpy.

GPTQ (gptq.py: the same Hessian, Cholesky factor and column loop) with three
changes that spend the bits differently:

  1. Small groups: a scale and a zero point for every beta1 (`group_size`,
     default 16) consecutive input columns of each output row, by qinfer's
     range rule (quantizer.py, integer zero points; its clip search if asked).
  2. Compressed statistics: the scales of a group are themselves quantized,
     `stat_bits` (default 3) bits each, in runs of beta2 (`stat_group`,
     default 16) consecutive output rows, each run with its own float16
     second-level scale and zero (the grid from the run's smallest scale to
     its largest). The codes are chosen for the scales as stored, so GPTQ's
     error feedback sees the weights the kernels will compute. The zero
     points stay the integers they are, `bits` bits each: a weight's code
     equal to its zero then stands for exactly 0.0, which is what the dense
     part holds where an outlier is.
  3. Outliers: a weight whose quantization would cost more than
     `outlier_threshold` x the layer's typical Hessian-weighted error is kept
     in float16, outside the dense codes, in a compressed-sparse-row table
     (about 1% of the weights or fewer), and added to the dense product. When a
     group comes up, its likely outliers are found first by a leave-one-out
     test (how much the group's Hessian-weighted error falls when the stats
     are fitted without that weight, which is then not quantized) and kept
     out of the group's range; then, column by column, a weight whose scaled
     error (w - q) / U_ii still squares above the threshold becomes an
     outlier. The threshold's unit, as in the paper's code, is the mean over
     columns of var(W[:, j]) / U_jj^2.

Storage per layer (SpqrResult): codes [out, in] at `bits`; scale codes and
zero points [groups, out] at `stat_bits` and `bits`; second-level float16
scale and zero [groups, ceil(out / stat_group)]; outliers as row pointers,
input columns (16 bits) and float16 values. Bits per weight:

    bits + (stat_bits + bits) / beta1 + 32 / (beta1 * beta2) + 32 * outliers / weights

(the row pointers, 4 bytes per output row, and an act-order permutation, 4 bytes per input
column, left out as the paper leaves them, and docs/results.md leaves GPTQ's g_idx).
At 3 bits, beta1 = beta2 = 16 and no outliers: 3.5.
"""
from dataclasses import dataclass

import numpy as np

from ..errors import QinferError, ShapeError, UnsupportedError
from .gptq import BLOCK_SIZE, PreparedHessian
from .quantizer import group_params

DEFAULT_GROUP = 16
DEFAULT_STAT_BITS = 3
DEFAULT_STAT_GROUP = 16
DEFAULT_OUTLIER_THRESHOLD = 0.2


@dataclass
class SpqrResult:
    bits: int
    group_size: int            # beta1: input columns per first-level group
    stat_bits: int
    stat_group: int            # beta2: output rows per second-level group
    codes: np.ndarray          # uint8 [out, in] in [0, 2^bits); an outlier's position holds its row's zero
    scale_codes: np.ndarray    # uint8 [groups, out] in [0, 2^stat_bits)
    scale_scale: np.ndarray    # float32 [groups, ceil(out / stat_group)], exact in float16
    scale_zero: np.ndarray     # float32 [groups, ceil(out / stat_group)], exact in float16
    zeros: np.ndarray          # uint8 [groups, out] in [0, 2^bits): integer zero points
    outlier_rows: np.ndarray   # int32 [out + 1]: row r's outliers are entries rows[r]:rows[r + 1]
    outlier_cols: np.ndarray   # uint16 [n]: their input columns
    outlier_values: np.ndarray  # float16 [n]: their weights
    perm: np.ndarray = None    # act-order: int32 [in], the columns in the order quantized (group
                               # g: perm[g*beta1:(g+1)*beta1]); None: their own order

    @property
    def out_features(self):
        return self.codes.shape[0]

    @property
    def in_features(self):
        return self.codes.shape[1]

    @property
    def n_outliers(self):
        return len(self.outlier_values)

    def scales(self):
        """float32 [groups, out]: the first-level scales as the codes stand for them."""
        return dequantize_stats(self.scale_codes, self.scale_scale, self.scale_zero, self.stat_group)

    def group_of_column(self):
        """int [in]: each input column's group."""
        order = np.arange(self.in_features) if self.perm is None else np.argsort(self.perm)
        return order // self.group_size

    def dense(self):
        """float32 [out, in]: scale * (code - zero), 0.0 where an outlier is."""
        g = self.group_of_column()
        scales, zeros = self.scales(), self.zeros.astype(np.float32)
        return scales[g].T * (self.codes.astype(np.float32) - zeros[g].T)

    def dequantize(self):
        """float32 [out, in]: the dense part plus the outliers."""
        w = self.dense()
        rows = np.repeat(np.arange(self.out_features), np.diff(self.outlier_rows))
        w[rows, self.outlier_cols.astype(np.intp)] += self.outlier_values.astype(np.float32)
        return w

    def bits_per_weight(self):
        """Bits stored per weight, counted from the arrays (module docstring)."""
        bits = (self.codes.size * self.bits + self.scale_codes.size * self.stat_bits + self.zeros.size * self.bits
                + 16 * (self.scale_scale.size + self.scale_zero.size)
                + 16 * (self.outlier_cols.size + self.outlier_values.size))
        return bits / self.codes.size


def check_settings(bits, group_size, stat_bits, stat_group, outlier_threshold):
    if bits not in (2, 3, 4):
        raise UnsupportedError(f"SpQR takes 2, 3 or 4 bits a weight, got {bits!r}")
    if group_size not in (8, 16, 32, 64, 128):
        raise UnsupportedError(f"the SpQR group size (beta1) must be 8, 16, 32, 64 or 128, got {group_size!r}")
    if stat_bits not in (2, 3, 4, 5, 6, 7, 8):
        raise UnsupportedError(f"the statistics' bits must lie in [2, 8], got {stat_bits!r}")
    if not isinstance(stat_group, int) or isinstance(stat_group, bool) or not 2 <= stat_group <= 256:
        raise UnsupportedError(f"the statistics' group (beta2) must be 2 to 256 output rows, got {stat_group!r}")
    if isinstance(outlier_threshold, bool) or not isinstance(outlier_threshold, (int, float)) \
            or np.isnan(outlier_threshold) or outlier_threshold <= 0:
        raise UnsupportedError(f"the outlier threshold must be a number > 0 (inf: no outliers), "
                               f"got {outlier_threshold!r}")


def quantize_stats(values, stat_bits, stat_group):
    """values float32 [out] -> codes uint8 [out], scale and zero float32 [ceil(out / stat_group)]
    (exact in float16), and the values as the codes stand for them: the grid from each run's
    smallest value to its largest (quantizer.py's float zero point)."""
    values = np.asarray(values, dtype=np.float32)
    n = len(values)
    runs = -(-n // stat_group)
    padded = np.empty(runs * stat_group, dtype=np.float32)
    padded[:n] = values
    padded[n:] = values[-1]                       # a short last run: its own last value repeated
    grouped = padded.reshape(runs, stat_group)
    scale, zero = group_params(grouped, stat_bits, sym=False, zero_point="float")
    q = np.clip(np.round(grouped / scale[:, None] + zero[:, None]), 0, 2 ** stat_bits - 1)
    codes = q.astype(np.uint8).reshape(-1)[:n]
    return codes, scale, zero, dequantize_stats(codes[None], scale[None], zero[None], stat_group)[0]


def dequantize_stats(codes, scale, zero, stat_group):
    """codes uint8 [groups, out], scale/zero [groups, runs] -> float32 [groups, out]:
    scale * (code - zero) of each row's run, in float32 as the kernels compute it."""
    run = np.arange(codes.shape[-1]) // stat_group
    return (scale[:, run] * (codes.astype(np.float32) - zero[:, run])).astype(np.float32)


def leave_one_out_gain(w, u_diag, bits):
    """How much each weight of a group w [out, G] would lower its row's Hessian-weighted
    error, sum_j ((w_j - deq w_j) / u_j)^2, by being left out of the quantization (its
    error then 0, and the range fitted to the others): [out, G]."""
    G = w.shape[1]
    maxq = 2 ** bits - 1

    def error(x, u):                              # x [..., k], u [..., k] -> [...]
        scale, zero = group_params(x, bits, sym=False)
        s, z = scale[..., None].astype(np.float64), zero[..., None].astype(np.float64)
        q = np.clip(np.round(x / s) + z, 0, maxq)
        return (((x - s * (q - z)) / u) ** 2).sum(axis=-1)

    others = np.array([[j for j in range(G) if j != k] for k in range(G)])     # [G, G - 1]
    base = error(w, u_diag)                                                    # [out]
    without = error(w[:, others], u_diag[others])                               # [out, G]
    return base[:, None] - without


def spqr_quantize(weight, H, bits=3, group_size=DEFAULT_GROUP, stat_bits=DEFAULT_STAT_BITS,
                  stat_group=DEFAULT_STAT_GROUP, outlier_threshold=DEFAULT_OUTLIER_THRESHOLD, damp=0.01,
                  act_order=False, clip=False, block_size=BLOCK_SIZE):
    """SpQR of a float [out, in] weight -> SpqrResult (module docstring).

    H: the Hessian [in, in] (gptq.Hessian.value), or a PreparedHessian (which then fixes
    damp and act_order: the columns quantized by decreasing Hessian diagonal, each group
    beta1 consecutive columns of that order, as the paper's act-order permutation);
    outlier_threshold: float("inf") keeps no outliers; clip: each group's range by quantizer.py's
    clip search (the min/max range or one shrunk by up to 20%), on the weights left after the
    likely outliers are taken out."""
    check_settings(bits, group_size, stat_bits, stat_group, outlier_threshold)
    prepared = H if isinstance(H, PreparedHessian) else PreparedHessian(H, damp, act_order)
    W = np.array(weight, dtype=np.float64)
    if W.ndim != 2:
        raise ShapeError(f"weight must be 2-D [out, in], got shape {W.shape}")
    n_out, n_in = W.shape
    if prepared.size != n_in:
        raise ShapeError(f"the Hessian must be [{n_in}, {n_in}], got [{prepared.size}, {prepared.size}]")
    if n_in % group_size or block_size % group_size:
        raise UnsupportedError(f"in_features ({n_in}) and the block ({block_size}) must be multiples of "
                               f"the group size {group_size}")
    if n_in > 65536:
        raise UnsupportedError(f"in_features {n_in} is more than an outlier's 16-bit column holds")
    if not np.all(np.isfinite(W)):
        raise QinferError("the weight holds NaN or infinity")
    W[:, prepared.dead] = 0
    perm = prepared.perm
    if perm is not None:
        W = W[:, perm]                             # quantized in this order; put back at the end
    U = prepared.U
    u_diag = np.diag(U)
    maxq = 2 ** bits - 1
    groups, runs = n_in // group_size, -(-n_out // stat_group)

    # the outliers' unit: the mean over columns of each column's variance over U_jj^2
    unit = float(np.mean(W.var(axis=0) / u_diag ** 2))
    threshold = outlier_threshold * unit if np.isfinite(outlier_threshold) else np.inf

    codes = np.empty((n_out, n_in), dtype=np.uint8)
    scale_codes = np.empty((groups, n_out), dtype=np.uint8)
    scale_scale = np.empty((groups, runs), dtype=np.float32)
    scale_zero = np.empty((groups, runs), dtype=np.float32)
    zeros = np.empty((groups, n_out), dtype=np.uint8)
    outliers = []                                  # (row, column, float16 value)
    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        W1 = W[:, i1:i2]                           # a view: updated in place
        U1 = U[i1:i2, i1:i2]
        err = np.zeros((n_out, i2 - i1))
        for i in range(i2 - i1):
            c = i1 + i
            if c % group_size == 0:
                g = c // group_size
                fit = W[:, c:c + group_size].copy()
                if np.isfinite(threshold):         # likely outliers stay out of the range
                    likely = leave_one_out_gain(fit, u_diag[c:c + group_size], bits) > threshold
                    kept = np.maximum((~likely).sum(axis=1, keepdims=True), 1)
                    mean = np.where(likely, 0, fit).sum(axis=1, keepdims=True) / kept
                    fit = np.where(likely, mean, fit)
                scale, zero = group_params(fit, bits, sym=False, clip=clip)
                scale_codes[g], scale_scale[g], scale_zero[g], stored = quantize_stats(scale, stat_bits, stat_group)
                zeros[g] = zero.astype(np.uint8)
                # a run holding a near-zero scale beside large ones may store it as 0.0: the
                # row's group is then all zeros (its codes the zero point)
                s = stored.astype(np.float64)
                s_nonzero = np.where(s > 0, s, 1.0)
                z = zero.astype(np.float64)
            w = W1[:, i]
            q = np.clip(np.round(w / s_nonzero) + z, 0, maxq)
            deq = s * (q - z)
            e = (w - deq) / U1[i, i]
            if np.isfinite(threshold):
                out = np.flatnonzero(e ** 2 > threshold)
                if len(out):
                    kept16 = w[out].astype(np.float16)
                    q[out], deq[out] = z[out], kept16.astype(np.float64)
                    e[out] = (w[out] - deq[out]) / U1[i, i]
                    outliers.extend(zip(out.tolist(), [c] * len(out), kept16.tolist()))
            codes[:, c] = q
            W1[:, i:] -= np.outer(e, U1[i, i:])
            err[:, i] = e
        W[:, i2:] -= err @ U[i1:i2, i2:]

    if perm is not None:                           # columns and outliers back in the weight's order
        codes = np.ascontiguousarray(codes[:, np.argsort(perm)])
        outliers = [(r, int(perm[c]), v) for r, c, v in outliers]
    outliers.sort()
    rows = np.array([r for r, _, _ in outliers], dtype=np.int64)
    return SpqrResult(bits, group_size, stat_bits, stat_group, codes, scale_codes, scale_scale, scale_zero,
                      zeros,
                      outlier_rows=np.searchsorted(rows, np.arange(n_out + 1)).astype(np.int32),
                      outlier_cols=np.array([c for _, c, _ in outliers], dtype=np.uint16),
                      outlier_values=np.array([v for _, _, v in outliers], dtype=np.float16),
                      perm=None if perm is None else np.ascontiguousarray(perm, dtype=np.int32))
