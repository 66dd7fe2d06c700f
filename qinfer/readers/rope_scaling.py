"""RoPE settings -> ModelConfig.rope_theta and .rope_scaling, from either format.

qinfer implements plain RoPE and Llama 3's frequency-dependent scaling. The
config form of the scaling (see source.py) is Hugging Face's:
    {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
     "original_max_position_embeddings"}

Hugging Face states it directly, in one of two shapes:
  * transformers 4: top-level "rope_theta" and "rope_scaling" (null, or a dict
    with "rope_type", or the older key "type", and the type's parameters);
  * transformers 5: one dict "rope_parameters" holding "rope_type" and
    "rope_theta" too (no top-level rope_theta). transformers 5 still reads a
    "rope_scaling" dict as the same thing, and in some models keys the dict by
    layer type ({"full_attention": {...}, "sliding_attention": {...}}).
A config may carry both shapes; where they give the same setting they must
agree, or the config is refused naming both fields. Anything that changes the
rotation and is not implemented (another rope_type, a partial rotary factor,
parameters per layer type, a key the type does not define) is refused, never
approximated.

llama.cpp's converter does not store the four llama3 numbers: it writes the
resulting per-frequency divisors as a tensor, rope_freqs.weight. The divisor
curve depends on them only through two thresholds, so we recover an
equivalent set by fitting (fixing the original context length) and accept it
only if it reproduces every stored divisor.
"""
import math

import numpy as np

from ..errors import FormatError, UnsupportedError

LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# LlamaConfig's default base when a config gives none (transformers 4's rope_theta
# default, transformers 5's default_theta): Hugging Face's own reading, not a guess.
DEFAULT_THETA = 10000.0
# theta < 1 would make the rotary frequencies theta^(-2i/d) grow with i instead of
# fall: no trained model does that, so such a value is a broken field, not a model.
MIN_THETA = 1.0
# Keys each supported rope_type may carry besides rope_type/type and rope_theta.
_TYPE_KEYS = {"default": (), "llama3": LLAMA3_KEYS}
_DICTS = ("rope_parameters", "rope_scaling")


def _number(v):
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def _theta(v, name, path):
    if not _number(v) or v < MIN_THETA:
        raise FormatError(f"{path}: {name} (the RoPE base) must be a number >= {MIN_THETA:g}, got {v!r}")
    return float(v)


def _original_max(v, name, path):
    """An integer >= 1; 8192.0 is accepted as 8192, 0.5 or 8192.5 are not."""
    if not _number(v) or v < 1 or (isinstance(v, float) and not v.is_integer()):
        raise FormatError(f"{path}: {name} must be an integer >= 1, got {v!r}")
    return int(v)


def _full_rotary(v, name, path):
    if not _number(v) or not 0 < v <= 1:
        raise FormatError(f"{path}: {name} must be a number in (0, 1], got {v!r}")
    if v != 1:
        raise UnsupportedError(f"{path}: {name} = {v!r} (RoPE on part of each head) is not supported; "
                               f"qinfer rotates whole heads")


def _parse(d, name, path):
    """One rope dict (rope_parameters or rope_scaling) -> (theta or None, scaling dict or None).

    The llama3 dict's original_max_position_embeddings may be None here (absent):
    from_hf_config fills it from the top-level field or refuses."""
    if not isinstance(d, dict):
        raise FormatError(f"{path}: {name} must be an object or null, got {d!r}")
    nested = sorted(k for k, v in d.items() if isinstance(v, dict))
    if nested:
        raise UnsupportedError(f"{path}: {name} holds one RoPE setting per layer type ({', '.join(nested)}); "
                               f"qinfer runs one RoPE for every layer and does not support this")
    kinds = {k: d[k] for k in ("rope_type", "type") if d.get(k) is not None}
    if len(set(map(repr, kinds.values()))) > 1:
        raise FormatError(f"{path}: {name}.rope_type {kinds['rope_type']!r} and {name}.type {kinds['type']!r} "
                          f"disagree")
    kind = next(iter(kinds.values()), "default")
    if kind not in _TYPE_KEYS:
        raise UnsupportedError(f"{path}: {name}.rope_type {kind!r} is not supported (supported: "
                               f"{', '.join(_TYPE_KEYS)})")
    if d.get("partial_rotary_factor") is not None:
        _full_rotary(d["partial_rotary_factor"], f"{name}.partial_rotary_factor", path)
    known = {"rope_type", "type", "rope_theta", "partial_rotary_factor", *_TYPE_KEYS[kind]}
    unknown = sorted(k for k in d if k not in known)
    if unknown:
        raise UnsupportedError(f"{path}: {name}.{unknown[0]} is not a parameter of rope_type {kind!r} "
                               f"(expected only: {', '.join(sorted(known))}); qinfer does not guess what it "
                               f"was meant to change")
    theta = None if d.get("rope_theta") is None else _theta(d["rope_theta"], f"{name}.rope_theta", path)
    if kind == "default":
        return theta, None
    out = {"rope_type": "llama3"}
    factor = d.get("factor")
    if not _number(factor) or factor < 1:
        raise FormatError(f"{path}: {name}.factor must be a number >= 1, got {factor!r}")
    out["factor"] = float(factor)
    for key in ("low_freq_factor", "high_freq_factor"):
        v = d.get(key)
        if not _number(v) or v <= 0:
            raise FormatError(f"{path}: {name}.{key} must be a positive number, got {v!r}")
        out[key] = float(v)
    if out["high_freq_factor"] <= out["low_freq_factor"]:
        raise FormatError(f"{path}: {name} needs high_freq_factor > low_freq_factor, got "
                          f"{out['high_freq_factor']} and {out['low_freq_factor']}")
    omax = d.get("original_max_position_embeddings")
    out["original_max_position_embeddings"] = (
        None if omax is None else _original_max(omax, f"{name}.original_max_position_embeddings", path))
    return theta, out


def from_hf_config(cfg, path):
    """config.json (a dict) -> (rope_theta, rope_scaling or None), from either shape (module docstring)."""
    parsed = {name: _parse(cfg[name], name, path) for name in _DICTS if cfg.get(name) is not None}

    thetas = [("rope_theta", _theta(cfg["rope_theta"], "rope_theta", path))] if cfg.get("rope_theta") is not None \
        else []
    thetas += [(f"{name}.rope_theta", theta) for name, (theta, _) in parsed.items() if theta is not None]
    for name, value in thetas[1:]:
        if value != thetas[0][1]:
            raise FormatError(f"{path}: {thetas[0][0]} = {thetas[0][1]!r} and {name} = {value!r} disagree "
                              f"(qinfer does not pick one)")
    theta = thetas[0][1] if thetas else DEFAULT_THETA

    if cfg.get("partial_rotary_factor") is not None:
        _full_rotary(cfg["partial_rotary_factor"], "partial_rotary_factor", path)

    scalings = [(name, scaling) for name, (_, scaling) in parsed.items()]
    if len(scalings) == 2 and scalings[0][1] != scalings[1][1]:
        (n0, s0), (n1, s1) = scalings
        raise FormatError(f"{path}: {n0} and {n1} disagree ({_describe(s0)} vs {_describe(s1)}); "
                          f"qinfer does not pick one")
    scaling = scalings[0][1] if scalings else None
    if scaling is not None:
        # transformers 5 lets a top-level original_max_position_embeddings (Phi-3's
        # habit) stand in for, and take precedence over, the dict's.
        top = cfg.get("original_max_position_embeddings")
        inner = scaling["original_max_position_embeddings"]
        where = scalings[0][0] + ".original_max_position_embeddings"
        if top is not None:
            top = _original_max(top, "original_max_position_embeddings", path)
            if inner is not None and inner != top:
                raise FormatError(f"{path}: original_max_position_embeddings = {top} and {where} = {inner} "
                                  f"disagree")
            scaling["original_max_position_embeddings"] = top
        elif inner is None:
            raise FormatError(f"{path}: {where} is missing (rope_type 'llama3' needs it; qinfer does not "
                              f"guess it)")
    return theta, scaling


def _describe(scaling):
    if scaling is None:
        return "no scaling (rope_type 'default')"
    return ", ".join(f"{k} {v!r}" for k, v in scaling.items())


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
