"""Scale and zero of a group with a float16 scale, and round to nearest over a whole matrix.

The range rule is qinfer/rtn.py's (GPTQ's min/max quantizer; the engine's
quantize-on-load uses the same function). The difference: checkpoints store
scales in float16, as AutoGPTQ does, so the scale is rounded to float16
*before* the codes are chosen. The codes are then the nearest ones for the
scale that is actually stored, and a written checkpoint reproduces the
quantized weights bit for bit (GPTQ's error feedback also sees the stored
weights, not a float32 version of them).

Zero points (`zero_point`):

    "int"    GPTQ's: the range [min(w, 0), max(w, 0)] and zero = the code of
             0.0, rounded to an integer (AutoGPTQ stores it packed in qzeros).
             The grid must then pass through 0.0, so it sits up to half a
             step away from where the group's own range would put it.
    "float"  the group's own range [min(w), max(w)] cut into 2^b - 1 steps,
             zero = -min / scale kept as a real number (stored in float16,
             like llama.cpp's Q4_1 stores its minimum): the grid starts at
             the smallest weight and ends at the largest. Same bits per
             weight as "int" in memory (the kernels hold float zeros
             anyway); in a checkpoint a float16 zero costs 16 bits per group
             where a packed integer one costs b.

Clip search (`clip=True`): a group's min/max range is the widest it can be,
so one outlier stretches the step of every other weight in the group. The
search also tries the range shrunk toward 0 by 1%, 2%, ... 20% (weights past
the ends clip to the first or last code) and keeps, per group, the candidate
with the smallest sum of |w - dequantized w|^2.4: a norm above 2 weighs the
large weights' errors more than mean squared error does, so outliers are
clipped only when that pays. At 3 bits and groups of 16 it lowered
SmolLM2-135M's validation perplexity (docs/perplexity.md). It is the
same search in GPTQ, run on the error-updated weights of each group.
"""
import numpy as np

from .. import rtn
from ..errors import UnsupportedError
from . import layout
from .result import QuantResult

F16_TINY = np.float32(np.finfo(np.float16).smallest_subnormal)
F16_MAX = np.float32(np.finfo(np.float16).max)


ZERO_POINTS = ("int", "float")


CLIP_STEPS = 20           # candidates besides the full range: shrunk by 1%, 2%, ... 20%
CLIP_STEP = 0.01
CLIP_NORM = 2.4


def group_params(w, bits, sym, zero_point="int", clip=False):
    """w: float [..., rows] (one group on the last axis) -> scale, zero float32 [...].

    scale is exact in float16; zero is an integer in [0, 2^bits) ("int") or
    a real number exact in float16 ("float"). clip: search the range (above)."""
    w = np.asarray(w, dtype=np.float32)
    if clip:
        return _clipped_params(w, bits, sym, zero_point)
    return _range_params(w, bits, sym, zero_point)


def group_error(w, scale, zero, bits, zero_point="int"):
    """Sum over each group (last axis of w) of |w - scale * (q - zero)|^CLIP_NORM."""
    q = quantize_codes(w, scale, zero, bits, zero_point).astype(np.float32)
    d = w - scale[..., None] * (q - zero[..., None])
    return (np.abs(d) ** np.float32(CLIP_NORM)).sum(axis=-1)


def _clipped_params(w, bits, sym, zero_point):
    # The full range first: a tie keeps it, so clipping never makes a group worse.
    best_scale, best_zero = _range_params(w, bits, sym, zero_point)
    best = group_error(w, best_scale, best_zero, bits, zero_point)
    for step in range(1, CLIP_STEPS + 1):
        # Every rule here takes its range from the weights' extremes (and 0), so the
        # range of w * f is the full range shrunk toward 0 by the factor f.
        scale, zero = _range_params(w * np.float32(1 - CLIP_STEP * step), bits, sym, zero_point)
        err = group_error(w, scale, zero, bits, zero_point)
        better = err < best
        best = np.where(better, err, best)
        best_scale = np.where(better, scale, best_scale)
        best_zero = np.where(better, zero, best_zero)
    return best_scale, best_zero


def _range_params(w, bits, sym, zero_point):
    if zero_point == "float":
        return _float_zero_params(w, bits)
    scale, zero = rtn.scale_zero(w, bits, sym)
    if not np.all(np.isfinite(scale)) or scale.max(initial=0) > F16_MAX:
        raise UnsupportedError("a weight group's range does not fit a float16 scale (non-finite or "
                               f"larger than {float(F16_MAX) * (2 ** bits - 1):g})")
    # A range so small that its scale underflows float16 gets the smallest
    # subnormal: every weight in it is then within half a step of its code.
    scale = np.maximum(scale.astype(np.float16).astype(np.float32), F16_TINY)
    return scale, zero


def _float_zero_params(w, bits):
    maxq = np.float32(2 ** bits - 1)
    xmin, xmax = w.min(axis=-1), w.max(axis=-1)
    # A constant group has no range of its own: take [min(c, 0), max(c, 0)]
    # as "int" does, so c is a grid point (an all-zero group gets [-1, 1]).
    flat = xmax == xmin
    xmin = np.where(flat, np.minimum(xmin, 0), xmin)
    xmax = np.where(flat, np.maximum(xmax, 0), xmax)
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = np.where(both_zero, np.float32(-1), xmin)
    xmax = np.where(both_zero, np.float32(1), xmax)
    scale = ((xmax - xmin) / maxq).astype(np.float32)
    if not np.all(np.isfinite(scale)) or scale.max(initial=0) > F16_MAX:
        raise UnsupportedError("a weight group's range does not fit a float16 scale (non-finite or "
                               f"larger than {float(F16_MAX) * float(maxq):g})")
    scale = np.maximum(scale.astype(np.float16).astype(np.float32), F16_TINY)
    zero = (-xmin / scale).astype(np.float16).astype(np.float32)
    if not np.all(np.isfinite(zero)):
        raise UnsupportedError("a weight group lies so far from 0, relative to its range, that its "
                               "zero point does not fit float16; use zero_point='int'")
    return scale, zero


def quantize_codes(w, scale, zero, bits, zero_point="int"):
    """Codes of w [..., rows] for scale/zero [...], clipped to [0, 2^bits).

    "int": round(w / scale) + zero, as AutoGPTQ computes it (the two forms
    differ only at exact ties); "float": round(w / scale + zero)."""
    w = np.asarray(w, dtype=np.float32)
    if zero_point != "float":
        return rtn.round_codes(w, scale, zero, bits)
    q = np.round(w / scale[..., None] + zero[..., None])
    return np.clip(q, 0, 2 ** bits - 1).astype(np.uint8)


def check_settings(bits, group_size, sym=False, zero_point="int"):
    from ..packing import check_bits

    check_bits(bits)
    if zero_point not in ZERO_POINTS:
        raise UnsupportedError(f"zero_point must be one of {ZERO_POINTS}, got {zero_point!r}")
    if sym and zero_point == "float":
        raise UnsupportedError("symmetric quantization fixes the zero point at 2^(bits-1); "
                               "zero_point='float' is for asymmetric groups")
    if group_size not in rtn.GROUP_SIZES:
        raise UnsupportedError(f"group_size must be one of {rtn.GROUP_SIZES} (-1 = full column), "
                               f"got {group_size!r}")


def rtn_quantize(weight, bits, group_size=128, sym=False, zero_point="int", clip=False):
    """Round to nearest of a float [out, in] weight -> QuantResult.

    Groups are group_size consecutive input rows; when in_features is not a
    multiple of it the last group is short (AutoGPTQ's ceil(in / group_size)
    groups). clip: each group's range from the clip search (module docstring).
    The loop is rtn.quantize_groups, with this module's float16-exact scales."""
    check_settings(bits, group_size, sym, zero_point)
    w = np.asarray(weight, dtype=np.float32)
    codes, scales, zeros = rtn.quantize_groups(
        w, group_size, lambda g: group_params(g, bits, sym, zero_point, clip),
        lambda g, scale, zero: quantize_codes(g, scale, zero, bits, zero_point))
    n_in = w.shape[1]
    return QuantResult(bits, group_size, codes, scales, zeros,
                       layout.trivial_g_idx(n_in, group_size), zero_point)
