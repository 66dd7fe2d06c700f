"""Symmetric round to nearest, SmoothQuant's and ZeroQuant's weight quantizer.

Per output row and group of inputs, s = max|w| / (2^(b-1) - 1) rounded to float16 (as the
checkpoint stores it), c = round(w / s) in [-(2^(b-1) - 1), 2^(b-1) - 1]: a grid
symmetric about 0 with no zero point, which is what lets int8 activations multiply the
codes directly (qinfer/int8_linear.py). In the GPTQ format the codes are stored as
c + 2^(b-1) with every zero point 2^(b-1) (AutoGPTQ's `sym`), so any GPTQ reader loads
the weights.
"""
import numpy as np

from ..errors import UnsupportedError
from . import layout
from .quantizer import F16_MAX, F16_TINY
from .result import QuantResult


def symmetric_quantize(weight, bits, group_size=-1):
    """weight float [out, in] -> QuantResult (codes c + 2^(bits-1), zeros 2^(bits-1))."""
    w = np.asarray(weight, dtype=np.float32)
    out_f, in_f = w.shape
    group = in_f if group_size == -1 else group_size
    if in_f % group:
        raise UnsupportedError(f"group size {group_size} does not divide the layer's {in_f} inputs")
    top = 2 ** (bits - 1) - 1
    g = w.reshape(out_f, in_f // group, group)
    amax = np.abs(g).max(axis=2)
    scale = amax / np.float32(top)
    if not np.all(np.isfinite(scale)) or scale.max(initial=0) > F16_MAX:
        raise UnsupportedError(f"a weight group's range does not fit a float16 scale (non-finite or larger than "
                               f"{float(F16_MAX) * top:g})")
    scale = np.maximum(scale.astype(np.float16).astype(np.float32), F16_TINY)        # [out, groups]
    codes = np.clip(np.rint(g / scale[:, :, None]), -top, top).astype(np.int16) + 2 ** (bits - 1)
    zeros = np.full((in_f // group, out_f), 2 ** (bits - 1), dtype=np.float32)
    return QuantResult(bits=bits, group_size=group_size,
                       codes=np.ascontiguousarray(codes.reshape(out_f, in_f).T.astype(np.uint8)),
                       scales=np.ascontiguousarray(scale.T), zeros=zeros,
                       g_idx=layout.trivial_g_idx(in_f, group_size))
