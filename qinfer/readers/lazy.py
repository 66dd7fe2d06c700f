"""Float tensors converted to float32 on first use, with their shape known up front.

source.py lets a float tensor be a zero-argument callable. Readers hand out
LazyTensor instead of a bare function so that shapes can be validated (and
reported) without converting anything: converting BF16/F16 to float32 doubles
the memory, and the model builder, not the reader, decides when to pay that.
"""
import numpy as np


class LazyTensor:
    """A callable producing a float32 array of `shape`; nothing is cached (the caller keeps the result)."""

    __slots__ = ("shape", "source_dtype", "_make", "half")

    def __init__(self, shape, source_dtype, make, half=None):
        self.shape = tuple(int(d) for d in shape)
        self.source_dtype = source_dtype      # e.g. "BF16", "F16": what the file stores
        self._make = make
        self.half = half                      # F16: the float16 values themselves (a view on the file)

    dtype = np.dtype(np.float32)              # what calling it returns

    @property
    def ndim(self):
        return len(self.shape)

    def __call__(self):
        return self._make()

    def __repr__(self):
        return f"LazyTensor({self.source_dtype} -> float32, shape={self.shape})"


def f16_to_f32(half):
    """float16 array (a view on the file) -> new float32 array."""
    return half.astype(np.float32)


def bf16_to_f32(raw_u16):
    """bfloat16 stored as uint16 -> float32: bf16 is the top half of an IEEE float32, so shift it up.

    numpy has no bfloat16 dtype, and this is exact (every bf16 is a float32).
    """
    return (raw_u16.astype(np.uint32) << np.uint32(16)).view(np.float32)


def lazy_f16(half):
    return LazyTensor(half.shape, "F16", lambda: f16_to_f32(half), half=half)


def lazy_bf16(raw_u16):
    return LazyTensor(raw_u16.shape, "BF16", lambda: bf16_to_f32(raw_u16))
