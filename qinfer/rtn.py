"""Round-to-nearest quantization, with GPTQ's quantizer (min/max per group).

Per output column and group of input rows: the range [min(w, 0), max(w, 0)]
is cut into 2**b - 1 steps; zero is the code of 0.0, so w = scale * (q - zero)
reproduces 0 exactly. Symmetric: the range is [-max|w|, max|w|] and zero is
2**(b-1). All in float32, like the kernels.
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


def quantize(weight, bits, group_size=128, sym=False):
    """weight float32 [out, in] -> codes uint8 [in, out], scales and zeros float32 [groups, out]."""
    check_bits(bits)
    weight = np.asarray(weight, dtype=np.float32)
    if weight.ndim != 2:
        raise ShapeError(f"weight must be 2-D [out_features, in_features], got shape {weight.shape}")
    n, k = weight.shape
    check_group_size(group_size, k)
    g = k if group_size == -1 else group_size
    grouped = weight.reshape(n, k // g, g)
    scale, zero = scale_zero(grouped, bits, sym)                 # [out, groups]
    maxq = np.float32(2 ** bits - 1)
    q = np.clip(np.round(grouped / scale[..., None]) + zero[..., None], 0, maxq)
    codes = q.reshape(n, k).astype(np.uint8).T
    return np.ascontiguousarray(codes), np.ascontiguousarray(scale.T), np.ascontiguousarray(zero.T)
