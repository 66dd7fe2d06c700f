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
# The kernel families, and what GPTQ checkpoints hold and `qinfer quantize` writes
# (the table says why 5 and 6 bits are not among those); importers take them from here.
from .variants import BITWIDTHS, GPTQ_BITWIDTHS  # noqa: F401

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
    codes = np.asarray(codes)
    return np.ascontiguousarray(pack_rows(codes.T, bits).T).view(np.int32)


def pack_rows(codes, bits):
    """codes [out_features, in_features] (each row one output column's inputs) -> uint32 words
    [out_features, in_features * bits / 32]: row j is column j of the qweight pack() makes.

    A column's words are its codes as one little-endian bit stream, so for 2, 4 and 8
    bits whole bytes are put together (2 or 4 codes a byte) and read as words; 3, 5 and
    6 bits go through the stream's bits themselves (np.packbits), a few rows at a time."""
    check_bits(bits)
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    n, k = codes.shape
    words, values = unit_shape(bits)
    if k % values:
        raise ShapeError(f"in_features={k} is not a multiple of {values} ({bits}-bit packing unit)")
    out = np.empty((n, k * bits // 32), dtype=np.uint32)
    per_byte = 8 // bits if 8 % bits == 0 else 0
    step = max(1, PACK_BLOCK_CODES // k)
    for r in range(0, n, step):
        c = codes[r:r + step]
        if per_byte:
            packed = c[:, 0::per_byte].copy()
            for i in range(1, per_byte):
                packed |= c[:, i::per_byte] << np.uint8(bits * i)
        else:
            stream = ((c[:, :, None] >> np.arange(bits, dtype=np.uint8)) & np.uint8(1)).reshape(len(c), -1)
            packed = np.packbits(stream, axis=1, bitorder="little")
        out[r:r + step] = packed.view("<u4")
    return out


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
