"""A Hugging Face LLaMA config.json (already parsed) -> ModelConfig, every field type-checked."""
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
        method = quant.get("quant_method") if isinstance(quant, dict) else None
        if method == "gptq":
            raise UnsupportedError(f"{path}: GPTQ checkpoints (quantization_config.quant_method 'gptq') are not "
                                   f"supported yet")
        raise UnsupportedError(f"{path}: quantized checkpoints with quant_method {method!r} are not supported")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise UnsupportedError(f"{path}: {flag} = true is not supported (qinfer's LLaMA has no biases)")


def model_config(cfg, path, extra_eos=()):
    """cfg: config.json as a dict. extra_eos: more end-of-sequence ids (from generation_config.json)."""
    check_architecture(cfg, path)
    hidden = _int(cfg, "hidden_size", path)
    n_head = _int(cfg, "num_attention_heads", path)
    n_kv = _int(cfg, "num_key_value_heads", path, default=None)
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
