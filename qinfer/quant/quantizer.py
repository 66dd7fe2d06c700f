"""Scale and zero of a group with a float16 scale, and round to nearest over a whole matrix.

The range rule is qinfer/rtn.py's (GPTQ's min/max quantizer; the engine's
quantize-on-load uses the same function). The difference: checkpoints store
scales in float16, as AutoGPTQ does, so the scale is rounded to float16
*before* the codes are chosen. The codes are then the nearest ones for the
scale that is actually stored, and a written checkpoint reproduces the
quantized weights bit for bit (GPTQ's error feedback also sees the stored
weights, not a float32 version of them).
"""
import numpy as np

from .. import rtn
from ..errors import UnsupportedError
from . import layout
from .result import QuantResult

F16_TINY = np.float32(np.finfo(np.float16).smallest_subnormal)
F16_MAX = np.float32(np.finfo(np.float16).max)


def group_params(w, bits, sym):
    """w: float [..., rows] (one group on the last axis) -> scale, zero float32 [...].

    scale is exact in float16; zero is an integer in [0, 2^bits)."""
    scale, zero = rtn.scale_zero(np.asarray(w, dtype=np.float32), bits, sym)
    if not np.all(np.isfinite(scale)) or scale.max(initial=0) > F16_MAX:
        raise UnsupportedError("a weight group's range does not fit a float16 scale (non-finite or "
                               f"larger than {float(F16_MAX) * (2 ** bits - 1):g})")
    # A range so small that its scale underflows float16 gets the smallest
    # subnormal: every weight in it is then within half a step of its code.
    scale = np.maximum(scale.astype(np.float16).astype(np.float32), F16_TINY)
    return scale, zero


def quantize_codes(w, scale, zero, bits):
    """Codes of w [..., rows] for scale/zero [...]: round(w / scale) + zero, clipped to [0, 2^bits)."""
    maxq = 2 ** bits - 1
    q = np.round(np.asarray(w, dtype=np.float32) / scale[..., None]) + zero[..., None]
    return np.clip(q, 0, maxq).astype(np.uint8)


def check_settings(bits, group_size):
    from ..packing import check_bits

    check_bits(bits)
    if group_size not in rtn.GROUP_SIZES:
        raise UnsupportedError(f"group_size must be one of {rtn.GROUP_SIZES} (-1 = full column), "
                               f"got {group_size!r}")


def rtn_quantize(weight, bits, group_size=128, sym=False):
    """Round to nearest of a float [out, in] weight -> QuantResult.

    Groups are group_size consecutive input rows; when in_features is not a
    multiple of it the last group is short (AutoGPTQ's ceil(in / group_size)
    groups)."""
    check_settings(bits, group_size)
    w = np.asarray(weight, dtype=np.float32)
    n_out, n_in = w.shape
    g = n_in if group_size == -1 else group_size
    full = n_in // g
    scales, zeros, codes = [], [], np.empty((n_out, n_in), dtype=np.uint8)
    if full:
        body = w[:, :full * g].reshape(n_out, full, g)
        s, z = group_params(body, bits, sym)                       # [out, full]
        codes[:, :full * g] = quantize_codes(body, s, z, bits).reshape(n_out, full * g)
        scales.append(s.T)
        zeros.append(z.T)
    if full * g < n_in:
        tail = w[:, full * g:]
        s, z = group_params(tail, bits, sym)                       # [out]
        codes[:, full * g:] = quantize_codes(tail, s, z, bits)
        scales.append(s[None])
        zeros.append(z[None])
    return QuantResult(bits, group_size, np.ascontiguousarray(codes.T),
                       np.ascontiguousarray(np.concatenate(scales)), np.ascontiguousarray(np.concatenate(zeros)),
                       layout.trivial_g_idx(n_in, group_size))
