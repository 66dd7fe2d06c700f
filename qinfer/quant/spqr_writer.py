"""The SpQR checkpoint (qinfer.quantize(method="spqr")), which readers/spqr.py reads.

    config.json            the LLaMA config + quantization_config: quant_method "qinfer_spqr",
                           bits, group_size (beta1), stat_bits, stat_group (beta2, 16),
                           outlier_threshold (null: no outliers), act_order
    quantize_config.json   the same settings + a "qinfer" object (method, calibration, version)
    model.safetensors      per linear layer (spqr_tensors): .qweight, .spqr_stats, .outlier_rows,
                           .outlier_cols, .outlier_vals, .perm with act-order; the embedding, norms
                           and an untied lm_head in float16 or float32, as the GPTQ writer stores them
    tokenizer files        tokenizer_files.py

save_spqr_checkpoint writes it through checkpoint.OutputDir (writer.write_directory): all or nothing.
"""
import math
import os

import numpy as np

from .. import packing
from ..errors import QinferError
from ..readers.spqr import QUANT_METHOD, STAT_GROUP
from . import checkpoint
from .writer import float_tensors, hf_config, layer_results, model_tensors, write_directory

# meta keys beyond bits, group_size, stat_bits and outlier_threshold, and their defaults
DEFAULT_META = dict(act_order=False, true_sequential=False, method="spqr", damp=None, nsamples=None, seqlen=None,
                    seed=None, calibration=None, sink_weight=None, clip_search=False, float_dtype="float16")


def spqr_tensors(result):
    """One layer's checkpoint tensors {part: array} from spqr.SpqrResult: the codes packed in
    the weight's own column order, the statistics as spqr_linear.py's records, the outliers'
    table as it is, and act-order's permutation."""
    from ..spqr_linear import pack_records

    if result.stat_group != STAT_GROUP:
        raise QinferError(f"an SpQR checkpoint holds statistics in runs of {STAT_GROUP} output rows, "
                          f"not {result.stat_group}")
    tensors = {
        "qweight": packing.pack(result.codes.T, result.bits),
        "spqr_stats": pack_records(result.scale_codes, result.zeros, result.scale_scale, result.scale_zero,
                                   result.stat_bits, result.bits),
        "outlier_rows": np.ascontiguousarray(result.outlier_rows, dtype=np.int32),
        "outlier_cols": np.ascontiguousarray(result.outlier_cols, dtype=np.uint16),
        "outlier_vals": np.ascontiguousarray(result.outlier_values, dtype=np.float16),
    }
    if result.perm is not None:
        tensors["perm"] = np.ascontiguousarray(result.perm, dtype=np.int32)
    return tensors


def quant_config(meta):
    """config.json's quantization_config: the settings the weights are made of. An infinite
    threshold (no outliers) is null: JSON has no infinity."""
    threshold = meta["outlier_threshold"]
    return {"quant_method": QUANT_METHOD, "bits": meta["bits"], "group_size": meta["group_size"],
            "stat_bits": meta["stat_bits"], "stat_group": STAT_GROUP,
            "outlier_threshold": float(threshold) if math.isfinite(threshold) else None,
            "act_order": bool(meta["act_order"])}


def save_spqr_checkpoint(out, source, results, meta, force=False, floats=None):
    """Write the SpQR checkpoint directory `out` (all or nothing).

    source: the float model's ModelSource; results: {"model.layers.{i}.<proj>": spqr.SpqrResult}
    for every linear layer, all made with meta's bits, group_size and stat_bits; meta: those,
    outlier_threshold, and optionally the keys of DEFAULT_META."""
    from .. import __version__

    meta = dict(DEFAULT_META, **meta)
    out = checkpoint.check_output(out, force, source.path)
    want = (meta["bits"], meta["group_size"], meta["stat_bits"], bool(meta["act_order"]))
    for base, r in layer_results(source, results):
        if (r.bits, r.group_size, r.stat_bits, r.perm is not None) != want:
            raise QinferError(f"{base} is {r.bits}-bit group {r.group_size} with {r.stat_bits}-bit statistics"
                              f"{' and act-order' if r.perm is not None else ''}, not as the settings say "
                              f"({want[0]}-bit group {want[1]}, {want[2]}-bit statistics"
                              f"{', act-order' if want[3] else ''})")
    if floats is None:
        floats = float_tensors(source, meta["float_dtype"])
    config = quant_config(meta)
    quantize_config = dict(config, qinfer={
        "version": __version__, "method": meta["method"], "nsamples": meta["nsamples"], "seqlen": meta["seqlen"],
        "seed": meta["seed"], "damp": meta["damp"], "sink_weight": meta["sink_weight"],
        "true_sequential": bool(meta["true_sequential"]), "clip_search": bool(meta["clip_search"]),
        "calibration": meta["calibration"], "source": os.path.basename(os.path.normpath(source.path))})
    tensors = model_tensors(source, floats, lambda base: spqr_tensors(results[base]))
    write_directory(out, force, source, tensors, hf_config(source, config, meta["float_dtype"]), quantize_config)
