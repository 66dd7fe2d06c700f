"""llama.cpp's Q4_0, Q4_1 and Q8_0 blocks -> qinfer's GPTQ-layout PackedTensor, losslessly.

Each block covers 32 consecutive elements of one row of a GGUF matrix
[ne0 = in, ne1 = out] (so: 32 consecutive inputs of one output column), which
is exactly one group of 32 in qinfer's layout. The codes are kept as they
are; only the affine form changes to w = scale * (code - zero):

    Q4_0  {f16 d, 16 bytes}           w = d * (q - 8)      -> scale d, zero 8
    Q4_1  {f16 d, f16 m, 16 bytes}    w = d * q + m        -> scale d, zero -m/d
    Q8_0  {f16 d, 32 x int8 q}        w = d * q            -> code q + 128, scale d, zero 128

In the 4-bit blocks byte j holds element j in its low nibble and element
j + 16 in its high nibble.
"""
import numpy as np
from gguf.constants import GGMLQuantizationType as T

from ..errors import FormatError
from ..packing import pack
from .source import PackedTensor

# block bytes, byte offset of the codes
_LAYOUT = {T.Q4_0: (18, 2), T.Q4_1: (20, 4), T.Q8_0: (34, 2)}
BLOCK = 32
# pack() widens codes to uint64; converting a few columns at a time bounds
# that temporary (a 128k-vocabulary embedding would otherwise need GBs).
_CHUNK_ELEMENTS = 1 << 22


def _f16(blocks, start):
    """The f16 at byte `start` of every block -> float32 [out, n_blocks]."""
    return np.ascontiguousarray(blocks[:, :, start:start + 2]).view("<f2")[:, :, 0].astype(np.float32)


def _codes(qtype, blocks):
    """[out, n_blocks, block_bytes] uint8 -> codes [out, n_blocks * 32] uint8."""
    _, q0 = _LAYOUT[qtype]
    qs = blocks[:, :, q0:]
    if qtype == T.Q8_0:
        codes = qs ^ np.uint8(0x80)        # int8 two's complement q -> q + 128
    else:
        codes = np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=2)
    return codes.reshape(blocks.shape[0], -1)


def to_packed(qtype, raw, out_features, in_features, what="tensor"):
    """raw: the tensor's bytes (uint8, out_features * in_features / 32 blocks) -> PackedTensor [out, in].

    `what` names the tensor (and file) in errors.
    """
    qtype = T(qtype)
    block_bytes, _ = _LAYOUT[qtype]
    n_blocks = in_features // BLOCK
    blocks = np.asarray(raw).reshape(out_features, n_blocks, block_bytes)
    bits = 8 if qtype == T.Q8_0 else 4

    d = _f16(blocks, 0)                                   # [out, n_blocks]
    _check_finite(d, what, "scale")
    if qtype == T.Q4_1:
        m = _f16(blocks, 2)
        _check_finite(m, what, "minimum")
        flat = d == 0
        with np.errstate(divide="ignore", invalid="ignore"):
            zeros = np.where(flat, np.float32(-1), -m / d).astype(np.float32)
        # d == 0: every element of the block is m whatever its code; codes 0
        # with scale m and zero -1 give exactly m (zero = -m/d would be inf).
        scales = np.where(flat, m, d)
    else:
        zeros = np.full(d.shape, 128 if qtype == T.Q8_0 else 8, dtype=np.float32)
        flat = None
        scales = d

    qweight = np.empty((in_features * bits // 32, out_features), dtype=np.int32)
    step = max(1, _CHUNK_ELEMENTS // in_features)
    for j in range(0, out_features, step):
        codes = _codes(qtype, blocks[j:j + step])        # [cols, in]
        if flat is not None and flat[j:j + step].any():
            codes = codes.reshape(codes.shape[0], n_blocks, BLOCK)
            codes[flat[j:j + step]] = 0
            codes = codes.reshape(codes.shape[0], -1)
        qweight[:, j:j + step] = pack(codes.T, bits)

    return PackedTensor(bits=bits, group_size=BLOCK, qweight=qweight,
                        scales=np.ascontiguousarray(scales.T), zeros=np.ascontiguousarray(zeros.T),
                        shape=(out_features, in_features))


def _check_finite(values, what, role):
    # A NaN/inf block scale would silently poison every output it touches.
    if not np.isfinite(values).all():
        out, block = np.argwhere(~np.isfinite(values))[0]
        raise FormatError(f"{what}: block {block} of output row {out} has a non-finite {role} "
                          f"({values[out, block]})")
