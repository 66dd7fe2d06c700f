"""Low-rank compensation (LoRC, ZeroQuant-V2: Yao et al. 2023): the rounding error's top directions.

A quantized layer stands for W_q instead of W. LoRC keeps the best rank-r approximation of
the error E = W - W_q as two thin float matrices and adds their product at run time:

    y = W_q x + B (A x),    B A = U_r S_r V_r^T  (E's r largest singular values and vectors)
    A = S_r^(1/2) V_r^T  [r, in],    B = U_r S_r^(1/2)  [out, r]

so a layer costs r (in + out) more numbers (rank 8 on a 4096x4096 layer: 0.4% of its
weights). Layers up to EXACT_LIMIT inputs or outputs get numpy's exact SVD; larger ones
a randomized one (Halko et al. 2011: a seeded Gaussian sketch of r + 8 columns, four
power iterations, orthonormalized each time), which finds the top directions of a
11008x4096 error in seconds where the exact SVD takes about a minute. Where the error's
spectrum is flat (rounding error is nearly white noise) its rank-r directions are
ill-defined anyway, and any of them takes off about as much; test_lorc.py holds the
randomized SVD to the exact one where there is a gap.
"""
import numpy as np

from ..errors import QinferError

OVERSAMPLE = 8
POWER_ITERATIONS = 4
EXACT_LIMIT = 1024


def check_rank(rank):
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise QinferError(f"the low-rank compensation's rank (--lorc-rank) must be an integer >= 1, got {rank!r}")
    return int(rank)


def low_rank_factors(error, rank, seed=0):
    """(A float32 [rank, in], B float32 [out, rank]) with B A the best rank-`rank` approximation
    of error [out, in] (randomized SVD, above)."""
    e = np.asarray(error, dtype=np.float64)
    out_f, in_f = e.shape
    if rank > min(out_f, in_f):
        raise QinferError(f"the low-rank compensation's rank {rank} exceeds the layer's {out_f}x{in_f} shape")
    if min(out_f, in_f) <= EXACT_LIMIT:
        u, s, vt = np.linalg.svd(e, full_matrices=False)
    else:
        k = min(rank + OVERSAMPLE, min(out_f, in_f))
        sketch = np.random.default_rng(seed).standard_normal((in_f, k))
        q, _ = np.linalg.qr(e @ sketch)
        for _ in range(POWER_ITERATIONS):
            q, _ = np.linalg.qr(e.T @ q)
            q, _ = np.linalg.qr(e @ q)
        u_small, s, vt = np.linalg.svd(q.T @ e, full_matrices=False)
        u = q @ u_small
    u = u[:, :rank]
    root = np.sqrt(s[:rank])
    return (np.ascontiguousarray((root[:, None] * vt[:rank]), dtype=np.float32),
            np.ascontiguousarray(u * root[None, :], dtype=np.float32))
