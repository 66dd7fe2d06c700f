"""qinfer: CPU inference for quantized LLaMA-family models, with generated kernels."""
from .errors import QinferError, ShapeError, UnsupportedError
from . import kernels
from .kernels import set_num_threads, get_num_threads
from .linear import QuantizedLinear

__version__ = "0.1.0"
__all__ = ["QinferError", "ShapeError", "UnsupportedError", "QuantizedLinear",
           "kernels", "set_num_threads", "get_num_threads", "__version__"]
