"""GPTQ's int32 packing of b-bit codes along the input dimension.

    qweight[in_features * b / 32, out_features]   (int32)

For b in {2, 4, 8}: word row r holds input rows r*(32/b) .. r*(32/b) + 32/b - 1,
value i at bits [b*i, b*i + b). For b in {3, 5, 6}: each run of 32 input rows
fills b word rows as one 32b-bit little-endian stream (value i at stream bits
[b*i, b*i + b); a value that crosses a word boundary straddles two words).
docs/FORMAT.md draws them. 3 bits is GPTQ's layout; 5 and 6 bits are
qinfer's (GPTQ tools write none), for llama.cpp's Q5/Q6 tensors.

Both directions treat a unit (1 word, or b words) as a bit stream, so one
code path serves every bitwidth.
"""
import numpy as np

from .errors import ShapeError, UnsupportedError

BITWIDTHS = (2, 3, 4, 5, 6, 8)     # the kernel families
# What GPTQ checkpoints hold and `qinfer quantize` writes. 5 and 6 bits are for
# imported llama.cpp tensors only: no GPTQ tool writes them, so a GPTQ
# checkpoint that says bits 5 or 6 is refused rather than read in a layout its
# writer may not have meant.
GPTQ_BITWIDTHS = (2, 3, 4, 8)
PACK_BLOCK_CODES = 1 << 20     # codes packed per step


def check_bits(bits):
    if bits not in BITWIDTHS:
        raise UnsupportedError(f"bits must be one of {BITWIDTHS}, got {bits!r}")


def unit_shape(bits):
    """(words, values) of one packing unit."""
    words = 1 if 32 % bits == 0 else bits
    return words, 32 * words // bits


def pack(codes, bits):
    """codes: integers in [0, 2**bits) shaped [in_features, out_features] -> int32 qweight."""
    check_bits(bits)
    codes = np.asarray(codes)
    k, n = codes.shape
    words, values = unit_shape(bits)
    if k % values:
        raise ShapeError(f"in_features={k} is not a multiple of {values} ({bits}-bit packing unit)")
    all_units = codes.reshape(k // values, values, n)
    out = np.empty((k // values, words, n), dtype=np.uint32)
    # A few units at a time: the 64-bit working copy of a whole LM head would be 8 bytes per code.
    step = max(1, PACK_BLOCK_CODES // (values * n))
    for u0 in range(0, k // values, step):
        units = all_units[u0:u0 + step].astype(np.uint64)
        packed = np.zeros((units.shape[0], words, n), dtype=np.uint64)
        for i in range(values):
            start = bits * i
            word, offset = divmod(start, 32)
            value = units[:, i, :]
            packed[:, word, :] |= (value << np.uint64(offset)) & np.uint64(0xFFFFFFFF)
            if offset + bits > 32:   # the high bits spill into the next word
                packed[:, word + 1, :] |= value >> np.uint64(32 - offset)
        out[u0:u0 + step] = packed
    return out.reshape(k * bits // 32, n).view(np.int32)


def unpack(qweight, bits):
    """int32 qweight [in*bits/32, out] -> uint8 codes [in, out]."""
    check_bits(bits)
    qweight = np.ascontiguousarray(qweight).view(np.uint32)
    rows, n = qweight.shape
    words, values = unit_shape(bits)
    if rows % words:
        raise ShapeError(f"{bits}-bit qweight needs a multiple of {words} rows, got {rows}")
    units = qweight.reshape(rows // words, words, n).astype(np.uint64)
    mask = np.uint64((1 << bits) - 1)
    codes = np.empty((rows // words, values, n), dtype=np.uint8)
    for i in range(values):
        word, offset = divmod(bits * i, 32)
        value = units[:, word, :] >> np.uint64(offset)
        if offset + bits > 32:
            value |= units[:, word + 1, :] << np.uint64(32 - offset)
        codes[:, i, :] = value & mask
    return codes.reshape(rows // words * values, n)
