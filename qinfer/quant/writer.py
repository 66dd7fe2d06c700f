"""The qinfer checkpoint: a Hugging Face GPTQ directory (docs/FORMAT.md, section 4).

    config.json            the LLaMA config + quantization_config (as transformers writes it)
    quantize_config.json   AutoGPTQ's settings file + a "qinfer" object (method, calibration, version)
    model.safetensors      per linear layer qweight/qzeros/scales/g_idx (result.py), the
                           embedding, norms and an untied lm_head in float16 or float32
    tokenizer files        tokenizer_files.py

save_checkpoint writes it through checkpoint.OutputDir: all or nothing.
"""
import os

import numpy as np

from ..errors import QinferError
from . import checkpoint, dynamic, layout
from .tokenizer_files import tokenizer_files

FLOAT_DTYPES = ("float16", "float32")
DEFAULT_META = dict(sym=False, act_order=False, static_groups=False, true_sequential=False, method="gptq",
                    damp=None, nsamples=None, seqlen=None, seed=None, calibration=None, sink_weight=None, zero_point="int",
                    float_dtype="float16", clip_search=False, dynamic=None, activations=None, alpha=None,
                    smooth=None, smooth_down=False, lorc_rank=None, lm_head=False, lkd_steps=None,
                    lkd_lr=None)


def float_weight(source, name):
    """A weight of the source as float32 (packed GGUF blocks, SpQR and BCQ layers are dequantized)."""
    from ..linear import QuantizedLinear
    from ..readers.source import BcqTensor, PackedTensor, SpqrTensor

    t = source.tensors[name]
    if isinstance(t, PackedTensor):
        t = t.load()
        return QuantizedLinear.from_packed(t.qweight, t.scales, t.zeros, t.bits, t.group_size,
                                           t.g_idx).dequantize()
    if isinstance(t, SpqrTensor):
        from ..model import spqr_layer
        return spqr_layer(t).dequantize()
    if isinstance(t, BcqTensor):
        from ..model import bcq_layer
        return bcq_layer(t).dequantize()
    return np.ascontiguousarray(source.float_tensor(name))


def float_tensors(source, float_dtype="float16", lm_head=True):
    """The tensors that stay float (embedding, norms, untied lm_head unless not lm_head), in float_dtype."""
    if float_dtype not in FLOAT_DTYPES:
        raise QinferError(f"float_dtype must be one of {FLOAT_DTYPES}, got {float_dtype!r}")
    cfg = source.config
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(cfg.num_hidden_layers):
        names += [f"model.layers.{i}.input_layernorm.weight", f"model.layers.{i}.post_attention_layernorm.weight"]
    if not cfg.tie_word_embeddings and lm_head:
        names.append("lm_head.weight")
    dtype = np.dtype(float_dtype)
    out = {}
    for name in names:
        w = float_weight(source, name)
        if dtype == np.float16 and np.abs(w).max(initial=0) > np.finfo(np.float16).max:
            raise QinferError(f"{name} holds values beyond the float16 range; store the float tensors as "
                              f"float32 (float_dtype='float32', --float-dtype float32)")
        out[name] = w.astype(dtype)
    return out


def hf_config(source, quant_config, float_dtype):
    """config.json: the source's config (a Hugging Face source's own file, updated) + quantization_config."""
    from ..readers.jsonfile import read_json

    base = {}
    if source.format == "hf":
        base = read_json(os.path.join(source.path, "config.json"))
        base.pop("quantization_config", None)
    c = source.config
    base.update(
        architectures=["LlamaForCausalLM"], model_type="llama",
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, rope_scaling=c.rope_scaling,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
        attention_bias=False, mlp_bias=False, torch_dtype=float_dtype)
    base.setdefault("hidden_act", "silu")
    if c.bos_token_id is not None:
        base["bos_token_id"] = c.bos_token_id
    if c.eos_token_ids:
        base["eos_token_id"] = c.eos_token_ids[0] if len(c.eos_token_ids) == 1 else list(c.eos_token_ids)
    base["quantization_config"] = quant_config
    return base


def save_checkpoint(out, source, results, meta, force=False, floats=None, extra=None):
    """Write the checkpoint directory `out` (all or nothing); returns the checkpoint_format used.

    source: the float model's ModelSource; results: {"model.layers.{i}.<proj>": QuantResult} for
    every linear layer; meta: bits, group_size and optionally the keys of DEFAULT_META (dynamic:
    per-layer rules, quant/dynamic.py, which the results must follow); extra: {base name: {part:
    array}} written beside a layer's tensors (LoRC's lorc_a, lorc_b, with meta's lorc_rank). The format
    is v1 ("gptq", AutoGPTQ's) unless some zero point is 0, which v1 cannot store: then "gptq_v2";
    float zero points (zero_point "float") make it "qinfer_float_zero" (layout.py).
    """
    from .. import __version__
    from ..model import LINEAR_NAMES

    meta = dict(DEFAULT_META, **meta)
    rules = dynamic.Rules(meta["dynamic"], "dynamic")
    out = checkpoint.check_output(out, force, source.path)
    cfg = source.config
    bases = [f"model.layers.{i}.{hf_name}" for i in range(cfg.num_hidden_layers) for hf_name in LINEAR_NAMES.values()]
    for base in bases + (["lm_head"] if "lm_head" in results else []):     # a quantized head: the same rules
        r = results.get(base)
        if r is None:
            raise QinferError(f"no quantized result for {base}")
        want = rules.resolve(base, meta)
        if (r.bits, r.group_size) != (want["bits"], want["group_size"]):
            raise QinferError(f"{base} is {r.bits}-bit group {r.group_size}, "
                              f"not {want['bits']}-bit group {want['group_size']}")
    if floats is None:
        floats = float_tensors(source, meta["float_dtype"])
    kinds = {r.zero_point for r in results.values()}
    if len(kinds) > 1:
        raise QinferError("some layers have integer and some float zero points; a checkpoint holds one kind")
    if kinds == {"float"}:
        fmt = layout.FLOAT_ZERO_FORMAT
    else:
        fmt = "gptq_v2" if any(r.needs_v2() for r in results.values()) else "gptq"
    quant_config = {"quant_method": "gptq", "bits": meta["bits"], "group_size": meta["group_size"],
                    "sym": meta["sym"], "desc_act": bool(meta["act_order"]) or any(r.act_order for r in results.values()),
                    "static_groups": meta["static_groups"], "true_sequential": meta["true_sequential"],
                    "damp_percent": meta["damp"], "checkpoint_format": fmt}
    if rules:
        quant_config["dynamic"] = rules.to_json()
    if meta["activations"] == "int8-token":         # W8A8 (quant/w8a8.py): what the engine must run
        from ..readers.gptq import PER_TOKEN_INT8
        quant_config["input_activations"] = dict(PER_TOKEN_INT8)
    if meta["lorc_rank"]:
        quant_config["lorc_rank"] = meta["lorc_rank"]
    quantize_config = dict(quant_config, model_name_or_path=None, model_file_base_name="model",
                           qinfer={"version": __version__, "method": meta["method"],
                                   "nsamples": meta["nsamples"], "seqlen": meta["seqlen"], "seed": meta["seed"],
                                   "damp": meta["damp"], "sink_weight": meta["sink_weight"],
                                   "clip_search": bool(meta["clip_search"]),
                                   "calibration": meta["calibration"],
                                   **({"smoothquant_alpha": meta["alpha"]} if meta["alpha"] is not None else {}),
                                   **({"smooth_alpha": meta["smooth"]} if meta["smooth"] is not None else {}),
                                   **({"smooth_down": True} if meta["smooth_down"] else {}),
                                   **({"int8_lm_head": True} if meta["lm_head"] else {}),
                                   **({"lkd_steps": meta["lkd_steps"], "lkd_lr": meta["lkd_lr"]}
                                      if meta["lkd_steps"] else {}),
                                   "source": os.path.basename(os.path.normpath(source.path))})
    extra = extra or {}
    tensors = model_tensors(source, floats, lambda base: {**results[base].checkpoint_tensors(fmt),
                                                          **extra.get(base, {})})
    write_directory(out, force, source, tensors, hf_config(source, quant_config, meta["float_dtype"]),
                    quantize_config)
    return fmt


def layer_results(source, results):
    """(base name, result) of every linear layer of the blocks, in order; a QinferError names
    the first one `results` lacks."""
    from ..model import LINEAR_NAMES

    for i in range(source.config.num_hidden_layers):
        for hf_name in LINEAR_NAMES.values():
            base = f"model.layers.{i}.{hf_name}"
            if results.get(base) is None:
                raise QinferError(f"no quantized result for {base}")
            yield base, results[base]


def model_tensors(source, floats, layer_tensors):
    """model.safetensors' contents in the order written: the embedding, each block's norms and
    linear layers (layer_tensors(base name) -> {part: array}, stored as "<base>.<part>"), the
    final norm, an untied LM head."""
    from ..model import LINEAR_NAMES

    cfg = source.config
    tensors = {"model.embed_tokens.weight": floats["model.embed_tokens.weight"]}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = floats[p + "input_layernorm.weight"]
        tensors[p + "post_attention_layernorm.weight"] = floats[p + "post_attention_layernorm.weight"]
        for hf_name in sorted(LINEAR_NAMES.values()):
            for part, array in layer_tensors(p + hf_name).items():
                tensors[f"{p}{hf_name}.{part}"] = array
    tensors["model.norm.weight"] = floats["model.norm.weight"]
    if not cfg.tie_word_embeddings:
        if "lm_head.weight" in floats:
            tensors["lm_head.weight"] = floats["lm_head.weight"]
        else:                             # a quantized LM head (quant/w8a8.py's lm_head option)
            for part, array in layer_tensors("lm_head").items():
                tensors[f"lm_head.{part}"] = array
    return tensors


def write_directory(out, force, source, tensors, config, quantize_config):
    """The checkpoint directory `out`, all or nothing (checkpoint.OutputDir): model.safetensors,
    config.json, quantize_config.json and the tokenizer files."""
    from .. import __version__

    files = tokenizer_files(source, source.config.max_position_embeddings)
    with checkpoint.OutputDir(out, force) as d:
        checkpoint.write_safetensors(os.path.join(d.path, "model.safetensors"), tensors,
                                     {"format": "pt", "quantizer": f"qinfer {__version__}"})
        checkpoint.write_json(os.path.join(d.path, "config.json"), config)
        checkpoint.write_json(os.path.join(d.path, "quantize_config.json"), quantize_config)
        for name, data in files.items():
            with open(os.path.join(d.path, name), "wb") as f:
                f.write(data)
        d.commit()
