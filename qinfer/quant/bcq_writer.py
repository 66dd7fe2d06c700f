"""The BCQ checkpoint (qinfer.quantize(method="bcq")), which readers/bcq.py reads.

    config.json            the LLaMA config + quantization_config: quant_method "qinfer_bcq",
                           bits, group_size, rounds
    quantize_config.json   the same settings + a "qinfer" object (method, version, source)
    model.safetensors      per linear layer (bcq_tensors): .bcq_planes, .bcq_alphas, .bcq_offsets;
                           the embedding, norms and an untied lm_head in float16 or float32, as the
                           GPTQ writer stores them
    tokenizer files        tokenizer_files.py

save_bcq_checkpoint writes it through checkpoint.OutputDir (writer.write_directory): all or nothing.
"""
import os

import numpy as np

from ..errors import QinferError
from ..readers.bcq import QUANT_METHOD
from . import checkpoint
from .writer import float_tensors, hf_config, layer_results, model_tensors, write_directory


def bcq_tensors(result):
    """One layer's checkpoint tensors {part: array} from bcq.BcqResult: the sign planes as bits
    (1 for +1, eight input columns a byte, the first in bit 0), the alphas and offsets in float16."""
    alphas = np.asarray(result.alphas, dtype=np.float16)
    offsets = np.asarray(result.offsets, dtype=np.float16)
    if not (np.isfinite(alphas).all() and np.isfinite(offsets).all()):
        raise QinferError("a BCQ scale or offset does not fit in float16")
    return {"bcq_planes": np.packbits(result.planes > 0, axis=2, bitorder="little"),
            "bcq_alphas": alphas, "bcq_offsets": offsets}


def quant_config(meta):
    """config.json's quantization_config: the settings the weights are made of."""
    return {"quant_method": QUANT_METHOD, "bits": meta["bits"], "group_size": meta["group_size"],
            "rounds": meta["rounds"]}


def save_bcq_checkpoint(out, source, results, meta, force=False, floats=None):
    """Write the BCQ checkpoint directory `out` (all or nothing).

    source: the float model's ModelSource; results: {"model.layers.{i}.<proj>": bcq.BcqResult}
    for every linear layer, all with meta's bits and group_size (-1: full columns); meta: those,
    rounds, float_dtype."""
    from .. import __version__

    out = checkpoint.check_output(out, force, source.path)
    for base, r in layer_results(source, results):
        group = r.in_features if meta["group_size"] == -1 else meta["group_size"]
        if (r.bits, r.group_size) != (meta["bits"], group):
            raise QinferError(f"{base} has {r.bits} planes in groups of {r.group_size}, not as the settings "
                              f"say ({meta['bits']} planes, group_size {meta['group_size']})")
    float_dtype = meta.get("float_dtype", "float16")
    if floats is None:
        floats = float_tensors(source, float_dtype)
    config = quant_config(meta)
    quantize_config = dict(config, qinfer={
        "version": __version__, "method": "bcq", "source": os.path.basename(os.path.normpath(source.path))})
    tensors = model_tensors(source, floats, lambda base: bcq_tensors(results[base]))
    write_directory(out, force, source, tensors, hf_config(source, config, float_dtype), quantize_config)
