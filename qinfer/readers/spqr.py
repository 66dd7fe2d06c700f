"""An SpQR checkpoint directory (qinfer.quantize(method="spqr")) -> ModelSource (the walk over
its tensors: readers/own_format.py).

Recognized by config.json["quantization_config"]["quant_method"] == "qinfer_spqr",
or, when config.json has no quantization_config, by quantize_config.json's
(readers/__init__.py's load_hf routes it here). Settings, each checked:

    bits               2, 3 or 4
    group_size         beta1: input columns per group, a multiple of 16 that splits
                       every quantized layer's inputs into two groups or more
    stat_bits          2 to 8: bits of each group scale's code
    stat_group         beta2: output rows per second-level scale and zero; must be 16
                       (the kernels read the statistics as records of 16 rows)
    outlier_threshold  informational: a number > 0, or null (no outliers kept)
    act_order          informational: true when every quantized layer has a .perm,
                       false when none has

Any other key is refused: qinfer cannot know whether it changes the weights
(quantize_config.json's "qinfer" object, the writer's record of the run, is
read past). Where both files give a setting they must agree.

Per quantized linear layer of the blocks (docs/FORMAT.md): `.qweight` I32
[in*bits/32, out] (the codes in the weight's own column order), `.spqr_stats`
U16 [ceil(out/16), in/group_size, stat_bits + bits + 2] (spqr_linear.py's
records), `.outlier_rows` I32 [out + 1], `.outlier_cols` U16 [n] (ascending
within a row), `.outlier_vals` F16 [n], and `.perm` I32 [in] with act-order.
A block's linear layer stored as plain `.weight` stays float; the embedding,
norms and LM head are float.
"""
import math
import os

import numpy as np

from ..errors import FormatError, ShapeError, UnsupportedError
from .own_format import check_entries, declares_method, load_layers, whole
from .settings_files import merged_settings
from .source import SpqrTensor

QUANT_METHOD = "qinfer_spqr"
STAT_GROUP = 16               # spqr_linear.RUN: output rows per record
SPQR_BITS = (2, 3, 4)
STAT_BITS = tuple(range(2, 9))
MAX_IN_FEATURES = 65536       # an outlier's column is 16 bits
SETTINGS = ("bits", "group_size", "stat_bits", "stat_group")      # what the weights are made of
INFORMATIONAL = ("quant_method", "outlier_threshold", "act_order", "qinfer")


def is_spqr(directory, cfg):
    """Whether load_hf (readers/__init__.py) should hand this directory to load_spqr."""
    return declares_method(directory, cfg, QUANT_METHOD)


# ------------------------------------------------------------------ settings
def _read_settings(entries, where):
    """The settings one file gives, each checked; a key qinfer does not know is refused."""
    check_entries(entries, where, QUANT_METHOD, "an SpQR", SETTINGS + INFORMATIONAL)
    out = {}
    if "bits" in entries:
        bits = entries["bits"]
        if not whole(bits) or bits not in SPQR_BITS:
            raise UnsupportedError(f"{where}: bits {bits!r} is not supported (SpQR layers take 2, 3 or 4)"[:300])
        out["bits"] = bits
    if "group_size" in entries:
        g = entries["group_size"]
        if not whole(g) or g <= 0 or g % 16:
            raise UnsupportedError(f"{where}: group_size {g!r} is not supported (a positive multiple of 16)"[:300])
        out["group_size"] = g
    if "stat_bits" in entries:
        s = entries["stat_bits"]
        if not whole(s) or s not in STAT_BITS:
            raise UnsupportedError(f"{where}: stat_bits {s!r} is not supported (2 to 8)"[:300])
        out["stat_bits"] = s
    if "stat_group" in entries:
        s = entries["stat_group"]
        if not whole(s) or s != STAT_GROUP:
            raise UnsupportedError(f"{where}: stat_group {s!r} is not supported: the kernels read the statistics "
                                   f"in runs of {STAT_GROUP} output rows (stat_group {STAT_GROUP})"[:300])
        out["stat_group"] = s
    t = entries.get("outlier_threshold")
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t) or t <= 0):
        raise FormatError(f"{where}: outlier_threshold must be a number > 0 or null (no outliers), got {t!r}"[:300])
    if entries.get("act_order") is not None:
        if not isinstance(entries["act_order"], bool):
            raise FormatError(f"{where}: act_order must be true or false, got {entries['act_order']!r}"[:300])
        out["act_order"] = entries["act_order"]
    return out


def _settings(directory, cfg, config_path):
    """{"bits", "group_size", "stat_bits", "stat_group"[, "act_order"]} from config.json and/or
    quantize_config.json."""
    return merged_settings(directory, cfg, config_path, _read_settings, SETTINGS)


# ------------------------------------------------------------------ tensors
def _spqr_tensor(layer, shape, settings):
    # numpy helpers of the run-time layer's module, imported on use (as ggml_quants.py borrows _runtime's)
    from ..spqr_linear import check_outliers, record_halves

    bits, group_size, stat_bits = settings["bits"], settings["group_size"], settings["stat_bits"]
    out_features, in_features = shape
    where = (f" ({bits}-bit, group_size {group_size}, stat_bits {stat_bits}, "
             f"layer [{out_features}, {in_features}])")
    if in_features % 32 or in_features > MAX_IN_FEATURES:
        raise UnsupportedError(f"{layer.directory}: {layer.base} has {in_features} inputs; SpQR layers take a "
                               f"multiple of 32 up to {MAX_IN_FEATURES}")
    if in_features % group_size or in_features == group_size:
        raise UnsupportedError(f"{layer.directory}: {layer.base} has {in_features} inputs, which group_size "
                               f"{group_size} does not split into two groups or more")
    runs, groups = -(-out_features // STAT_GROUP), in_features // group_size
    qweight = layer.tensor("qweight", "I32", (in_features * bits // 32, out_features), where)
    records = layer.tensor("spqr_stats", "U16", (runs, groups, record_halves(stat_bits, bits)), where)
    second_level = records[..., -2:].view(np.float16)
    if not np.isfinite(second_level).all():
        layer.fail("spqr_stats", "a second-level scale or zero is NaN or infinite")
    rows = layer.tensor("outlier_rows", "I32", (out_features + 1,), where)
    cols = layer.tensor("outlier_cols", "U16", (None,))
    vals = layer.tensor("outlier_vals", "F16", (None,))
    try:
        check_outliers(rows, cols, vals, out_features, in_features)
    except ShapeError as e:
        layer.fail("outlier_rows", f"with .outlier_cols and .outlier_vals, not an outlier table: {e}")
    # each column once per row, ascending: a repeated one would be added twice by the kernels
    # but once by a dequantizer's indexed add
    row_of = np.repeat(np.arange(out_features), np.diff(rows))
    same_row = row_of[1:] == row_of[:-1]
    if np.any(cols[1:][same_row] <= cols[:-1][same_row]):
        layer.fail("outlier_cols", "a row's outlier columns must be ascending, each column once")
    if not np.isfinite(vals).all():
        layer.fail("outlier_vals", "an outlier is NaN or infinite")
    perm = None
    if layer.has("perm"):
        perm = layer.tensor("perm", "I32", (in_features,), where)
        if not np.array_equal(np.sort(perm), np.arange(in_features)):
            layer.fail("perm", f"not a permutation of the {in_features} input columns")
    act_order = settings.get("act_order")
    if act_order is not None and act_order != (perm is not None):
        raise FormatError(f"{layer.directory}: {layer.base} has {'a' if perm is not None else 'no'} .perm but the "
                          f"settings say act_order {str(act_order).lower()}")
    return SpqrTensor(bits=bits, group_size=group_size, stat_bits=stat_bits, qweight=qweight, records=records,
                      outlier_rows=rows, outlier_cols=cols, outlier_vals=vals, perm=perm, shape=shape)


def load_spqr(directory, cfg, config_path):
    settings = _settings(os.fspath(directory), cfg, config_path)
    return load_layers(directory, cfg, config_path, "spqr", "SpQR", "qweight",
                       lambda layer, shape: _spqr_tensor(layer, shape, settings))
