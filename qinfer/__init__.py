"""qinfer: CPU inference for quantized LLaMA-family models, with generated kernels."""
import os as _os

# libgomp reads its wait policy once, when the first extension module loads it (kernels, below).
# Unless the user set one (OMP_WAIT_POLICY, GOMP_SPINCOUNT) or QINFER_WAIT=spin, its idle threads
# spin ~0.25 ms, not ~7 ms, before they sleep: on a busy machine a spinning thread holds a core
# that a thread it waits for needs. Set for that load only: child processes get the user's
# environment (kernels.wait_policy()).
_OMP_SPINCOUNT = "10000"
_omp_default = not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(_os.environ) and \
    _os.environ.get("QINFER_WAIT", "").strip().lower() != "spin"
if _omp_default:
    _os.environ["GOMP_SPINCOUNT"] = _OMP_SPINCOUNT
from .errors import QinferError, ShapeError, UnsupportedError
from . import kernels
if _omp_default:
    del _os.environ["GOMP_SPINCOUNT"]
from .kernels import set_num_threads, get_num_threads
from .linear import QuantizedLinear
from . import perplexity          # the module, callable: qinfer.perplexity(engine, text) (perplexity.py)
from .perplexity import PerplexityResult


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
