"""Round-to-nearest quantization, with GPTQ's quantizer (min/max per group).

Per output column and group of input rows: the range [min(w, 0), max(w, 0)]
is cut into 2**b - 1 steps; zero is the code of 0.0, so w = scale * (q - zero)
reproduces 0 exactly. Symmetric: the range is [-max|w|, max|w|] and zero is
2**(b-1). All in float32, like the kernels.

quantize_groups is the one round-to-nearest loop: quantize() runs it with this
range rule, qinfer/quant/quantizer.py with its float16-exact scales.
"""
import numpy as np

from .packing import check_bits
from .errors import ShapeError, UnsupportedError
from .variants import GROUP_SIZES   # the kernels' table: the group sizes they are built for


def check_group_size(group_size, in_features):
    if group_size not in GROUP_SIZES:
        raise UnsupportedError(
            f"group_size must be one of {GROUP_SIZES} (-1 = full column), got {group_size!r}")
    if group_size > 0 and in_features % group_size:
        raise ShapeError(f"in_features={in_features} is not a multiple of group_size={group_size}")


def scale_zero(w, bits, sym):
    """w: float32 [..., rows] grouped on the last axis -> scale, zero [...]."""
    maxq = np.float32(2 ** bits - 1)
    xmin = np.minimum(w.min(axis=-1), np.float32(0))
    xmax = np.maximum(w.max(axis=-1), np.float32(0))
    if sym:
        xmax = np.maximum(np.abs(xmin), xmax)
        xmin = np.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = np.where(empty, np.float32(-1), xmin)
    xmax = np.where(empty, np.float32(1), xmax)
    scale = ((xmax - xmin) / maxq).astype(np.float32)
    if sym:
        zero = np.full_like(scale, (maxq + 1) / 2)
    else:
        zero = np.round(-xmin / scale).astype(np.float32)
    return scale, zero


ROW_BLOCK = 1024      # output rows rounded at a time


def round_codes(w, scale, zero, bits):
    """Codes of w [..., rows] for scale/zero [...]: round(w / scale) + zero, clipped to [0, 2^bits)
    (AutoGPTQ's form)."""
    q = np.round(w / scale[..., None]) + zero[..., None]
    return np.clip(q, 0, 2 ** bits - 1).astype(np.uint8)


def quantize_groups(w, group_size, params, codes_of):
    """The round-to-nearest loop over a float32 [out, in] weight w, for any range rule.

    Groups are group_size consecutive input rows (-1: all of them); when
    in_features is not a multiple of it the last group is short (AutoGPTQ's
    ceil(in / group_size) groups). params(w [..., rows]) -> scale, zero [...];
    codes_of(w, scale, zero) -> uint8 codes. Returns codes uint8 [in, out],
    scales and zeros float32 [groups, out]."""
    n_out, n_in = w.shape
    g = n_in if group_size == -1 else group_size
    full = n_in // g
    n_groups = full + (full * g < n_in)
    codes = np.empty((n_out, n_in), dtype=np.uint8)
    scales = np.empty((n_groups, n_out), dtype=np.float32)
    zeros = np.empty((n_groups, n_out), dtype=np.float32)
    # Rows are independent: a block of them at a time keeps the float temporaries of the
    # rounding to a few MiB instead of several copies of the whole matrix (an LM head).
    for r0 in range(0, n_out, ROW_BLOCK):
        rows = slice(r0, min(n_out, r0 + ROW_BLOCK))
        if full:
            body = w[rows, :full * g].reshape(-1, full, g)
            sc, z = params(body)                                        # [rows, full]
            codes[rows, :full * g] = codes_of(body, sc, z).reshape(-1, full * g)
            scales[:full, rows], zeros[:full, rows] = sc.T, z.T
        if full * g < n_in:
            tail = w[rows, full * g:]
            sc, z = params(tail)                                        # [rows]
            codes[rows, full * g:] = codes_of(tail, sc, z)
            scales[full, rows], zeros[full, rows] = sc, z
    return np.ascontiguousarray(codes.T), scales, zeros


def quantize(weight, bits, group_size=128, sym=False):
    """weight float32 [out, in] -> codes uint8 [in, out], scales and zeros float32 [groups, out]."""
    check_bits(bits)
    weight = np.asarray(weight, dtype=np.float32)
    if weight.ndim != 2:
        raise ShapeError(f"weight must be 2-D [out_features, in_features], got shape {weight.shape}")
    check_group_size(group_size, weight.shape[1])
    return quantize_groups(weight, group_size, lambda w: scale_zero(w, bits, sym),
                           lambda w, scale, zero: round_codes(w, scale, zero, bits))
