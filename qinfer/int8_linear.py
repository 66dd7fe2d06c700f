"""Int8Linear: a linear layer with int8 (or 4-bit) weights whose input is rounded to int8
per token (W8A8 and W4A8: SmoothQuant's and ZeroQuant's), multiplied in integers by
pyx/w8a8.h's kernels.

    w = s * c          c in [-128, 127] (8-bit; [-8, 7] 4-bit), s float32 per output row and group
    q = round(x / d)   d = max|x| / 127 per row of x (token), at run time
    y = (sum_g s_g * dot_g) * d,   dot_g = sum over the group of c * q, exact in int32

A GPTQ-format checkpoint with symmetric codes (every zero point 2^(bits-1)) holds such a
layer as it is: from_packed takes its codes as they are (c = code - 2^(bits-1)). The
kernels' instruction set follows qinfer.kernels: the portable loop on the scalar path,
else AVX-512 VNNI unless the int8 kernels are held to AVX2 (QINFER_INT8_ISA); every
one gives the same bits.
"""
import numpy as np

from . import _w8a8, kernels, packing
from .errors import FormatError, ShapeError, UnsupportedError
from .linear import on_rows

TILE = _w8a8.TILE


def kernel_isa():
    """The loops the active kernel settings ask for, of those this CPU runs."""
    have = _w8a8.cpu_isas()
    if kernels.active_path() != "avx2":
        return "portable"
    if kernels.active_int8_isa() == "avx512vnni" and "avx512vnni" in have:
        return "avx512vnni"
    return "avx2" if "avx2" in have else "portable"


BITS = (8, 4)


def _check(codes, scales, group_size, bits):
    if bits not in BITS:
        raise UnsupportedError(f"int8-activation layers take 8- or 4-bit weights, got {bits!r}")
    if codes.ndim != 2 or codes.dtype != np.int8:
        raise ShapeError(f"codes must be int8 [out, in], got {codes.dtype} {codes.shape}")
    out_f, in_f = codes.shape
    group = in_f if group_size == -1 else group_size
    step = _w8a8.group_multiple(bits)
    if isinstance(group, bool) or not isinstance(group, (int, np.integer)) or group < 1 or in_f % group or \
            group % step or group > _w8a8.MAX_GROUP:
        raise UnsupportedError(f"int8-activation layers of {bits}-bit weights take groups that divide their {in_f} "
                               f"inputs, are a multiple of {step} and at most {_w8a8.MAX_GROUP} (or -1, full rows), "
                               f"got {group_size!r}")
    if bits == 4 and codes.size and (codes.min() < -8 or codes.max() > 7):
        raise FormatError("4-bit codes must lie in [-8, 7]")
    if scales.shape != (out_f, in_f // group):
        raise ShapeError(f"scales must be [{out_f}, {in_f // group}], got {scales.shape}")
    if not np.all(np.isfinite(scales)):
        raise FormatError("int8 x int8 layer: a scale is not finite")
    return int(group)


class Int8Linear:
    """y = x @ W^T with int8 weights and per-token int8 activations (the module docstring)."""

    def __init__(self, codes, scales, group_size=-1, bits=8, low_rank=None, ranks=None):
        """codes int8 [out, in] (bits 4: in [-8, 7]); scales float32 [out, in / group];
        group_size -1: whole rows; low_rank: None, or LoRC's factors (A [rank, in], B [out,
        rank]): y += B (A x) (quant/lorc.py); ranks: how a stacked layer's rank splits among
        its parts (stack)."""
        codes = np.ascontiguousarray(codes)
        scales = np.ascontiguousarray(scales, dtype=np.float32)
        self._group = _check(codes, scales, group_size, bits)
        self.group_size, self.bits = group_size, bits
        self.out_features, self.in_features = codes.shape
        if low_rank is not None:
            low_rank = tuple(np.ascontiguousarray(f, dtype=np.float32) for f in low_rank)
            if not all(np.all(np.isfinite(f)) for f in low_rank):
                raise FormatError("int8-activation layer: a low-rank compensation factor is not finite")
        self._ranks = ranks
        self._matrix = _w8a8.Int8Matrix(codes, scales, self._group, kernel_isa(), kernels.resolve_threads(None),
                                        bits, low_rank)

    def copy(self):
        """An independent layer with its own memory (timing streams copies from memory)."""
        return Int8Linear(self.codes(), self.scales(), self.group_size, self.bits, self.low_rank(), self._ranks)

    # ------------------------------------------------------------ builders
    @classmethod
    def from_packed(cls, qweight, scales, zeros, bits, group_size, g_idx=None, name="layer", low_rank=None):
        """GPTQ tensors of symmetric codes (qweight int32 [in * bits / 32, out], scales and zeros
        [groups, out], every zero 2^(bits-1), rows in order): c = code - 2^(bits-1). A
        FormatError names `name` when they are not that."""
        if bits not in BITS:
            raise FormatError(f"{name}: per-token int8 activations need 8- or 4-bit weights, the layer has {bits}")
        in_f = np.asarray(qweight).shape[0] * 32 // bits
        group = in_f if group_size == -1 else group_size
        if g_idx is not None and not np.array_equal(g_idx, np.arange(in_f) // group):
            raise FormatError(f"{name}: act-order (g_idx) is not supported with per-token int8 activations")
        mid = 2 ** (bits - 1)
        if not np.all(np.asarray(zeros) == mid):
            raise FormatError(f"{name}: per-token int8 activations need symmetric weights (every zero point {mid})")
        codes = (packing.unpack(np.asarray(qweight), bits).astype(np.int16) - mid).astype(np.int8)     # [in, out]
        return cls(np.ascontiguousarray(codes.T), np.ascontiguousarray(np.asarray(scales, dtype=np.float32).T),
                   group_size, bits, low_rank)

    @classmethod
    def from_quantized(cls, layer, name="layer", low_rank=None):
        """The same weights as a symmetric 8- or 4-bit QuantizedLinear (from_packed's conditions)."""
        return cls.from_packed(layer.qweight, layer.scales, layer.zeros, layer.bits, layer.group_size, layer.g_idx,
                               name, low_rank)

    @classmethod
    def stack(cls, layers):
        """One layer computing [a(x) | b(x) | ...] (same inputs and groups), e.g. q, k and v."""
        first = layers[0]
        for layer in layers[1:]:
            if not first.can_stack(layer):
                raise UnsupportedError(f"cannot stack {layer!r} onto {first!r}: inputs or groups differ")
        low_rank = ranks = None
        if any(l.low_rank() is not None for l in layers):
            # A x of every part, side by side; each part's B on its own outputs (block diagonal)
            ranks = [l.rank for l in layers]
            out_edges, rank_edges = np.cumsum([0] + [l.out_features for l in layers]), np.cumsum([0] + ranks)
            a = np.zeros((rank_edges[-1], first.in_features), np.float32)
            b = np.zeros((out_edges[-1], rank_edges[-1]), np.float32)
            for i, l in enumerate(layers):
                if l.rank:
                    la, lb = l.low_rank()
                    a[rank_edges[i]:rank_edges[i + 1]] = la
                    b[out_edges[i]:out_edges[i + 1], rank_edges[i]:rank_edges[i + 1]] = lb
            low_rank = (a, b)
        return cls(np.concatenate([l.codes() for l in layers]), np.concatenate([l.scales() for l in layers]),
                   first.group_size, first.bits, low_rank, ranks)

    def can_stack(self, other):
        return isinstance(other, Int8Linear) and \
            (self.in_features, self._group, self.bits) == (other.in_features, other._group, other.bits)

    def split(self, widths):
        """The stacked parts back: layers of `widths` output rows (they must add up)."""
        if sum(widths) != self.out_features or min(widths) < 1:
            raise ShapeError(f"widths {list(widths)} do not split {self.out_features} outputs")
        codes, scales = self.codes(), self.scales()
        edges = np.cumsum([0, *widths])
        if self.rank == 0:
            return [Int8Linear(codes[a:b], scales[a:b], self.group_size, self.bits) for a, b in zip(edges[:-1], edges[1:])]
        if self._ranks is None or len(self._ranks) != len(widths):
            raise UnsupportedError(f"{self!r}: its low-rank compensation was not stacked from {len(widths)} parts")
        la, lb = self.low_rank()
        rank_edges = np.cumsum([0, *self._ranks])
        return [Int8Linear(codes[a:b], scales[a:b], self.group_size, self.bits,
                           (la[ra:rb], lb[a:b, ra:rb]) if rb > ra else None)
                for a, b, ra, rb in zip(edges[:-1], edges[1:], rank_edges[:-1], rank_edges[1:])]

    # -------------------------------------------------------------- compute
    def __call__(self, x, threads=None):
        self._matrix.isa = kernel_isa()
        self._matrix.amx = kernels.int8_amx()
        threads = kernels.resolve_threads(threads)
        return on_rows(x, self.in_features, self.out_features, lambda x2, out: self._matrix.matmul(x2, out, threads))

    # ----------------------------------------------------------- inspection
    @property
    def shape(self):
        return (self.out_features, self.in_features)

    @property
    def isa(self):
        return self._matrix.isa

    def codes(self):
        """c, int8 [out, in]."""
        return self._matrix.codes()

    def scales(self):
        """float32 [out, in / group]."""
        return self._matrix.scales()

    def low_rank(self):
        """None, or LoRC's factors (A [rank, in], B [out, rank])."""
        return self._matrix.low_rank()

    @property
    def rank(self):
        f = self.low_rank()
        return 0 if f is None else f[0].shape[0]

    def dequantize(self):
        """The float32 weight [out, in] the layer stands for: s * c (+ B A with LoRC)."""
        w = np.repeat(self.scales(), self._group, axis=1) * self.codes().astype(np.float32)
        f = self.low_rank()
        return w if f is None else w + f[1] @ f[0]

    @property
    def nbytes(self):
        return self._matrix.nbytes

    def __repr__(self):
        g = "full rows" if self.group_size == -1 else f"group {self.group_size}"
        lorc = f", LoRC rank {self.rank}" if self.rank else ""
        return f"Int8Linear(W{self.bits}A8, {g}{lorc}, {self.out_features}x{self.in_features})"
