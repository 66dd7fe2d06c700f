"""The public API's checks of its numeric arguments: one QinferError naming the parameter.

Engine (sampling settings), qinfer.perplexity (seqlen, max_chunks) and
qinfer.bench (token counts, repetitions, seed) take their arguments from
Python callers, so a bool, a float or a string is refused rather than coerced.
The command line's text options are parsed by qinfer/cli/options.py.
"""
import math

import numpy as np

from .errors import QinferError


def whole(name, value, low, error=QinferError):
    """int(value) for an integer >= low (numpy integers too, never a bool), else `error`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise error(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def number(name, value, low, low_inclusive=True, high=None):
    """float(value) for a finite real number in range, else a QinferError."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise QinferError(f"{name} must be a number, got {value!r}")
    value = float(value)
    ok = math.isfinite(value) and (value >= low if low_inclusive else value > low)
    if ok and high is not None:
        ok = value <= high
    if not ok:
        bound = f"{'>=' if low_inclusive else '>'} {low}" + (f" and <= {high}" if high is not None else "")
        raise QinferError(f"{name} must be a finite number {bound}, got {value}")
    return value
