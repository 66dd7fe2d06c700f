"""A BCQ checkpoint directory (qinfer.quantize(method="bcq")) -> ModelSource (the walk over
its tensors: readers/own_format.py).

Binary-coding quantization (quant/bcq.py): per output row and group of input columns,
w = sum_i alpha_i b_i + offset with b_i = +-1. Recognized by quant_method "qinfer_bcq"
in config.json's quantization_config or, without one, quantize_config.json's.
Settings, each checked:

    bits         2, 3 or 4: sign planes per weight (the lookup-table kernels' widths)
    group_size   input columns per alpha and offset: a multiple of 16 dividing every
                 quantized layer's inputs, or -1 (full columns)
    rounds       informational: the alternating refinement's rounds

Any other key is refused (quantize_config.json's "qinfer" object, the writer's record
of the run, is read past). Where both files give a setting they must agree.

Per quantized linear layer of the blocks (docs/FORMAT.md, section 6): `.bcq_planes`
U8 [bits, out, in / 8] (plane i's signs as bits, 1 for +1, eight input columns a byte,
the first in bit 0), `.bcq_alphas` F16 [groups, out, bits] (finite),
`.bcq_offsets` F16 [groups, out] (finite). Everything else is float.
"""
import os

import numpy as np

from ..errors import FormatError, UnsupportedError
from .own_format import check_entries, declares_method, load_layers, whole
from .settings_files import merged_settings
from .source import BcqTensor

QUANT_METHOD = "qinfer_bcq"
BCQ_BITS = (2, 3, 4)
BLOCK = 16                    # the kernels' input block: group sizes are multiples of it
SETTINGS = ("bits", "group_size")
INFORMATIONAL = ("quant_method", "rounds", "qinfer")


def is_bcq(directory, cfg):
    """Whether load_hf (readers/__init__.py) should hand this directory to load_bcq."""
    return declares_method(directory, cfg, QUANT_METHOD)


def _read_settings(entries, where):
    """The settings one file gives, each checked; a key qinfer does not know is refused."""
    check_entries(entries, where, QUANT_METHOD, "a BCQ", SETTINGS + INFORMATIONAL)
    out = {}
    if "bits" in entries:
        bits = entries["bits"]
        if not whole(bits) or bits not in BCQ_BITS:
            raise UnsupportedError(f"{where}: bits {bits!r} is not supported (BCQ layers take 2, 3 or 4 planes)"[:300])
        out["bits"] = bits
    if "group_size" in entries:
        g = entries["group_size"]
        if not whole(g) or not (g == -1 or (g > 0 and g % BLOCK == 0)):
            raise UnsupportedError(f"{where}: group_size {g!r} is not supported (a positive multiple of {BLOCK}, "
                                   f"or -1 for full columns)"[:300])
        out["group_size"] = g
    rounds = entries.get("rounds")
    if rounds is not None and (not whole(rounds) or rounds < 0):
        raise FormatError(f"{where}: rounds must be an integer >= 0, got {rounds!r}"[:300])
    return out


def _bcq_tensor(layer, shape, settings):
    bits, group_size = settings["bits"], settings["group_size"]
    out_features, in_features = shape
    group = in_features if group_size == -1 else group_size
    where = f" ({bits}-bit, group_size {group_size}, layer [{out_features}, {in_features}])"
    if in_features % group or in_features % BLOCK:
        raise UnsupportedError(f"{layer.directory}: {layer.base} has {in_features} inputs, which group_size "
                               f"{group_size} does not divide (BCQ layers need groups of a multiple of {BLOCK} "
                               f"inputs dividing them)")
    groups = in_features // group
    packed = layer.tensor("bcq_planes", "U8", (bits, out_features, in_features // 8), where)
    alphas = layer.tensor("bcq_alphas", "F16", (groups, out_features, bits), where)
    offsets = layer.tensor("bcq_offsets", "F16", (groups, out_features), where)
    if not np.isfinite(alphas).all():
        layer.fail("bcq_alphas", "a plane's scale is NaN or infinite")
    if not np.isfinite(offsets).all():
        layer.fail("bcq_offsets", "an offset is NaN or infinite")
    bitsets = np.unpackbits(packed, axis=2, bitorder="little")
    planes = np.where(bitsets, np.int8(1), np.int8(-1))
    return BcqTensor(bits=bits, group_size=group_size, planes=planes, alphas=alphas.astype(np.float32),
                     offsets=offsets.astype(np.float32), shape=shape)


def load_bcq(directory, cfg, config_path):
    settings = merged_settings(os.fspath(directory), cfg, config_path, _read_settings, SETTINGS)
    return load_layers(directory, cfg, config_path, "bcq", "BCQ", "bcq_planes",
                       lambda layer, shape: _bcq_tensor(layer, shape, settings))
