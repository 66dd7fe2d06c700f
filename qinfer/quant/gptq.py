"""GPTQ (Frantar et al., 2023) for one linear layer, in numpy.

Given the layer's weight W [out, in] and the Hessian of its reconstruction
error H = 2/N * sum_t x_t x_t^T over N calibration inputs x_t [in], the
columns of W are quantized one at a time; after each, the error it made is
spread over the columns not yet quantized so that ||W X - Q X||^2 stays
small (the Optimal Brain Surgeon update, with the inverse Hessian taken
from its Cholesky factor).

Steps, as in the paper:
  1. dead inputs (H_ii = 0: never nonzero in the calibration data) get
     H_ii = 1 and their weights are set to 0;
  2. act-order (optional): columns in order of decreasing H_ii;
  3. dampening: H += damp * mean(diag H) * I (retried with 10x more if the
     Cholesky factorization still fails);
  4. U = the upper Cholesky factor of H^-1 (H^-1 = U^T U);
  5. blocks of 128 columns: inside a block each column is quantized and its
     scaled error e = (w - q) / U_ii updates the rest of the block at once
     (W[:, j] -= e * U[i, j]); the columns after the block get all of the
     block's updates in one matrix product (lazy batch updates);
  6. a group's scale and zero are chosen when its first column comes up,
     from the current (error-updated) weights of its columns. With
     act-order, groups are runs of consecutive columns in the permuted
     order and g_idx records each input row's group; with static groups
     they are computed up front from the original weights of contiguous
     rows, so g_idx stays trivial and the kernel needs no permutation.

Everything is float64; the group parameters come from quantizer.py
(float16 scales).
"""
import numpy as np

from ..errors import QinferError, ShapeError
from . import layout
from .quantizer import check_settings, group_params
from .result import QuantResult

BLOCK_SIZE = 128
MAX_DAMP_RETRIES = 6


class Hessian:
    """Accumulates H = 2/N * sum x x^T over batches of inputs [n, in] (float64 sums)."""

    def __init__(self, in_features):
        self.sum = np.zeros((in_features, in_features), dtype=np.float64)
        self.count = 0

    def add(self, x, weight=1.0):
        """Add the inputs x [n, in], each counted `weight` times."""
        x = np.asarray(x, dtype=np.float32)
        # One float32 product per batch (BLAS), summed across batches in float64.
        self.sum += weight * (x.T @ x).astype(np.float64)
        self.count += weight * x.shape[0]

    @property
    def value(self):
        if self.count == 0:
            raise QinferError("no calibration inputs were collected")
        return self.sum * (2.0 / self.count)


def output_error(weight, result_weight, H):
    """tr((W - Q) H (W - Q)^T): proportional to ||W X - Q X||^2 over the calibration inputs."""
    d = np.asarray(weight, dtype=np.float64) - np.asarray(result_weight, dtype=np.float64)
    return float(np.einsum("ij,ij->", d @ H, d))


def inverse_cholesky(H, damp):
    """Upper U with (H + damp*mean(diag H)*I)^-1 = U^T U; the damping grows until H factorizes.

    With R = J chol(J H J) J (J reverses the order; R is upper triangular and
    H = R R^T), H^-1 = R^-T R^-1, so U = R^-1: one factorization and one
    inverse. Returns (U, damp used)."""
    n = H.shape[0]
    mean_diag = float(np.mean(np.diag(H)))
    for _ in range(MAX_DAMP_RETRIES):
        Hd = H + np.eye(n) * (damp * mean_diag)
        try:
            L = np.linalg.cholesky(Hd[::-1, ::-1])
        except np.linalg.LinAlgError:
            damp = damp * 10 if damp > 0 else 1e-6
            continue
        U = np.triu(np.linalg.inv(L)[::-1, ::-1])
        return np.ascontiguousarray(U), damp
    raise QinferError(f"the Hessian is not positive definite even with dampening {damp:g} "
                      f"(the calibration data may be degenerate)")


class PreparedHessian:
    """What GPTQ needs from a Hessian, computed once for the layers that share it (q/k/v, gate/up):
    the dead inputs, the act-order permutation (or None) and U, the upper Cholesky
    factor of the dampened, permuted inverse."""

    def __init__(self, H, damp=0.01, act_order=False):
        H = np.array(H, dtype=np.float64)
        if H.ndim != 2 or H.shape[0] != H.shape[1]:
            raise ShapeError(f"the Hessian must be a square matrix, got shape {H.shape}")
        if not np.all(np.isfinite(H)):
            raise QinferError("the Hessian holds NaN or infinity")
        self.dead = np.diag(H) == 0
        H[self.dead, self.dead] = 1
        self.act_order = bool(act_order)
        self.perm = np.argsort(-np.diag(H), kind="stable") if act_order else None
        if self.perm is not None:
            H = H[self.perm][:, self.perm]
        self.U, self.damp = inverse_cholesky(H, damp)

    @property
    def size(self):
        return self.U.shape[0]


def gptq_quantize(weight, H, bits, group_size=128, sym=False, act_order=False, static_groups=False,
                  damp=0.01, block_size=BLOCK_SIZE, zero_point="int", clip=False):
    """GPTQ of a float [out, in] weight -> QuantResult.

    H: the Hessian [in, in], or a PreparedHessian (which then fixes act_order and damp).
    clip: each group's range from the clip search (quantizer.py)."""
    check_settings(bits, group_size, sym, zero_point)
    prepared = H if isinstance(H, PreparedHessian) else PreparedHessian(H, damp, act_order)
    W = np.array(weight, dtype=np.float64)             # a copy: updated in place
    if W.ndim != 2:
        raise ShapeError(f"weight must be 2-D [out, in], got shape {W.shape}")
    n_out, n_in = W.shape
    if prepared.size != n_in:
        raise ShapeError(f"the Hessian must be [{n_in}, {n_in}], got [{prepared.size}, {prepared.size}]")
    if not np.all(np.isfinite(W)):
        raise QinferError("the weight holds NaN or infinity")
    maxq = 2 ** bits - 1
    G = n_in if group_size == -1 else group_size
    groups = layout.n_groups(n_in, group_size)
    if not (group_size == -1 or static_groups) and block_size % G:
        raise ValueError(f"block_size {block_size} must be a multiple of group_size {G}")
    W[:, prepared.dead] = 0

    scales = np.zeros((groups, n_out), dtype=np.float32)
    zeros = np.zeros((groups, n_out), dtype=np.float32)
    fixed = group_size == -1 or static_groups          # parameters chosen up front from W
    if fixed:
        for g in range(groups):
            scales[g], zeros[g] = group_params(W[:, g * G:(g + 1) * G], bits, sym, zero_point, clip)

    act_order = prepared.perm is not None
    perm = prepared.perm if act_order else np.arange(n_in)
    if act_order:
        W = W[:, perm]
    U = prepared.U

    codes = np.empty((n_out, n_in), dtype=np.uint8)    # in the (permuted) processing order
    scale = zero = None
    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        W1 = W[:, i1:i2]                               # a view: the block is updated in place
        U1 = U[i1:i2, i1:i2]
        err = np.zeros((n_out, i2 - i1))
        for i in range(i2 - i1):
            c = i1 + i
            if fixed:
                g = perm[c] // G
                scale, zero = scales[g], zeros[g]
            elif c % G == 0:
                # The group's columns are all inside this block (G divides the
                # block size) and hold every update made so far.
                g = c // G
                scales[g], zeros[g] = group_params(W[:, c:c + G], bits, sym, zero_point, clip)
                scale, zero = scales[g].astype(np.float64), zeros[g].astype(np.float64)
            w = W1[:, i]
            if zero_point == "float":
                q = np.clip(np.round(w / scale + zero), 0, maxq)
            else:
                q = np.clip(np.round(w / scale) + zero, 0, maxq)
            codes[:, c] = q
            e = (w - scale * (q - zero)) / U1[i, i]
            W1[:, i:] -= np.outer(e, U1[i, i:])
            err[:, i] = e
        W[:, i2:] -= err @ U[i1:i2, i2:]

    if act_order:
        inverse = np.argsort(perm)
        codes = codes[:, inverse]
        g_idx = (np.arange(n_in) // G)[inverse] if not fixed else layout.trivial_g_idx(n_in, group_size)
    else:
        g_idx = layout.trivial_g_idx(n_in, group_size)
    return QuantResult(bits, group_size, np.ascontiguousarray(codes.T), scales, zeros,
                       np.ascontiguousarray(g_idx, dtype=np.int32), zero_point)
