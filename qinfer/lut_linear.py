"""LutLinear: a linear layer run by the lookup-table kernels (pyx/lut.h).

Each weight is held as sign planes with per-group multipliers and an offset,
w = sum_i a_i b_i / 2 + c (b_i = +-1, held as the bit (b_i + 1) / 2); a call
tabulates, for every run of four inputs, each signed half sum of them (rounded
to int8, one step per segment of up to 128 inputs), and each plane's bits look
their sums up. Two kinds fill the planes:

  uniform  GPTQ/RTN codes (from_uniform, from_quantized): bit_i = bit i of q,
           a_i = s 2^i, c = s ((2^bits - 1) / 2 - z); held as s (float16) and c (float32)
  binary   binary-coding quantization (from_bcq): w = sum_i alpha_i b_i + offset,
           a_i = 2 alpha_i (float16), c = offset (float32)

Outputs agree with the float product to within the tables' int8 rounding (about
what int8 activations give); the AVX-512 loops and the portable loop give the
same bits. docs/FORMAT.md, section 6, draws the layout.
"""
import copy

import numpy as np

from . import _lut, kernels
from .errors import ShapeError, UnsupportedError
from .linear import _empty_aligned, _tiles, _untiles, act_order_perm, on_rows

TILE, BLOCK = _lut.TILE, _lut.BLOCK
LUT_BITS = (2, 3, 4)     # the widths pyx/lut_kernels.h.tp has loops for (the portable loop takes 1 .. 4)


def fits(bits, group_size, in_features):
    """Whether a layer of these settings can run on the lookup-table kernels (what _check demands)."""
    group = in_features if group_size == -1 else group_size
    return bits in LUT_BITS and in_features % BLOCK == 0 and group > 0 and group % BLOCK == 0 and \
        in_features % group == 0


def _check(bits, group, in_features, out_features):
    if bits not in LUT_BITS:
        raise UnsupportedError(f"lookup-table layers take {', '.join(map(str, LUT_BITS))} bits, got {bits!r}")
    if in_features <= 0 or out_features <= 0 or in_features % BLOCK:
        raise ShapeError(f"a lookup-table layer needs in_features a multiple of {BLOCK}, got {in_features}")
    if group <= 0 or in_features % group or group % BLOCK:
        raise UnsupportedError(f"lookup-table groups must be a multiple of {BLOCK} inputs dividing "
                               f"in_features={in_features}, got {group}")


def _kernel_order(g_idx, in_features, group):
    """Act-order's perm (linear.act_order_perm), or None when the rows are in order already."""
    if g_idx is None:
        return None
    perm = act_order_perm(g_idx, in_features, in_features // group, group)
    return None if np.array_equal(perm, np.arange(in_features)) else perm


def pack_planes(bit_planes):
    """{0, 1} planes [bits, out, in] (kernel order) -> uint8 [n_tiles][in/16][bits][64] (pyx/lut.h):
    byte m of a block and plane holds row m // 4 of the tile (low nibble) and row 16 + m // 4
    (high nibble), their bits of inputs 4 (m % 4) .. 4 (m % 4) + 3 of the block, input
    4 (m % 4) + t at bit t."""
    bits, out_f, in_f = bit_planes.shape
    n_tiles = -(-out_f // TILE)
    p = np.zeros((bits, n_tiles * TILE, in_f), dtype=np.uint8)
    p[:, :out_f] = bit_planes
    # [bits, tiles, half, row, blocks, run, t]
    p = p.reshape(bits, n_tiles, 2, TILE // 2, in_f // BLOCK, 4, 4)
    nibbles = (p << np.arange(4, dtype=np.uint8)).sum(axis=-1, dtype=np.uint8)          # [bits, tiles, half, row, blocks, run]
    bytes_ = nibbles[:, :, 0] | (nibbles[:, :, 1] << np.uint8(4))                         # [bits, tiles, row, blocks, run]
    laid = _empty_aligned((n_tiles, in_f // BLOCK, bits, TILE // 2, 4), np.dtype(np.uint8))
    laid[...] = bytes_.transpose(1, 3, 0, 2, 4)
    return laid.reshape(-1)


def unpack_planes(planes, bits, out_features, in_features):
    """The inverse of pack_planes: {0, 1} uint8 [bits, out, in]."""
    n_tiles = -(-out_features // TILE)
    b = planes.reshape(n_tiles, in_features // BLOCK, bits, TILE // 2, 4).transpose(2, 0, 3, 1, 4)   # [bits, tiles, row, blocks, run]
    nibbles = np.stack([b & 15, b >> 4], axis=2)                                         # [bits, tiles, half, row, blocks, run]
    bit = (nibbles[..., None] >> np.arange(4, dtype=np.uint8)) & 1
    return bit.reshape(bits, n_tiles * TILE, in_features)[:, :out_features].astype(np.uint8)


def _stats_tiles(a, dtype):
    """[groups, k, out] -> flat [n_tiles][groups][k][TILE] (rows past out zero)."""
    groups, k, out_f = a.shape
    return _tiles(np.asarray(a).reshape(groups * k, out_f), TILE, dtype).reshape(-1)


def _stats_untiled(flat, groups, k, out_f):
    return _untiles(flat, groups * k, TILE, out_f).reshape(groups, k, out_f)


class LutLinear:
    """y = x @ W^T through table lookups; build with from_uniform, from_quantized or from_bcq."""

    def __init__(self, kind, bits, group_size, out_features, in_features, planes, mults, offsets, perm=None):
        """planes: pyx/lut.h's layout (pack_planes, or _lut.pack_words from GPTQ words); mults float
        [groups, n_mults, out] (s, or a_i); offsets float [groups, out] (c); perm: kernel input k
        is x[perm[k]] (None: in order). The builders below make them."""
        group = in_features if group_size == -1 else group_size
        _check(bits, group, in_features, out_features)
        groups = in_features // group
        n_mults = bits if kind == "binary" else 1
        if mults.shape != (groups, n_mults, out_features) or offsets.shape != (groups, out_features):
            raise ShapeError("lookup-table multipliers and offsets do not match the layer")
        self.kind, self.bits, self.group_size = kind, bits, group_size
        self.in_features, self.out_features = in_features, out_features
        self._group = group
        self._planes = planes
        self._mults = _stats_tiles(np.asarray(mults, dtype=np.float16), np.float16)
        self._offsets = _stats_tiles(np.asarray(offsets, dtype=np.float32)[:, None, :], np.float32)
        self._perm = None if perm is None else np.ascontiguousarray(perm, dtype=np.int32)
        self._matrix = self._build_matrix()

    def _build_matrix(self):
        return _lut.LutMatrix(self.kind, self.bits, self.in_features, self.out_features, self._group, self._planes,
                              self._mults.view(np.uint16), self._offsets, self._perm)

    def copy(self):
        """An independent layer with its own memory (timing streams copies from memory)."""
        twin = copy.copy(self)
        twin._planes, twin._mults, twin._offsets = (a.copy() for a in (self._planes, self._mults, self._offsets))
        twin._matrix = twin._build_matrix()
        return twin

    # ------------------------------------------------------------ builders
    @classmethod
    def from_uniform(cls, codes, scales, zeros, bits, group_size, g_idx=None):
        """Uniform codes [in, out] in [0, 2^bits) (GPTQ orientation, rows in the original
        order), scales and zeros [groups, out]: w = s (q - z), s rounded to float16."""
        codes = np.asarray(codes)
        if codes.ndim != 2:
            raise ShapeError(f"codes must be 2-D [in, out], got shape {codes.shape}")
        in_f, out_f = codes.shape
        group = in_f if group_size == -1 else group_size
        _check(bits, group, in_f, out_f)
        perm = _kernel_order(g_idx, in_f, group)
        if perm is not None:
            codes = codes[perm]
        s = np.asarray(scales, dtype=np.float16).astype(np.float32)
        z = np.asarray(zeros, dtype=np.float32)
        if s.shape != (in_f // group, out_f) or z.shape != s.shape:
            raise ShapeError(f"scales and zeros must be [{in_f // group}, {out_f}]")
        planes = pack_planes(np.stack([(codes.T >> i) & 1 for i in range(bits)]).astype(np.uint8))
        return cls("uniform", bits, group_size, out_f, in_f, planes, s[:, None, :], s * ((2 ** bits - 1) / 2 - z),
                   perm)

    @classmethod
    def from_quantized(cls, layer):
        """The same weights as a QuantizedLinear of 2, 3 or 4 bits (its words laid into planes
        directly, in C: a 7B model's layers convert in seconds)."""
        bits, in_f, out_f = layer.bits, layer.in_features, layer.out_features
        group = in_f if layer.group_size == -1 else layer.group_size
        _check(bits, group, in_f, out_f)
        perm = _kernel_order(layer.g_idx, in_f, group)
        planes = _empty_aligned((-(-out_f // TILE) * in_f * bits * TILE // 8,), np.uint8)
        _lut.pack_words(layer.qweight.view(np.uint32), bits, in_f, planes, perm, kernels.resolve_threads(None))
        s = np.asarray(layer.scales, dtype=np.float16).astype(np.float32)
        return cls("uniform", bits, layer.group_size, out_f, in_f, planes, s[:, None, :],
                   s * ((2 ** bits - 1) / 2 - layer.zeros), perm)

    @classmethod
    def from_bcq(cls, result, g_idx=None):
        """A BcqResult (qinfer/quant/bcq.py): alphas rounded to float16, as checkpoints hold them."""
        bits, group = result.bits, result.group_size
        in_f = result.in_features
        _check(bits, group, in_f, result.out_features)
        perm = _kernel_order(g_idx, in_f, group)
        signs = result.planes if perm is None else result.planes[:, :, perm]
        alphas = np.asarray(result.alphas, dtype=np.float16).astype(np.float32)     # [groups, out, bits]
        offsets = np.asarray(result.offsets, dtype=np.float32)
        return cls("binary", bits, group, result.out_features, in_f, pack_planes((signs > 0).astype(np.uint8)),
                   2 * alphas.transpose(0, 2, 1), offsets, perm)

    # -------------------------------------------------------------- compute
    def __call__(self, x, threads=None):
        threads, fast = kernels.resolve_threads(threads), kernels.active_path() == "avx2"
        return on_rows(x, self.in_features, self.out_features,
                       lambda x2, out: self._matrix.matmul(x2, out, threads, fast))

    # ----------------------------------------------------------- inspection
    @property
    def shape(self):
        return (self.out_features, self.in_features)

    def bit_planes(self):
        """{0, 1} uint8 [bits, out, in] in the original input order."""
        b = unpack_planes(self._planes, self.bits, self.out_features, self.in_features)
        if self._perm is None:
            return b
        out = np.empty_like(b)
        out[:, :, self._perm] = b
        return out

    def dequantize(self):
        """The float32 weight [out, in] the kernels multiply by: sum_i a_i b_i / 2 + c."""
        groups = self.in_features // self._group
        n_mults = self.bits if self.kind == "binary" else 1
        m = _stats_untiled(self._mults, groups, n_mults, self.out_features).astype(np.float32)
        c = _stats_untiled(self._offsets, groups, 1, self.out_features)[:, 0]
        if self.kind == "uniform":
            m = m * 2.0 ** np.arange(self.bits, dtype=np.float32)[None, :, None]
        b = unpack_planes(self._planes, self.bits, self.out_features, self.in_features).astype(np.float32) - 0.5
        group_of = np.arange(self.in_features) // self._group
        w = (b * m.transpose(1, 2, 0)[:, :, group_of]).sum(axis=0) + c.T[:, group_of]
        if self._perm is None:
            return np.ascontiguousarray(w)
        out = np.empty_like(w)
        out[:, self._perm] = w
        return out

    @property
    def nbytes(self):
        return self._planes.nbytes + self._mults.nbytes + self._offsets.nbytes + \
            (self._perm.nbytes if self._perm is not None else 0)

    def __repr__(self):
        g = "full columns" if self.group_size == -1 else f"group {self.group_size}"
        return f"LutLinear({self.kind}, {self.bits}-bit, {g}, {self.out_features}x{self.in_features})"
