"""One quantized linear layer as a quantizer produces it, and what it turns into.

QuantResult holds the integer codes, one scale and zero per (group, output)
and each input row's group, in the orientation of the AutoGPTQ tensors
([in, out]). It becomes a QuantizedLinear (to run), a dict of checkpoint
tensors (to write) or a float weight (to measure).
"""
from dataclasses import dataclass

import numpy as np

from .. import packing
from . import layout


@dataclass
class QuantResult:
    bits: int
    group_size: int            # the checkpoint's group size (-1: full column); the last group may be short
    codes: np.ndarray          # uint8 [in, out], in [0, 2^bits)
    scales: np.ndarray         # float32 [n_groups, out], every value exact in float16
    zeros: np.ndarray          # float32 [n_groups, out]: integers in [0, 2^bits), or exact float16 values
    g_idx: np.ndarray          # int32 [in]: group of each input row
    zero_point: str = "int"    # "int" (AutoGPTQ's packed qzeros) or "float" (quantizer.py)

    @property
    def in_features(self):
        return self.codes.shape[0]

    @property
    def out_features(self):
        return self.codes.shape[1]

    @property
    def act_order(self):
        return not np.array_equal(self.g_idx, layout.trivial_g_idx(self.in_features, self.group_size))

    def dequantize(self):
        """float32 [out, in]: the weight this result stands for."""
        g = self.g_idx
        w = self.scales[g] * (self.codes.astype(np.float32) - self.zeros[g])
        return np.ascontiguousarray(w.T)

    def to_linear(self):
        """A QuantizedLinear computing exactly dequantize()'s weight."""
        from ..linear import QuantizedLinear

        group, scales, zeros, g_idx = layout.kernel_layout(
            self.scales, self.zeros, self.g_idx, self.in_features, self.group_size)
        return QuantizedLinear.from_packed(packing.pack(self.codes, self.bits), scales, zeros,
                                           self.bits, group, g_idx)

    def needs_v2(self):
        """True when a zero point is 0, which the v1 ("gptq") format cannot store."""
        return self.zero_point == "int" and bool((self.zeros == 0).any())

    def checkpoint_tensors(self, checkpoint_format):
        """{"qweight", "qzeros" (or float16 "zeros"), "scales", "g_idx"} as layout.py lays them out."""
        if checkpoint_format == layout.FLOAT_ZERO_FORMAT:
            zeros = {"zeros": self.zeros.astype(np.float16)}
        else:
            zeros = {"qzeros": layout.pack_rows(layout.encode_zeros(self.zeros, self.bits, checkpoint_format),
                                                self.bits)}
        return {
            "qweight": packing.pack(self.codes, self.bits),
            **zeros,
            "scales": self.scales.astype(np.float16),
            "g_idx": np.ascontiguousarray(self.g_idx, dtype=np.int32),
        }
