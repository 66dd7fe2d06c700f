"""The AutoGPTQ tensor layout of a quantized linear layer, and its mapping to qinfer's kernels.

Per linear layer `name` (docs/FORMAT.md, section 4):

    name.qweight  int32   [in * b / 32, out]         codes packed down each column (qinfer/packing.py)
    name.qzeros   int32   [n_groups, ceil(out*b/32)] zero points packed the same way along each row
    name.scales   float16 [n_groups, out]
    name.g_idx    int32   [in]                       group of each input row

    w[k, j] = scales[g, j] * (q[k, j] - zero[g, j])    g = g_idx[k]

n_groups = ceil(in / group_size) (the last group may be short), 1 for
group_size -1. The zero stored in qzeros depends on the checkpoint format:
"gptq" (v1, AutoGPTQ) stores zero - 1 and reads zero = (field & maxq) + 1;
"gptq_v2" (GPTQModel) stores the zero itself. qinfer's own
"qinfer_float_zero" has no qzeros: real-valued zero points (quantizer.py,
zero_point "float") are stored as

    name.zeros    float16 [n_groups, out]

AutoGPTQ and GPTQModel do not read that format (they refuse its
checkpoint_format rather than misread it).

The kernels want groups of one of (16, 32, 64, 128) rows or a full column,
contiguous after sorting rows by group. `kernel_layout` re-expresses any
group layout that fits: a group of 128 rows over in = 576 (4 full groups and
one of 64) runs as groups of 64 with each scale repeated.
"""
import math

import numpy as np

from .. import packing
from ..errors import FormatError, UnsupportedError

FLOAT_ZERO_FORMAT = "qinfer_float_zero"
CHECKPOINT_FORMATS = ("gptq", "gptq_v2", FLOAT_ZERO_FORMAT)
KERNEL_GROUPS = (128, 64, 32, 16)


def n_groups(in_features, group_size):
    return 1 if group_size == -1 else math.ceil(in_features / group_size)


def trivial_g_idx(in_features, group_size):
    """The g_idx of a layer without act-order: row k is in group k // group_size."""
    if group_size == -1:
        return np.zeros(in_features, dtype=np.int32)
    return (np.arange(in_features) // group_size).astype(np.int32)


def qzeros_words(out_features, bits):
    return math.ceil(out_features * bits / 32)


# --------------------------------------------------------------- qzeros
def pack_rows(values, bits):
    """Integers [rows, cols] in [0, 2^b) -> int32 [rows, ceil(cols*b/32)], packed along each row
    exactly as qweight packs down a column (3-bit: 32 values in 3 words)."""
    values = np.asarray(values)
    rows, cols = values.shape
    _, per_unit = packing.unit_shape(bits)
    padded = np.zeros((rows, -(-cols // per_unit) * per_unit), dtype=np.uint8)
    padded[:, :cols] = values
    words = packing.pack(padded.T, bits).T            # [rows, full words]
    return np.ascontiguousarray(words[:, :qzeros_words(cols, bits)])


def unpack_rows(words, bits, cols):
    """int32 [rows, ceil(cols*b/32)] -> uint8 [rows, cols] (the inverse of pack_rows)."""
    words = np.asarray(words)
    rows, n = words.shape
    _, per_unit = packing.unit_shape(bits)
    full = -(-cols // per_unit) * per_unit * bits // 32
    padded = np.zeros((rows, full), dtype=np.uint32)
    padded[:, :n] = words.view(np.uint32)
    return np.ascontiguousarray(packing.unpack(padded.T.view(np.int32), bits).T[:, :cols])


def encode_zeros(zeros, bits, checkpoint_format):
    """Integer zero points [groups, out] -> what qzeros stores (v1: zero - 1)."""
    z = np.asarray(zeros).astype(np.int64)
    maxq = 2 ** bits - 1
    if checkpoint_format == "gptq_v2":
        if z.min() < 0 or z.max() > maxq:
            raise ValueError(f"zero points must lie in [0, {maxq}] for {bits}-bit gptq_v2")
        return z.astype(np.uint8)
    if z.min() < 1 or z.max() > maxq + 1:
        raise ValueError(f"the v1 ('gptq') format stores zero - 1 and cannot hold a zero point of 0")
    return ((z - 1) & maxq).astype(np.uint8)


def decode_zeros(stored, bits, checkpoint_format):
    """qzeros fields [groups, out] -> float32 zero points (v1: field + 1, as AutoGPTQ reads them)."""
    stored = np.asarray(stored).astype(np.float32)
    if checkpoint_format == "gptq_v2":
        return stored
    return stored + np.float32(1)


def check_format(value, where):
    if value not in CHECKPOINT_FORMATS:
        raise UnsupportedError(f"{where}: checkpoint_format {value!r} is not supported "
                               f"(qinfer reads {', '.join(map(repr, CHECKPOINT_FORMATS))})")
    return value


# --------------------------------------------------------- kernel layout
def kernel_layout(scales, zeros, g_idx, in_features, group_size, where="layer"):
    """Checkpoint groups -> groups the kernels take.

    scales, zeros: [n_groups, out] float32; g_idx: int [in] (None: rows in
    order, trivial_g_idx(in_features, group_size)). Returns (group_size,
    scales, zeros, g_idx) for QuantizedLinear.from_packed: group_size in
    KERNEL_GROUPS or -1, g_idx None when rows stay in order.
    """
    scales = np.asarray(scales, dtype=np.float32)
    zeros = np.asarray(zeros, dtype=np.float32)
    groups = scales.shape[0]
    if g_idx is None:
        g_idx = trivial_g_idx(in_features, group_size)
    g_idx = np.asarray(g_idx)
    if g_idx.shape != (in_features,) or g_idx.dtype.kind not in "iu":
        raise FormatError(f"{where}: g_idx must be {in_features} integers, got {g_idx.dtype} {g_idx.shape}")
    g_idx = g_idx.astype(np.int64)
    if in_features and (g_idx.min() < 0 or g_idx.max() >= groups):
        raise FormatError(f"{where}: g_idx values must lie in [0, {groups}) (the scales have {groups} rows)")
    counts = np.bincount(g_idx, minlength=groups)
    used = counts[counts > 0]
    if len(used) == 1:
        # One group holds every row: a full-column group.
        g = int(np.flatnonzero(counts)[0])
        return -1, scales[g:g + 1].copy(), zeros[g:g + 1].copy(), None
    common = int(np.gcd.reduce(used))
    group = next((k for k in KERNEL_GROUPS if common % k == 0), None)
    if group is None:
        raise UnsupportedError(
            f"{where}: its quantization groups hold {sorted(set(used.tolist()))} rows; qinfer's kernels need "
            f"groups that split into runs of {', '.join(map(str, KERNEL_GROUPS))} rows")
    order = np.argsort(g_idx, kind="stable")
    block_group = g_idx[order[::group]]                     # checkpoint group of each kernel group
    new_idx = np.empty(in_features, dtype=np.int32)
    new_idx[order] = np.arange(in_features) // group
    in_order = np.array_equal(order, np.arange(in_features))
    return (group, np.ascontiguousarray(scales[block_group]), np.ascontiguousarray(zeros[block_group]),
            None if in_order else new_idx)
