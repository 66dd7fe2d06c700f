"""A Hugging Face LLaMA checkpoint directory -> ModelSource.

    config.json                      required (readers/hf_config.py)
    model.safetensors                or model.safetensors.index.json + its shards
    tokenizer.json | tokenizer.model tokenizer (the first found), tokenizer_config.json if any
    chat template                    tokenizer_config.json["chat_template"], else chat_template.jinja
    generation_config.json           optional: its eos_token_id(s) join config.json's

A GPTQ checkpoint (quantization_config.quant_method "gptq", or a
quantize_config.json) is read by readers/gptq.py, which builds on the
public helpers here (weight_files, generation_eos, shard_of, model_source);
readers/__init__.py's load_hf picks the reader. quant_method "gguf" is what
transformers writes after dequantizing a GGUF to float: such a checkpoint is
read here as the float model it is, provided every tensor is float.

tie_word_embeddings must match the files: when true, an lm_head.weight that is
stored anyway must equal the embedding (else which one is the head would be a
guess); when false, lm_head.weight must be there.

Tensors are views on the shards' memory maps (BF16/F16 lazily converted to
float32); only the tensors the config calls for are taken, so leftovers such
as rotary inv_freq buffers are ignored.
"""
import os

import numpy as np

from ..errors import FormatError, UnsupportedError
from ..tokenizer.spec import TokenizerSpec
from . import validate
from .hf_config import FLOAT_QUANT_METHODS, model_config, quant_method
from .jsonfile import read_json
from .safetensors import read_safetensors
from .source import ModelSource

SINGLE = "model.safetensors"
EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
INDEX = "model.safetensors.index.json"
MAX_TEMPLATE_BYTES = 16 << 20


def read_config(directory):
    """(config.json's object, its path): every Hugging Face checkpoint directory has one."""
    directory = os.fspath(directory)
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise FormatError(f"{directory}: no config.json (a Hugging Face checkpoint directory needs one)")
    return read_json(config_path), config_path


def load_float(directory, cfg, config_path):
    """A float checkpoint (readers/__init__.py's load_hf routes GPTQ ones to readers/gptq.py)."""
    directory = os.fspath(directory)
    config = model_config(cfg, config_path, extra_eos=generation_eos(directory))
    validate.check_config(config, config_path)

    needed = validate.expected_shapes(config)
    shards, owner = weight_files(directory)
    method = quant_method(cfg)
    tensors = {}
    for name in needed:
        if name not in owner:
            hint = (f"; config.json has tie_word_embeddings = false, so the LM head is not the embedding"
                    if name == LM_HEAD else "")
            raise FormatError(f"{directory}: tensor {name!r} is missing from the checkpoint "
                              f"(expected shape {list(needed[name])}){hint}")
        tensors[name] = _float_tensor(shards, owner, name, method)
    validate.check_tensors(config, tensors, directory)
    validate.check_no_extra_layers(config, owner, directory)
    if config.tie_word_embeddings and LM_HEAD in owner:
        _check_tied_head(tensors[EMBED], _float_tensor(shards, owner, LM_HEAD, method), directory)
    return model_source(directory, "hf", config, tensors, shards)


def model_source(directory, format, config, tensors, shards):
    """The ModelSource of a checkpoint directory: its tokenizer and chat template read here, the
    shards' memory maps kept alive for the tensors that view them."""
    tok_config = _optional_json(os.path.join(directory, "tokenizer_config.json"))
    return ModelSource(path=directory, format=format, config=config, tensors=tensors,
                       tokenizer=_tokenizer(directory, tok_config),
                       chat_template=_chat_template(directory, tok_config),
                       keepalive=[s.mmap for s in shards.values() if s.mmap is not None])


def shard_of(shards, owner, name):
    """(the SafetensorsFile holding tensor `name`, the tensor); owner maps names to shard files."""
    shard = shards[owner[name]]
    if name not in shard:
        raise FormatError(f"{shard.path}: tensor {name!r} is listed in {INDEX} but not in this shard")
    return shard, shard[name]


def _float_tensor(shards, owner, name, method):
    shard, tensor = shard_of(shards, owner, name)
    if shard.dtypes[name] not in ("F32", "F16", "BF16"):
        if method in FLOAT_QUANT_METHODS:
            raise UnsupportedError(f"{shard.path}: tensor {name!r} has dtype {shard.dtypes[name]}: config.json's "
                                   f"quantization_config.quant_method {method!r} is read only over float tensors "
                                   f"(F32, F16, BF16)")
        raise FormatError(f"{shard.path}: tensor {name!r} has dtype {shard.dtypes[name]}, expected a "
                          f"float type (F32, F16, BF16)")
    return tensor


def _check_tied_head(embedding, head, directory):
    """tie_word_embeddings = true with an lm_head.weight stored too: it must be the embedding."""
    if tuple(head.shape) != tuple(embedding.shape):
        raise FormatError(f"{directory}: config.json has tie_word_embeddings = true but {LM_HEAD!r} has shape "
                          f"{list(head.shape)}, not the embedding's {list(embedding.shape)}")
    for (start, a), (_, b) in zip(_row_blocks(embedding), _row_blocks(head)):
        if not np.array_equal(a, b):
            raise FormatError(f"{directory}: config.json has tie_word_embeddings = true but the checkpoint's "
                              f"{LM_HEAD!r} differs from {EMBED!r} (from row {start}); qinfer does not guess "
                              f"which is the LM head")


def _row_blocks(t, rows=4096):
    """(first row, float32 block) over a float tensor, without converting all of it at once where the
    stored values can be sliced (F32 arrays, F16's half view); a BF16 LazyTensor is converted whole."""
    values = t if isinstance(t, np.ndarray) else getattr(t, "half", None)
    if values is None:
        values = t()
    for start in range(0, values.shape[0], rows):
        yield start, np.asarray(values[start:start + rows], dtype=np.float32)


def weight_files(directory):
    """-> ({file name: SafetensorsFile}, {tensor name: file name})."""
    single = os.path.join(directory, SINGLE)
    index_path = os.path.join(directory, INDEX)
    if os.path.isfile(single):
        f = read_safetensors(single)
        return {SINGLE: f}, {name: SINGLE for name in f.tensors}
    if not os.path.isfile(index_path):
        if any(n.endswith(".bin") or n.endswith(".pt") for n in os.listdir(directory)):
            raise UnsupportedError(f"{directory}: PyTorch .bin/.pt checkpoints are not supported; "
                                   f"qinfer reads {SINGLE} or {INDEX}")
        raise FormatError(f"{directory}: no {SINGLE} or {INDEX}")
    index = read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise FormatError(f"{index_path}: weight_map must be an object of tensor name -> file name")
    shards = {}
    for file_name in sorted(set(weight_map.values())):
        # Shards live next to the index; a path would let an index point anywhere on disk.
        if os.path.basename(file_name) != file_name or file_name in ("", ".", ".."):
            raise FormatError(f"{index_path}: shard {file_name!r} must be a plain file name in {directory}")
        shard_path = os.path.join(directory, file_name)
        if not os.path.isfile(shard_path):
            raise FormatError(f"{index_path}: shard {file_name!r} does not exist in {directory}")
        shards[file_name] = read_safetensors(shard_path)
    return shards, weight_map


def _optional_json(path):
    return read_json(path) if os.path.isfile(path) else None


def generation_eos(directory):
    gen = _optional_json(os.path.join(directory, "generation_config.json"))
    if not gen or gen.get("eos_token_id") is None:
        return []
    v = gen["eos_token_id"]
    ids = v if isinstance(v, list) else [v]
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise FormatError(f"{directory}/generation_config.json: eos_token_id must be an integer or a list of them")
    return ids


def _tokenizer(directory, tok_config):
    for file_name, kind in (("tokenizer.json", "hf_json"), ("tokenizer.model", "sentencepiece_file")):
        path = os.path.join(directory, file_name)
        if os.path.isfile(path):
            return TokenizerSpec(kind=kind, path=path, config=tok_config)
    return None


def _chat_template(directory, tok_config):
    if tok_config is not None and tok_config.get("chat_template") is not None:
        return _pick_template(tok_config["chat_template"], os.path.join(directory, "tokenizer_config.json"))
    path = os.path.join(directory, "chat_template.jinja")
    if not os.path.isfile(path):
        return None
    try:
        if os.path.getsize(path) > MAX_TEMPLATE_BYTES:
            raise FormatError(f"{path}: larger than {MAX_TEMPLATE_BYTES} bytes")
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: cannot read the chat template ({e})") from None


def _pick_template(value, path):
    """A string, or (newer tokenizers) a list of {"name", "template"}: take the one named "default"."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in value):
        named = {t["name"]: t["template"] for t in value}
        if "default" in named:
            return named["default"]
        return None
    raise FormatError(f"{path}: chat_template must be a string or a list of {{name, template}} objects")
