"""Model readers: open_model(path) -> ModelSource (readers/source.py).

    a directory with config.json      Hugging Face checkpoint: load_hf picks readers/gptq.py
                                      (a GPTQ one), readers/spqr.py (an SpQR one),
                                      readers/bcq.py (a BCQ one) or readers/hf.py (float)
    a file starting with b"GGUF"      GGUF, llama architecture (readers/gguf_model.py)
"""
import os

from ..errors import FormatError
from .bcq import is_bcq, load_bcq
from .gguf import MAGIC as _GGUF_MAGIC
from .gguf_model import load_gguf
from .gptq import is_gptq, load_gptq
from .hf import load_float, read_config
from .lazy import LazyTensor
from .source import (BcqTensor, FloatTensor, ModelConfig, ModelSource, PackedTensor, SpqrTensor, Tensor,
                     TokenizerSpec)
from .spqr import is_spqr, load_spqr
from .validate import check_config, check_tensors, expected_shapes

__all__ = ["open_model", "load_gguf", "load_hf", "ModelSource", "ModelConfig", "PackedTensor", "SpqrTensor", "BcqTensor",
           "TokenizerSpec", "LazyTensor", "FloatTensor", "Tensor",
           "check_config", "check_tensors", "expected_shapes"]


def load_hf(directory):
    """A Hugging Face checkpoint directory: readers/gptq.py reads it when it says it is GPTQ,
    readers/spqr.py when it says it is SpQR, readers/bcq.py when BCQ, else readers/hf.py as float
    (the choice is made here so that hf.py, which the others build on, never imports them)."""
    cfg, config_path = read_config(directory)
    if is_spqr(directory, cfg):
        return load_spqr(directory, cfg, config_path)
    if is_bcq(directory, cfg):
        return load_bcq(directory, cfg, config_path)
    if is_gptq(directory, cfg):
        return load_gptq(directory, cfg, config_path)
    return load_float(directory, cfg, config_path)


def open_model(path):
    """Open a model directory or GGUF file; every problem is a QinferError naming the path."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FormatError(f"no such file or directory: {path}")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            ggufs = sorted(n for n in os.listdir(path) if n.lower().endswith(".gguf"))
            hint = f" (to load a GGUF file, pass the file itself, e.g. {os.path.join(path, ggufs[0])})" if ggufs else ""
            raise FormatError(f"{path}: no config.json in this directory, so it is not a Hugging Face "
                              f"checkpoint{hint}")
        return load_hf(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(len(_GGUF_MAGIC))
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from None
    if magic == _GGUF_MAGIC:
        return load_gguf(path)
    name = os.path.basename(path)
    if name.endswith(".safetensors") or name.endswith(".json"):
        raise FormatError(f"{path}: a single {name} does not describe a model; pass the directory with "
                          f"config.json ({os.path.dirname(os.path.abspath(path))})")
    raise FormatError(f"{path}: not a GGUF file (no GGUF magic) and not a checkpoint directory")
