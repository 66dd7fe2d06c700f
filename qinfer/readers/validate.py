"""One place that checks a ModelSource's config and tensors agree, whatever the file format.

Readers map names and orientation; this module knows what a LLaMA model of a
given config must contain (names and shapes listed in source.py) and rejects
anything missing, misshaped or unexpected, naming the tensor and the file.
"""
import math
import re

import numpy as np

from ..errors import FormatError, UnsupportedError
from .rope_scaling import MIN_THETA
from .source import BcqTensor, PackedTensor, SpqrTensor

# Far above any real model; it keeps a corrupt layer count from making us
# enumerate billions of expected tensor names before noticing they are missing.
MAX_LAYERS = 1 << 12
# Sizes reach the C forward pass as C ints; a larger value (max_position_embeddings
# sets the default context) must be refused here, not overflow there.
MAX_INT = (1 << 31) - 1
# rms_norm_eps only keeps RMSNorm's division away from zero: configs use 1e-5 or
# 1e-6, below the mean squares of real hidden states (a LLaMA embedding row's is
# about 1e-4). Above 1e-2 it would dominate the norm of every row: a mistyped
# field, not a model.
MAX_RMS_NORM_EPS = 1e-2

_LAYER_PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def check_config(config, path):
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
        v = getattr(config, field)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise FormatError(f"{path}: {field} must be a positive integer, got {v!r}")
        if v > MAX_INT:
            raise FormatError(f"{path}: {field} = {v} is beyond what qinfer accepts (at most 2**31 - 1)")
    for field in ("rms_norm_eps", "rope_theta"):
        v = getattr(config, field)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise FormatError(f"{path}: {field} must be a positive number, got {v!r}")
    if config.rms_norm_eps > MAX_RMS_NORM_EPS:
        raise FormatError(f"{path}: rms_norm_eps = {config.rms_norm_eps!r} is outside (0, {MAX_RMS_NORM_EPS:g}]")
    if config.rope_theta < MIN_THETA:
        raise FormatError(f"{path}: rope_theta (the RoPE base) must be >= {MIN_THETA:g}, got {config.rope_theta!r}")
    if config.num_hidden_layers > MAX_LAYERS:
        raise FormatError(f"{path}: {config.num_hidden_layers} layers is more than the {MAX_LAYERS} qinfer accepts")
    if config.num_attention_heads % config.num_key_value_heads:
        raise FormatError(f"{path}: {config.num_attention_heads} attention heads are not a multiple of "
                          f"{config.num_key_value_heads} key/value heads")
    if config.head_dim % 2:
        raise FormatError(f"{path}: head_dim {config.head_dim} must be even for RoPE")
    for t in [config.bos_token_id] + list(config.eos_token_ids):
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < config.vocab_size):
            raise FormatError(f"{path}: special token id {t!r} is outside the vocabulary of {config.vocab_size}")


def expected_shapes(config):
    """Hugging Face tensor name -> shape, for every tensor the model needs."""
    h, v = config.hidden_size, config.vocab_size
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    ff = config.intermediate_size
    proj = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, q), "mlp.gate_proj": (ff, h), "mlp.up_proj": (ff, h),
            "mlp.down_proj": (h, ff)}
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        for name in _LAYER_PROJ:
            shapes[p + name + ".weight"] = proj[name]
    return shapes


def tensor_shape(t):
    """Shape of any Tensor of source.py: PackedTensor, SpqrTensor, ndarray or LazyTensor (anything with .shape)."""
    return tuple(t.shape)


def check_tensors(config, tensors, path):
    """Every expected tensor present with its shape, nothing else; PackedTensors self-consistent."""
    expected = expected_shapes(config)
    for name, shape in expected.items():
        if name not in tensors:
            raise FormatError(f"{path}: tensor {name!r} is missing (expected shape {list(shape)})")
        got = tensor_shape(tensors[name])
        if got != shape:
            how = (f" (num_attention_heads {config.num_attention_heads}, num_key_value_heads "
                   f"{config.num_key_value_heads}, head_dim {config.head_dim})" if ".self_attn." in name else "")
            raise FormatError(f"{path}: tensor {name!r} has shape {list(got)}, expected {list(shape)} "
                              f"from the config{how}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise UnsupportedError(f"{path}: unexpected tensor {extra[0]!r}"
                               f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}: "
                               f"not part of a LLaMA model with this config")
    check_half_tables(tensors, path)
    for name, t in tensors.items():
        if isinstance(t, PackedTensor):
            if t.make is None:         # a lazy one (GGUF blocks) is consistent by construction
                _check_packed(name, t, path)
        elif isinstance(t, (SpqrTensor, BcqTensor)):
            continue                   # readers/spqr.py and bcq.py checked each of their arrays, naming them
        elif not callable(t):
            kind = getattr(getattr(t, "dtype", None), "kind", None)
            if kind != "f":
                raise FormatError(f"{path}: tensor {name!r} must hold floats, got {getattr(t, 'dtype', type(t))}")


def check_half_tables(tensors, path):
    """The embedding and LM head stored as F16 are used as stored (the model never converts them, so
    source.float_tensor's check does not see them): NaN/Inf there is refused here."""
    from .source import check_finite
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        half = getattr(tensors.get(name), "half", None)
        if half is not None and not np.isfinite(half.sum(dtype=np.float64)):
            check_finite(np.asarray(half, dtype=np.float32), name, path)


def _check_packed(name, t, path):
    out, inp = t.shape
    groups = 1 if t.group_size == -1 else inp // t.group_size
    want = {"qweight": (inp * t.bits // 32, out), "scales": (groups, out), "zeros": (groups, out)}
    for field, shape in want.items():
        got = getattr(t, field).shape
        if got != shape:
            raise FormatError(f"{path}: packed tensor {name!r}: {field} has shape {list(got)}, "
                              f"expected {list(shape)}")
    if t.qweight.dtype != np.int32 or t.scales.dtype != np.float32 or t.zeros.dtype != np.float32:
        raise FormatError(f"{path}: packed tensor {name!r} has dtypes {t.qweight.dtype}/{t.scales.dtype}/"
                          f"{t.zeros.dtype}, expected int32/float32/float32")


_LAYER_INDEX = re.compile(r"model\.layers\.(\d+)\.")


def check_no_extra_layers(config, names, path):
    """A checkpoint whose files hold layers beyond num_hidden_layers: the config is wrong (or the files
    are), and running only the first layers would generate garbage."""
    n = config.num_hidden_layers
    extra = sorted({int(m.group(1)) for m in map(_LAYER_INDEX.match, names) if m and int(m.group(1)) >= n})
    if extra:
        raise FormatError(f"{path}: the checkpoint has tensors of layer {extra[0]}"
                          f"{f' (up to {extra[-1]})' if len(extra) > 1 else ''} but config.json's "
                          f"num_hidden_layers is {n}")
