"""What qinfer's own quantized checkpoints (SpQR: readers/spqr.py, BCQ: readers/bcq.py)
share: how the directory says its method, each quantized layer's tensors read and
checked (LayerTensors), and the walk over the model's tensors (load_layers)."""
import os

import numpy as np

from ..errors import FormatError, UnsupportedError
from . import validate
from .hf import generation_eos, model_source, shard_of, weight_files
from .hf_config import model_config
from .jsonfile import read_json
from .settings_files import QUANTIZE_CONFIG

BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def whole(value):
    """An int that is not a bool (JSON's true is not a number of bits)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_entries(entries, where, method, title, known):
    """One settings file's entries: a JSON object naming `method` (or none) whose keys are all
    `known`; a key qinfer does not know is refused, as it may change the weights."""
    if not isinstance(entries, dict):
        raise FormatError(f"{where}: must be a JSON object")
    named = entries.get("quant_method", method)
    if named != method:
        raise FormatError(f"{where}: quant_method {named!r} in {title} checkpoint (expected {method!r})"[:300])
    unknown = sorted(set(entries) - set(known))
    if unknown:
        kind = title.split(" ", 1)[1]
        raise UnsupportedError(f"{where}: unknown {kind} setting {unknown[0]!r}"
                               f"{f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''}; qinfer does "
                               f"not know how it changes the weights, so it does not load them"[:300])


def declares_method(directory, cfg, method):
    """Whether config.json's quantization_config (or, without one, quantize_config.json) names
    quant_method `method`."""
    quant = cfg.get("quantization_config")
    if isinstance(quant, dict):
        return quant.get("quant_method") == method
    path = os.path.join(directory, QUANTIZE_CONFIG)
    return quant is None and os.path.isfile(path) and read_json(path).get("quant_method") == method


class LayerTensors:
    """Reads one quantized linear layer's tensors, each checked, each error naming file and tensor."""

    def __init__(self, base, get, owner, directory, marker):
        self.base, self.get, self.owner, self.directory, self.marker = base, get, owner, directory, marker

    def has(self, part):
        return f"{self.base}.{part}" in self.owner

    def tensor(self, part, dtype, shape, why=""):
        """The array of `base.part`: dtype as the file names it, shape (None: any length)."""
        name = f"{self.base}.{part}"
        if name not in self.owner:
            raise FormatError(f"{self.directory}: {name} is missing (next to {self.base}.{self.marker})")
        shard, t = self.get(name)
        if shard.dtypes[name] != dtype:
            raise FormatError(f"{shard.path}: {name} has dtype {shard.dtypes[name]}, expected {dtype}")
        got = tuple(t.shape)
        if len(got) != len(shape) or any(w is not None and g != w for g, w in zip(got, shape)):
            want = ", ".join("n" if w is None else str(w) for w in shape)
            raise FormatError(f"{shard.path}: {name} has shape {list(got)}, expected [{want}]{why}")
        return np.asarray(t.half if dtype == "F16" else t)

    def fail(self, part, problem):
        name = f"{self.base}.{part}"
        raise FormatError(f"{self.get(name)[0].path}: {name}: {problem}")



def _float(name, get):
    shard, t = get(name)
    if shard.dtypes[name] not in ("F32", "F16", "BF16"):
        raise FormatError(f"{shard.path}: tensor {name!r} has dtype {shard.dtypes[name]}, expected a "
                          f"float type (F32, F16, BF16)")
    return t


def load_layers(directory, cfg, config_path, fmt, title, marker, read_layer):
    """The ModelSource of format `fmt`: each linear layer of the blocks stored quantized (its
    `base.marker` tensor present) becomes read_layer(LayerTensors, (out, in)); every other
    tensor is float. title names the method in errors."""
    directory = os.fspath(directory)
    plain = {k: v for k, v in cfg.items() if k != "quantization_config"}
    config = model_config(plain, config_path, extra_eos=generation_eos(directory))
    validate.check_config(config, config_path)
    shards, owner = weight_files(directory)

    def get(name):
        return shard_of(shards, owner, name)

    tensors = {}
    for name, shape in validate.expected_shapes(config).items():
        base = name[:-len(".weight")]
        if f"{base}.{marker}" in owner:
            if name in owner:
                raise FormatError(f"{directory}: {base} is stored twice, as {base}.{marker} (quantized) and as "
                                  f"{name} (float); qinfer does not guess which one is the layer")
            if not base.endswith(BLOCK_LINEARS):
                raise UnsupportedError(f"{directory}: {base} is stored quantized; a {title} checkpoint quantizes "
                                       f"the blocks' linear layers only (the embedding and LM head are float)")
            tensors[name] = read_layer(LayerTensors(base, get, owner, directory, marker), shape)
        elif name in owner:
            tensors[name] = _float(name, get)
        else:
            raise FormatError(f"{directory}: tensor {name!r} is missing from the checkpoint "
                              f"(neither {base}.{marker} nor {name})")
    validate.check_tensors(config, tensors, directory)
    validate.check_no_extra_layers(config, owner, directory)
    return model_source(directory, fmt, config, tensors, shards)
