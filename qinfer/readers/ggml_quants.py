"""llama.cpp's quantized blocks -> qinfer's GPTQ-layout PackedTensor, losslessly.

A GGUF matrix is [ne0 = in, ne1 = out]: each row (one output column of
qinfer's layout) is a run of blocks over consecutive inputs. Every block
format below is affine per sub-block of `group` inputs,

    w = A * q - B          (A, B per sub-block; q the stored code)

which is qinfer's group form w = scale * (q - zero) with scale = A and
zero = B / A. So the codes are kept as they are, each sub-block becomes a
group, and only the affine form changes:

    format  bits group  block bytes  A, B per group               -> zero
    Q4_0     4    32    32    18     d, 8d                            8
    Q4_1     4    32    32    20     d, -m                            -m/d
    Q5_0     5    32    32    22     d, 16d                           16
    Q5_1     5    32    32    24     d, -m                            -m/d
    Q8_0     8    32    32    34     d, -128d (codes q + 128)         128
    Q2_K     2    16   256    84     d*sc, dmin*mn                    dmin*mn/(d*sc)
    Q3_K     3    16   256   110     d*(sc-32), 4d*(sc-32)            4
    Q4_K     4    32   256   144     d*sc, dmin*mn                    dmin*mn/(d*sc)
    Q5_K     5    32   256   176     d*sc, dmin*mn                    dmin*mn/(d*sc)
    Q6_K     6    16   256   210     d*sc, 32d*sc (sc signed)         32

A group whose A is 0 holds one value, -B, whatever its codes: it becomes
codes 0 with scale -B and zero -1 (zero = B/A would be infinite).

Each decoder below takes blocks [rows, n_blocks, block_bytes] (uint8) and
returns the codes [rows, n_blocks * block] (uint8, in input order) with
A and B [rows, n_blocks * block / group] (float32). Its comment draws the
block as ggml-common.h declares it; "element e" is the block's e-th input.
"""
from dataclasses import dataclass
from typing import Callable

import numpy as np
from gguf.constants import GGMLQuantizationType as T

from ..errors import FormatError
from ..packing import pack_rows
from .source import PackedTensor

QK_K = 256
# Converting a few output columns at a time bounds the temporaries (the codes as
# bytes, A and B in float32) to a few MB whatever the tensor's size.
_CHUNK_ELEMENTS = 1 << 22


def _f16(blocks, start):
    """The float16 at byte `start` of every block -> float32 [rows, n_blocks]."""
    # a strided float16 view of the blocks (numpy reads unaligned strides): one pass, no gather copy
    return blocks[:, :, start:start + 2].view("<f2")[:, :, 0].astype(np.float32)


def _nibbles(qs):
    """Bytes [..., n] -> [..., 2n]: the n low nibbles, then the n high nibbles."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)


def _crumbs(qs):
    """Bytes [..., n] -> [..., 4n]: bits 0-1 of every byte, then bits 2-3, 4-5, 6-7."""
    return np.concatenate([(qs >> np.uint8(s)) & np.uint8(3) for s in (0, 2, 4, 6)], axis=-1)


def _bit_planes(qh, planes):
    """Bytes [..., n] -> [..., planes * n]: bit 0 of every byte, then bit 1, ..."""
    return np.concatenate([(qh >> np.uint8(i)) & np.uint8(1) for i in range(planes)], axis=-1)


class Stream:
    """What a 4-bit decoder returns in place of the codes: the codes already as
    qinfer's bit stream, bytes [rows, in / 2] (byte m holds elements 2m and
    2m + 1, low nibble first). llama.cpp's 4-bit blocks hold two elements a
    byte too, only in another order, so moving nibbles is all it takes."""

    def __init__(self, data):
        self.data = data


def _nibble_stream(qs):
    """Bytes [rows, runs, n] whose low nibbles are elements 0..n-1 of a run and high
    nibbles n..2n-1 -> the same 2n elements as stream bytes [rows, runs, n]."""
    from .._runtime import nibble_stream       # compiled; readers import no kernels at module level
    out = np.empty(qs.shape, dtype=np.uint8)
    nibble_stream(qs, out)
    return out


def _per_group(values):
    """[rows, n_blocks, groups a block] -> [rows, n_blocks * groups a block] float32."""
    return values.reshape(values.shape[0], -1).astype(np.float32)


# ------------------------------------------------------------ 32-element blocks
# Q4_0 {f16 d; u8 qs[16]}: element j in qs[j]'s low nibble, j + 16 in its high nibble.
def _q4_0(b):
    d = _f16(b, 0)
    return Stream(_nibble_stream(b[:, :, 2:]).reshape(b.shape[0], -1)), d, 8 * d


# Q4_1 {f16 d; f16 m; u8 qs[16]}: as Q4_0; w = d q + m.
def _q4_1(b):
    return Stream(_nibble_stream(b[:, :, 4:]).reshape(b.shape[0], -1)), _f16(b, 0), -_f16(b, 2)


# Q5_0 {f16 d; u8 qh[4]; u8 qs[16]}: low 4 bits as Q4_0; bit 4 of element j is
# bit j of the little-endian u32 qh (= bit j % 8 of qh[j // 8]); w = d (q - 16).
def _five_bit_codes(b, qh_at):
    qh = b[:, :, qh_at:qh_at + 4]
    high = np.unpackbits(qh, axis=-1, bitorder="little")            # [rows, n, 32], element order
    return (_nibbles(b[:, :, qh_at + 4:]) | (high << np.uint8(4))).reshape(b.shape[0], -1)


def _q5_0(b):
    d = _f16(b, 0)
    return _five_bit_codes(b, 2), d, 16 * d


# Q5_1 {f16 d; f16 m; u8 qh[4]; u8 qs[16]}: as Q5_0; w = d q + m.
def _q5_1(b):
    return _five_bit_codes(b, 4), _f16(b, 0), -_f16(b, 2)


# Q8_0 {f16 d; i8 qs[32]}: w = d q; stored as code q + 128 (u8) with zero 128.
def _q8_0(b):
    d = _f16(b, 0)
    return (b[:, :, 2:] ^ np.uint8(0x80)).reshape(b.shape[0], -1), d, 128 * d


# ------------------------------------------------------- 256-element super-blocks
# Q2_K {u8 scales[16]; u8 qs[64]; f16 d; f16 dmin}: 16 groups of 16.
#   qs: two halves of 32 bytes, half h covers elements 128h .. 128h + 127;
#       element 128h + 32s + l is bits 2s..2s+1 of qs[32h + l].
#   scales[g]: low nibble sc, high nibble mn;  w = d sc q - dmin mn.
def _q2_k(b):
    rows, n, _ = b.shape
    codes = _crumbs(b[:, :, 16:80].reshape(rows, n, 2, 32))
    sc, mn = b[:, :, :16] & np.uint8(0x0F), b[:, :, :16] >> np.uint8(4)
    d, dmin = _f16(b, 80)[:, :, None], _f16(b, 82)[:, :, None]
    return codes.reshape(rows, -1), _per_group(d * sc), _per_group(dmin * mn)


# Q3_K {u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16 d}: 16 groups of 16.
#   low 2 bits: as Q2_K's qs; bit 2 of element 32i + l is bit i of hmask[l]
#   (a set bit means +4: ggml subtracts 4 where it is clear), so the 3-bit
#   code is low | hbit << 2 and w = d (sc - 32) (code - 4).
#   scales: 16 signed 6-bit values, sc + 32 stored; group g's low 4 bits are
#   the low nibble of byte g (g < 8) or the high nibble of byte g - 8, its
#   high 2 bits are bits 2(g // 4)..+1 of byte 8 + g % 4.
def _q3_k(b):
    rows, n, _ = b.shape
    low = _crumbs(b[:, :, 32:96].reshape(rows, n, 2, 32)).reshape(rows, n, QK_K)
    high = _bit_planes(b[:, :, :32], 8)                                     # [rows, n, 256]
    codes = low | (high << np.uint8(2))
    s = b[:, :, 96:108]
    lo4 = _nibbles(s[:, :, :8])                                             # groups 0..15
    hi2 = _crumbs(s[:, :, 8:12])                                            # groups 0..15
    sc = (lo4 | (hi2 << np.uint8(4))).astype(np.int16) - 32
    a = _f16(b, 108)[:, :, None] * sc
    return codes.reshape(rows, -1), _per_group(a), _per_group(4 * a)


# The 6-bit scales and minimums of Q4_K and Q5_K (u8 scales[12], 8 groups):
#   j < 4:  sc = scales[j] & 63,                        mn = scales[j + 4] & 63
#   j >= 4: sc = scales[j + 4] & 15 | (scales[j - 4] >> 6) << 4,
#           mn = scales[j + 4] >> 4 | (scales[j] >> 6) << 4
def _k_scales_mins(s):
    lo, mid, top = s[:, :, 0:4], s[:, :, 4:8], s[:, :, 8:12]
    sc = np.concatenate([lo & np.uint8(63), (top & np.uint8(15)) | ((lo >> np.uint8(6)) << np.uint8(4))], axis=-1)
    mn = np.concatenate([mid & np.uint8(63), (top >> np.uint8(4)) | ((mid >> np.uint8(6)) << np.uint8(4))], axis=-1)
    return sc, mn


# Q4_K {f16 d; f16 dmin; u8 scales[12]; u8 qs[128]}: 8 groups of 32.
#   qs: four chunks of 32 bytes; element 64c + l is the low nibble of
#   qs[32c + l], element 64c + 32 + l its high nibble. w = d sc q - dmin mn.
def _q4_k_low(b, qs_at):
    rows, n, _ = b.shape
    return _nibbles(b[:, :, qs_at:qs_at + 128].reshape(rows, n, 4, 32)).reshape(rows, n, QK_K)


def _k_affine(b):
    sc, mn = _k_scales_mins(b[:, :, 4:16])
    d, dmin = _f16(b, 0)[:, :, None], _f16(b, 2)[:, :, None]
    return _per_group(d * sc), _per_group(dmin * mn)


def _q4_k(b):
    rows, n, _ = b.shape
    stream = _nibble_stream(b[:, :, 16:144].reshape(rows, n * 4, 32))
    return (Stream(stream.reshape(rows, -1)),) + _k_affine(b)


# Q5_K {f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}: as Q4_K, and
#   bit 4 of element 32i + l is bit i of qh[l].
def _q5_k(b):
    codes = _q4_k_low(b, 48) | (_bit_planes(b[:, :, 16:48], 8) << np.uint8(4))
    return (codes.reshape(b.shape[0], -1),) + _k_affine(b)


# Q6_K {u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}: 16 groups of 16.
#   Two halves of 128 elements; in half h, element 128h + 64t + l (l < 64) has
#   its low 4 bits in nibble t of ql[64h + l], and element 128h + 32s + l
#   (l < 32) its high 2 bits at bits 2s..2s+1 of qh[32h + l].
#   w = d sc (q - 32), sc signed.
def _q6_k(b):
    rows, n, _ = b.shape
    low = _nibbles(b[:, :, :128].reshape(rows, n, 2, 64))                  # [rows, n, 2, 128]
    high = _crumbs(b[:, :, 128:192].reshape(rows, n, 2, 32))               # [rows, n, 2, 128]
    codes = low | (high << np.uint8(4))
    a = _f16(b, 208)[:, :, None] * b[:, :, 192:208].view(np.int8)
    return codes.reshape(rows, -1), _per_group(a), _per_group(32 * a)


@dataclass(frozen=True)
class BlockFormat:
    bits: int
    group: int             # inputs per scale and zero
    block: int             # inputs per block
    nbytes: int            # bytes per block
    decode: Callable       # blocks -> (codes or a Stream of them, A, B), see the module docstring
    # A is a block's float16 d and B a fixed multiple of it (Q4_0, Q5_0, Q8_0), so every
    # scale and zero is exact in float16: the layer holds them so without checking
    half_exact: bool = False


FORMATS = {
    T.Q4_0: BlockFormat(4, 32, 32, 18, _q4_0, half_exact=True),
    T.Q4_1: BlockFormat(4, 32, 32, 20, _q4_1),
    T.Q5_0: BlockFormat(5, 32, 32, 22, _q5_0, half_exact=True),
    T.Q5_1: BlockFormat(5, 32, 32, 24, _q5_1),
    T.Q8_0: BlockFormat(8, 32, 32, 34, _q8_0, half_exact=True),
    T.Q2_K: BlockFormat(2, 16, QK_K, 84, _q2_k),
    T.Q3_K: BlockFormat(3, 16, QK_K, 110, _q3_k),
    T.Q4_K: BlockFormat(4, 32, QK_K, 144, _q4_k),
    T.Q5_K: BlockFormat(5, 32, QK_K, 176, _q5_k),
    T.Q6_K: BlockFormat(6, 16, QK_K, 210, _q6_k),
}


def lazy_packed(qtype, raw, out_features, in_features, what="tensor"):
    """A PackedTensor that converts the blocks when loaded (PackedTensor.load), or
    straight into the rows of a larger one (PackedTensor.fill: model.stack_packed)."""
    fmt = FORMATS[T(qtype)]

    def fill(into=None, order=None):
        return to_packed(qtype, raw, out_features, in_features, what, into, order)
    return PackedTensor(bits=fmt.bits, group_size=fmt.group, shape=(out_features, in_features),
                        half_exact=fmt.half_exact, make=fill, fill=fill)


def to_packed(qtype, raw, out_features, in_features, what="tensor", into=None, order=None):
    """raw: the tensor's bytes (uint8, out_features * in_features / block blocks) -> PackedTensor [out, in].

    `what` names the tensor (and file) in errors. into: (words uint32 [out, in * bits / 32],
    scales float32 [out, groups], zeros float32 [out, groups]) to fill instead of new arrays.
    order: the stored rows (output features) in the order to convert them (rope_order's
    unpermute), None: as stored.
    """
    fmt = FORMATS[T(qtype)]
    if in_features % fmt.block:
        raise FormatError(f"{what}: rows of {in_features} values are not whole {T(qtype).name} blocks "
                          f"of {fmt.block}")
    n_blocks = in_features // fmt.block
    blocks = np.asarray(raw).reshape(out_features, n_blocks, fmt.nbytes)
    n_groups = in_features // fmt.group
    # Filled one output column (a GGUF row) at a time, so held column-major: the
    # PackedTensor's arrays are transposed views of these (GPTQ orientation, no copy).
    words, scales, zeros = into or (np.empty((out_features, in_features * fmt.bits // 32), dtype=np.uint32),
                                    np.empty((out_features, n_groups), dtype=np.float32),
                                    np.empty((out_features, n_groups), dtype=np.float32))
    step = max(1, _CHUNK_ELEMENTS // in_features)
    for j in range(0, out_features, step):
        codes, a, b = fmt.decode(blocks[j:j + step] if order is None else blocks[order[j:j + step]])
        rows = len(a)
        _check_finite(a, what, "scale", j, fmt.group)
        _check_finite(b, what, "minimum", j, fmt.group)
        flat = a == 0
        if flat.any():               # (bytes of a Stream: a group is group / 2 of them)
            with np.errstate(divide="ignore", invalid="ignore"):
                zeros[j:j + step] = np.where(flat, np.float32(-1), b / np.where(flat, 1, a))
            data = codes.data if isinstance(codes, Stream) else codes
            data.reshape(rows, n_groups, -1)[flat] = 0
            scales[j:j + step] = np.where(flat, -b, a)
        else:
            np.divide(b, a, out=zeros[j:j + step])
            scales[j:j + step] = a
        words[j:j + step] = codes.data.view("<u4") if isinstance(codes, Stream) else pack_rows(codes, fmt.bits)
    return PackedTensor(bits=fmt.bits, group_size=fmt.group, qweight=words.T.view(np.int32), scales=scales.T,
                        zeros=zeros.T, shape=(out_features, in_features), half_exact=fmt.half_exact)


def _check_finite(values, what, role, first_row, group):
    # A NaN/inf block scale would silently poison every output it touches.
    if not np.isfinite(values).all():
        out, g = np.argwhere(~np.isfinite(values))[0]
        raise FormatError(f"{what}: group {g} (inputs {g * group}..{(g + 1) * group - 1}) of output row "
                          f"{first_row + out} has a non-finite {role} ({values[out, g]})")
