"""Quantizing a float model into a GPTQ-format checkpoint (round to nearest or GPTQ) or an
SpQR checkpoint.

    qinfer.quantize(model, out, bits=4, group_size=128, method="gptq", calib=...)
    qinfer.quantize(model, out, method="spqr", calib=...)          # 3-bit groups of 16, outliers

Modules: quantizer (group scale/zero with float16 scales, round to nearest),
gptq (the GPTQ algorithm for one layer), spqr (SpQR for one layer), result (a
quantized layer and what it becomes), layout (AutoGPTQ's tensor layout and its
mapping to the kernels), calibration, checkpoint (writing the directory),
writer (the GPTQ checkpoint), spqr_writer (the SpQR checkpoint), api (quantize).
"""
from .gptq import Hessian, PreparedHessian, gptq_quantize, output_error
from .quantizer import rtn_quantize
from .result import QuantResult

__all__ = ["quantize", "QuantizeReport", "gptq_quantize", "rtn_quantize", "Hessian", "PreparedHessian", "output_error",
           "QuantResult"]


def __getattr__(name):
    # The API pulls in the model and tokenizers; readers import layout.py only.
    if name in ("quantize", "QuantizeReport"):
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'qinfer.quant' has no attribute {name!r}")
