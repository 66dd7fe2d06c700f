"""RoPE scaling settings -> ModelConfig.rope_scaling, from either format.

qinfer implements plain RoPE and Llama 3's frequency-dependent scaling. The
config form (see source.py) is Hugging Face's:
    {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
     "original_max_position_embeddings"}

Hugging Face states it directly. llama.cpp's converter does not store those
four numbers: it writes the resulting per-frequency divisors as a tensor,
rope_freqs.weight. The divisor curve depends on them only through two
thresholds, so we recover an equivalent set by fitting (fixing the original
context length) and accept it only if it reproduces every stored divisor.
"""
import math

import numpy as np

from ..errors import FormatError, UnsupportedError

LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def from_hf(rope_scaling, path):
    """config.json's rope_scaling (None or a dict) -> the normalised dict or None."""
    if rope_scaling is None:
        return None
    if not isinstance(rope_scaling, dict):
        raise FormatError(f"{path}: rope_scaling must be an object or null, got {rope_scaling!r}")
    kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise UnsupportedError(f"{path}: rope_scaling type {kind!r} is not supported (supported: llama3, default)")
    out = {"rope_type": "llama3"}
    for key in LLAMA3_KEYS:
        v = rope_scaling.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise FormatError(f"{path}: rope_scaling.{key} must be a positive number, got {v!r}")
        out[key] = int(v) if key == "original_max_position_embeddings" else float(v)
    if out["high_freq_factor"] <= out["low_freq_factor"]:
        raise FormatError(f"{path}: rope_scaling needs high_freq_factor > low_freq_factor, got "
                          f"{out['high_freq_factor']} and {out['low_freq_factor']}")
    return out


def llama3_divisors(scaling, theta, head_dim):
    """What each of the head_dim/2 rotary frequencies is divided by (Llama 3 scaling)."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    smooth = (old / wavelen - low) / (high - low)
    medium = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, medium))


def from_gguf_divisors(divisors, theta, head_dim, original_context, where):
    """rope_freqs.weight (per-frequency divisors) -> an equivalent llama3 rope_scaling, or None if all 1."""
    f = np.asarray(divisors, dtype=np.float64).reshape(-1)
    if f.shape != (head_dim // 2,):
        raise FormatError(f"{where}: rope_freqs.weight has {f.size} values, expected head_dim/2 = {head_dim // 2}")
    if not np.all(np.isfinite(f)) or np.any(f <= 0):
        raise FormatError(f"{where}: rope_freqs.weight holds non-finite or non-positive values")
    factor = float(f.max())
    if np.allclose(f, 1.0, rtol=0, atol=1e-6):
        return None
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    x = original_context * inv_freq / (2 * math.pi)           # old / wavelen
    mid = (f > 1 + 1e-4) & (f < factor * (1 - 1e-4))
    if mid.sum() >= 2:
        # On the medium band  1/f = (1 - s)/factor + s  with  s = (x - low)/(high - low): linear in x.
        s = (1 / f[mid] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(x[mid], s, 1)
        low = -intercept / slope if slope > 0 else -1.0
        high = (1 - intercept) / slope if slope > 0 else -1.0
    else:
        low, high = 1.0, 4.0                                   # Llama 3's values; checked below
    scaling = {"rope_type": "llama3", "factor": _tidy(factor), "low_freq_factor": _tidy(low),
               "high_freq_factor": _tidy(high), "original_max_position_embeddings": int(original_context)}
    ok = 0 < low < high
    if ok:
        ok = np.allclose(llama3_divisors(scaling, theta, head_dim), f, rtol=1e-3, atol=0)
    if not ok:
        raise UnsupportedError(f"{where}: rope_freqs.weight does not follow Llama 3 RoPE scaling; "
                               f"other per-frequency scalings are not supported")
    return scaling


def _tidy(v):
    """Fitted values come out like 3.9999998; give the value the config almost surely had."""
    r = round(v, 3)
    return float(r) if abs(r - v) < 1e-4 * max(1.0, abs(v)) else float(v)
