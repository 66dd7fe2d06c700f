"""A Hugging Face LLaMA config.json (already parsed) -> ModelConfig, every field type-checked.

Fields that would change the maths in a way qinfer does not implement (biases,
another activation, sliding-window attention, other RoPE types, ...) are
refused naming the field, never ignored; RoPE fields in transformers 4's and
5's shapes are read by readers/rope_scaling.py.
"""
import math

from ..errors import FormatError, UnsupportedError
from . import rope_scaling
from .source import ModelConfig

_MISSING = object()


def _int(cfg, key, path, default=_MISSING, minimum=1):
    v = cfg.get(key)
    if v is None:            # absent or null
        if default is _MISSING:
            raise FormatError(f"{path}: required field {key!r} is missing")
        return default
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise FormatError(f"{path}: {key} must be an integer >= {minimum}, got {v!r}")
    return v


def _float(cfg, key, path, default):
    v = cfg.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise FormatError(f"{path}: {key} must be a positive number, got {v!r}")
    return float(v)


def _token_ids(v, key, path):
    """eos_token_id may be an int, a list of ints or null."""
    if v is None:
        return []
    ids = v if isinstance(v, list) else [v]
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise FormatError(f"{path}: {key} must be a non-negative integer or a list of them, got {v!r}")
    return list(dict.fromkeys(ids))        # unique, in order


# transformers' ACT2FN maps both names to the same x * sigmoid(x) (SiLU), SwiGLU's gate.
SILU_NAMES = ("silu", "swish")
# quantization_config.quant_method values whose checkpoints are plain float tensors:
# transformers dequantizes a GGUF to float on load and save_pretrained keeps the
# "gguf" tag over the float weights (readers/hf.py checks they really are float).
FLOAT_QUANT_METHODS = ("gguf",)


def _flag(cfg, key, path):
    """An optional true/false field (null or absent = false)."""
    v = cfg.get(key)
    if v is not None and not isinstance(v, bool):
        raise FormatError(f"{path}: {key} must be true, false or null, got {v!r}")
    return bool(v)


def quant_method(cfg):
    quant = cfg.get("quantization_config")
    return quant.get("quant_method") if isinstance(quant, dict) else None


def check_architecture(cfg, path):
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures")
    if model_type is None and isinstance(archs, list) and archs:
        model_type = "llama" if archs == ["LlamaForCausalLM"] else archs[0]
    if model_type != "llama":
        raise UnsupportedError(f"{path}: model_type {model_type!r} is not supported (qinfer loads LLaMA models, "
                               f"model_type 'llama' / LlamaForCausalLM)")
    quant = cfg.get("quantization_config")
    if quant is not None:
        method = quant_method(cfg)
        if method == "gptq":
            raise UnsupportedError(f"{path}: GPTQ checkpoints (quantization_config.quant_method 'gptq') are not "
                                   f"supported yet")
        if method not in FLOAT_QUANT_METHODS:
            raise UnsupportedError(f"{path}: quantized checkpoints with quant_method {method!r} are not supported")
    check_unsupported(cfg, path)


def check_unsupported(cfg, path):
    """Fields of a LLaMA config that would change the maths in ways qinfer does not implement."""
    for flag in ("attention_bias", "mlp_bias"):
        if _flag(cfg, flag, path):
            raise UnsupportedError(f"{path}: {flag} = true is not supported (qinfer's LLaMA has no biases)")
    act = cfg.get("hidden_act", "silu")       # LlamaConfig's default
    if act not in SILU_NAMES:
        raise UnsupportedError(f"{path}: hidden_act {act!r} is not supported (qinfer's MLP is SwiGLU: "
                               f"hidden_act 'silu')")
    # transformers' LlamaModel itself ignores a window, but a LLaMA config naming one
    # comes from a model that attended through it: full attention would not be that
    # model. use_sliding_window = false (Qwen2's switch) says the window is off.
    if cfg.get("sliding_window") is not None and cfg.get("use_sliding_window") is not False:
        raise UnsupportedError(f"{path}: sliding_window = {cfg['sliding_window']!r} (sliding-window attention) "
                               f"is not supported; qinfer attends to the whole context")
    if _flag(cfg, "use_sliding_window", path):
        raise UnsupportedError(f"{path}: use_sliding_window = true (sliding-window attention) is not supported")
    layer_types = cfg.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list):
            raise FormatError(f"{path}: layer_types must be a list or null, got {layer_types!r}")
        other = sorted({repr(t) for t in layer_types if t != "full_attention"})
        if other:
            raise UnsupportedError(f"{path}: layer_types {', '.join(other)} are not supported (qinfer runs "
                                   f"'full_attention' in every layer)")
    # pretraining_tp > 1 made some transformers 4 versions split each projection into
    # that many slices and add the partial products: the same sums in another order,
    # not another model (later versions ignore the field). Accepted, whatever its value.


def model_config(cfg, path, extra_eos=()):
    """cfg: config.json as a dict. extra_eos: more end-of-sequence ids (from generation_config.json)."""
    check_architecture(cfg, path)
    hidden = _int(cfg, "hidden_size", path)
    n_head = _int(cfg, "num_attention_heads", path)
    n_kv = _int(cfg, "num_key_value_heads", path, default=None)
    # An explicit head_dim is honoured even when it is not hidden_size / num_attention_heads:
    # the forward pass sizes q/k/v and o_proj by num_heads * head_dim (pyx/forward.c),
    # and readers/validate.py holds the tensors to those shapes.
    head_dim = _int(cfg, "head_dim", path, default=None)
    if head_dim is None:
        if hidden % n_head:
            raise FormatError(f"{path}: hidden_size {hidden} is not a multiple of num_attention_heads {n_head} "
                              f"and no head_dim is given")
        head_dim = hidden // n_head
    tie = cfg.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise FormatError(f"{path}: tie_word_embeddings must be true or false, got {tie!r}")
    eos = _token_ids(cfg.get("eos_token_id"), "eos_token_id", path)
    eos += [t for t in extra_eos if t not in eos]
    theta, scaling = rope_scaling.from_hf_config(cfg, path)
    return ModelConfig(
        vocab_size=_int(cfg, "vocab_size", path),
        hidden_size=hidden,
        intermediate_size=_int(cfg, "intermediate_size", path),
        num_hidden_layers=_int(cfg, "num_hidden_layers", path),
        num_attention_heads=n_head,
        num_key_value_heads=n_kv if n_kv is not None else n_head,
        head_dim=head_dim,
        rms_norm_eps=_float(cfg, "rms_norm_eps", path, 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=_int(cfg, "max_position_embeddings", path, default=2048),
        tie_word_embeddings=tie,
        bos_token_id=_int(cfg, "bos_token_id", path, default=None, minimum=0),
        eos_token_ids=eos,
    )
