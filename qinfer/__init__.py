"""qinfer: CPU inference for quantized LLaMA-family models, with generated kernels."""
from .errors import QinferError, ShapeError, UnsupportedError
from . import kernels
from .kernels import set_num_threads, get_num_threads
from .linear import QuantizedLinear
from .perplexity import PerplexityResult, perplexity   # binds qinfer.perplexity to the function


def _version():
    """The installed distribution's version: pyproject.toml's `version` is its single source."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("qinfer")
    except PackageNotFoundError:      # run from a source tree that was never installed
        return "0+unknown"


__version__ = _version()
__all__ = ["Engine", "QinferWarning", "quantize", "perplexity", "PerplexityResult", "QinferError", "ShapeError",
           "UnsupportedError", "QuantizedLinear", "kernels", "set_num_threads", "get_num_threads", "__version__"]


def __getattr__(name):
    # The engine pulls in readers, tokenizers and jinja2: load it on first use.
    if name in ("Engine", "QinferWarning"):
        from . import engine
        return getattr(engine, name)
    if name == "quantize":
        from .quant import quantize
        return quantize
    raise AttributeError(f"module 'qinfer' has no attribute {name!r}")
