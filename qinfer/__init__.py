"""qinfer: CPU inference for quantized LLaMA-family models, with generated kernels."""
from .errors import QinferError, ShapeError, UnsupportedError
from . import kernels
from .kernels import set_num_threads, get_num_threads
from .linear import QuantizedLinear
from .perplexity import PerplexityResult, perplexity   # binds qinfer.perplexity to the function

__version__ = "0.1.0"
__all__ = ["Engine", "quantize", "perplexity", "PerplexityResult", "QinferError", "ShapeError",
           "UnsupportedError", "QuantizedLinear", "kernels", "set_num_threads", "get_num_threads", "__version__"]


def __getattr__(name):
    # The engine pulls in readers, tokenizers and jinja2: load it on first use.
    if name == "Engine":
        from .engine import Engine
        return Engine
    if name == "quantize":
        from .quant import quantize
        return quantize
    raise AttributeError(f"module 'qinfer' has no attribute {name!r}")
