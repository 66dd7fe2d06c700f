"""A quantized checkpoint's settings from config.json's quantization_config and/or
quantize_config.json (transformers writes the first, AutoGPTQ and qinfer the second):
where both give a setting they must agree, and the required ones must be there."""
import os

from ..errors import FormatError
from .jsonfile import read_json

QUANTIZE_CONFIG = "quantize_config.json"


def merged_settings(directory, cfg, config_path, read_settings, required):
    """{setting: value} from both files, each file's entries read by read_settings(entries, where)."""
    sources = []
    if cfg.get("quantization_config") is not None:
        sources.append((cfg["quantization_config"], f"{config_path} quantization_config"))
    qc_path = os.path.join(directory, QUANTIZE_CONFIG)
    if os.path.isfile(qc_path):
        sources.append((read_json(qc_path), qc_path))
    merged, origin = {}, {}
    for entries, where in sources:
        for key, value in read_settings(entries, where).items():
            if key in merged and merged[key] != value:
                raise FormatError(f"{directory}: {key} is {merged[key]!r} in {origin[key]} but {value!r} in {where}")
            merged[key], origin[key] = value, where
    for key in required:
        if key not in merged:
            raise FormatError(f"{sources[-1][1]}: no {key!r}; qinfer does not guess quantization settings")
    return merged
