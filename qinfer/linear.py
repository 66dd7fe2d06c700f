"""QuantizedLinear: a b-bit GPTQ-style layer and its matrix products.

The layer is given in GPTQ's layout (qinfer/packing.py) and re-laid once into
tiles of `tu` output columns (pyx/qmatrix.h), so each kernel thread streams
its tiles front to back. Everything the public properties return is
reconstructed from that one copy.

Each layer carries its run-time kernel parameters (qinfer/tuning/space.py):
the tuned ones for its shape when this CPU was tuned, else the performance
model's; set_kernel_params() changes them.

Scales and zeros are held in float16 when every one of them is exact in it
(float16 checkpoint scales with integer zeros, GGUF Q4_0/Q8_0, qinfer's own
quantize-on-load), else in float32. Both give the same numbers: the kernels
widen float16 exactly. At 4-bit group 32 that is 5 bits per weight read
instead of 6.
"""
import copy

import numpy as np

from . import _runtime, arena, kernels, packing, rtn
from .errors import ShapeError, UnsupportedError
from .tuning import table as tuning_table
from .tuning.space import LayerParams, LayerShape, segment_rows


def _check_features(in_features, out_features):
    if in_features <= 0 or out_features <= 0:
        raise ShapeError(f"a layer needs in_features and out_features >= 1, got {in_features} and {out_features}")
    if in_features % 32:
        raise ShapeError(f"in_features={in_features} is not a multiple of 32 (the packing unit)")


SCALE_DTYPES = ("float16", "float32")


def held_scale_dtype(scales, zeros, requested=None, known_exact=False):
    """The storage of a layer's scales and zeros: float16 when that loses nothing.
    known_exact: the caller knows every value is exact in float16 (a GGUF Q4_0 block's
    d and 8 d): float16 unless float32 is requested, not checked again (a pass less over
    them when a 7B model loads)."""
    if requested is not None and requested not in SCALE_DTYPES:
        raise UnsupportedError(f"scale_dtype must be one of {SCALE_DTYPES} or None (automatic), got {requested!r}")
    if requested == "float32":
        return np.float32
    if known_exact:
        return np.float16
    with np.errstate(over="ignore"):
        exact = all(np.array_equal(a.astype(np.float16).astype(np.float32), a) for a in (scales, zeros))
    if requested == "float16" and not exact:
        raise UnsupportedError("scale_dtype='float16': some scales or zeros are not exact in float16")
    return np.float16 if exact else np.float32


def _as_2d_float32(name, array, shape):
    array = np.asarray(array)
    if array.shape != shape:
        raise ShapeError(f"{name} must have shape {shape}, got {array.shape}")
    return np.asarray(array, dtype=np.float32)     # any strides: the layer copies it into tiles once


CODE_ALIGNMENT = 64       # bytes: a cache line


def _empty_aligned(shape, dtype, alignment=CODE_ALIGNMENT):
    """An uninitialized C-order array starting on a cache-line boundary (see _aligned)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    buf = np.empty(nbytes + alignment, dtype=np.uint8)
    start = -buf.ctypes.data % alignment
    return buf[start:start + nbytes].view(dtype).reshape(shape)


def _tiles(a, tu, dtype=None):
    """[rows, out] (any strides: GPTQ's row-major arrays, or the transposed views of a
    GGUF tensor's column-major ones) -> [n_tiles][rows][tu], C order, 64-byte aligned
    (see _aligned) on huge pages (qinfer/arena.py), converted to `dtype` in the same copy; columns past `out` are zero."""
    rows, out = a.shape
    n_tiles, full = -(-out // tu), out // tu
    dst = arena.weights.empty((n_tiles, rows, tu), dtype or a.dtype)
    dst[:full] = a[:, :full * tu].reshape(rows, full, tu).transpose(1, 0, 2)
    if full < n_tiles:
        dst[full] = 0
        dst[full, :, :out - full * tu] = a[:, full * tu:]
    return dst


def _untiles(flat, rows, tu, out):
    """The inverse of _tiles: flat [n_tiles][rows][tu] -> [rows, out], C order."""
    n_tiles = -(-out // tu)
    a = flat.reshape(n_tiles, rows, tu).transpose(1, 0, 2).reshape(rows, n_tiles * tu)
    return np.ascontiguousarray(a[:, :out])


def act_order_perm(g_idx, in_features, n_groups, group):
    """Act-order's kernel order: input k of the kernel is x[perm[k]], the rows sorted by their
    group (stable). ShapeError unless g_idx has in_features entries in [0, n_groups) giving
    every group exactly `group` rows."""
    g_idx = np.asarray(g_idx)
    if g_idx.shape != (in_features,):
        raise ShapeError(f"g_idx must have {in_features} entries, got shape {g_idx.shape}")
    if g_idx.min() < 0 or g_idx.max() >= n_groups:
        raise ShapeError(f"g_idx values must lie in [0, {n_groups})")
    perm = np.argsort(g_idx, kind="stable").astype(np.int32)
    if np.any(g_idx[perm] != np.arange(in_features) // group):
        raise ShapeError(f"g_idx does not give every group exactly {group} rows")
    return perm


def _aligned(a, alignment=CODE_ALIGNMENT):
    """A C-contiguous copy of `a` (any strides) starting on a cache-line
    boundary. numpy only promises 16 bytes, and from a start 16 bytes off a 32-byte boundary every
    other 32-byte load of the kernels' code streams straddles two cache lines
    (and the prefetches run a line short): 64-byte alignment made the
    float qgemv 5-9% and the int8 one 3-4% faster (benchmarks/kernels.py,
    11008x4096 4-bit g128, 2 threads; the machine is noisy)."""
    out = _empty_aligned(a.shape, a.dtype, alignment)
    out[...] = a
    return out


def on_rows(x, in_features, out_features, run):
    """x [in] or [n, in] as float32 rows x2 [n, in], run(x2, out) filling out [n, out]; returns
    out in x's shape ([out] for one vector). The layers' __call__ share it."""
    x = np.asarray(x)
    single = x.ndim == 1
    if x.ndim not in (1, 2) or x.shape[-1] != in_features:
        raise ShapeError(f"x must be [{in_features}] or [n, {in_features}], got {x.shape}")
    x2 = np.ascontiguousarray(x.reshape(1, -1) if single else x, dtype=np.float32)
    out = np.empty((x2.shape[0], out_features), dtype=np.float32)
    run(x2, out)
    return out[0] if single else out


def matmul(matrix, x, in_features, out_features, threads=None):
    """x [in] or [n, in] @ W^T through a layer's kernel handle (_runtime.QMatrix or SpqrMatrix):
    on the active path, with int8 activations when they are on and the layer has them."""
    threads, avx2 = kernels.resolve_threads(threads), kernels.active_path() == "avx2"
    if kernels.active_activations() == "int8" and matrix.has_int8(avx2):
        return on_rows(x, in_features, out_features,      # each row of x rounded to int8
                       lambda x2, out: matrix.matmul_int8(x2, out, threads, avx2))
    return on_rows(x, in_features, out_features, lambda x2, out: matrix.matmul(x2, out, threads, avx2))


class QuantizedLinear:
    """y = x @ W^T with W stored as b-bit codes, a scale and a zero per group."""

    def __init__(self, qweight, scales, zeros, bits, group_size, in_features, out_features, scale_dtype=None,
                 known_exact=False):
        packing.check_bits(bits)
        rtn.check_group_size(group_size, in_features)
        _check_features(in_features, out_features)
        self.bits, self.group_size = bits, group_size
        self.in_features, self.out_features = in_features, out_features
        group = in_features if group_size == -1 else group_size

        p = kernels.params(bits)
        tu = p["tu"]
        # [units*words, out] -> [tiles][units*words][tu]: one copy, written aligned
        self._words = _tiles(qweight.view(np.uint32), tu).reshape(-1)
        dtype = held_scale_dtype(scales, zeros, scale_dtype, known_exact)
        if len(zeros) > 1 and np.array_equal(zeros, np.broadcast_to(zeros[:1], zeros.shape)):
            zeros = zeros[:1]      # a symmetric format's constant zero: held once per column
        self._scales, self._zeros = (_tiles(a, tu, dtype).reshape(-1) for a in (scales, zeros))
        self._perm = None      # act-order: kernel input k is x[perm[k]]
        self._g_idx = None
        self._tu, self._group = tu, group
        self._kernel_params = tuning_table.params_for(self.shape)
        self._matrix = self._build_matrix()

    def _build_matrix(self):
        half = self._scales.dtype == np.float16          # the C side takes float16 as its bits
        scales, zeros = (a.view(np.uint16) if half else a for a in (self._scales, self._zeros))
        m = _runtime.QMatrix(
            kernels.module(self.bits).KERNELS, self.bits, self.in_features, self.out_features,
            self._group, self._tu, segment_rows(self.shape),
            self._words, scales, zeros, self._perm, half)
        p = self._kernel_params
        m.configure(p.nv, p.mb, p.nb, p.tb // self._tu)
        return m

    # ---------------------------------------------------- kernel parameters
    @property
    def shape(self):
        """What tuned kernel parameters are keyed by."""
        return LayerShape(self.bits, self.out_features, self.in_features, self.group_size)

    @property
    def kernel_params(self):
        return self._kernel_params

    def set_kernel_params(self, params):
        """Run with other kernel parameters (a LayerParams); the result stays the
        same up to float rounding. Also reaches a forward pass using this layer."""
        if not isinstance(params, LayerParams):
            raise UnsupportedError(f"expected LayerParams, got {type(params).__name__}")
        if params.tb % self._tu:
            raise UnsupportedError(f"tb={params.tb} is not a multiple of the tile width {self._tu}")
        try:
            self._matrix.configure(params.nv, params.mb, params.nb, params.tb // self._tu)
        except ValueError as exc:
            raise UnsupportedError(f"kernel parameters {params} do not fit {self!r}: {exc}") from None
        self._kernel_params = params

    def copy(self):
        """An independent layer with its own memory (the tuner streams copies)."""
        twin = copy.copy(self)
        twin._words, twin._scales, twin._zeros = _aligned(self._words), self._scales.copy(), self._zeros.copy()
        twin._matrix = twin._build_matrix()
        return twin

    # ------------------------------------------------------------ builders
    @classmethod
    def from_float(cls, weight, bits, group_size=128, sym=False):
        """Round-to-nearest quantization of a float [out_features, in_features] weight."""
        weight = np.asarray(weight)
        if weight.ndim != 2:
            raise ShapeError(f"weight must be 2-D [out_features, in_features], got shape {weight.shape}")
        out_features, in_features = weight.shape
        _check_features(in_features, out_features)
        codes, scales, zeros = rtn.quantize(weight, bits, group_size, sym)
        return cls(packing.pack(codes, bits), scales, zeros, bits, group_size, in_features, out_features)

    @classmethod
    def from_packed(cls, qweight, scales, zeros, bits, group_size, g_idx=None, scale_dtype=None,
                    known_exact=False):
        """From GPTQ-layout int32 words [in*bits/32, out] and float scales/zeros [groups, out].

        scale_dtype: how the layer holds its scales and zeros: None (float16
        when every value is exact in it, else float32), "float32", or
        "float16" (an error when that would round). known_exact: the caller
        vouches that every value is exact in float16, which is then not checked."""
        packing.check_bits(bits)
        qweight = np.asarray(qweight)
        if qweight.ndim != 2 or qweight.dtype.itemsize != 4 or qweight.dtype.kind not in "iu":
            raise ShapeError(f"qweight must be a 2-D int32 array, got {qweight.dtype} {qweight.shape}")
        rows, out_features = qweight.shape
        if (rows * 32) % bits:
            raise ShapeError(f"qweight has {rows} rows, not a whole number of {bits}-bit units")
        in_features = rows * 32 // bits
        _check_features(in_features, out_features)
        rtn.check_group_size(group_size, in_features)
        n_groups = 1 if group_size == -1 else in_features // group_size
        scales = _as_2d_float32("scales", scales, (n_groups, out_features))
        zeros = _as_2d_float32("zeros", zeros, (n_groups, out_features))
        qweight = qweight.view(np.int32)           # any strides: the layer copies it into tiles once
        if g_idx is None:
            return cls(qweight, scales, zeros, bits, group_size, in_features, out_features, scale_dtype,
                       known_exact)
        return cls._from_act_order(qweight, scales, zeros, bits, group_size, g_idx, scale_dtype)

    @classmethod
    def _from_act_order(cls, qweight, scales, zeros, bits, group_size, g_idx, scale_dtype):
        """Rows of one group may be scattered: sort them together and gather x to match."""
        in_features = qweight.shape[0] * 32 // bits
        group = in_features if group_size == -1 else group_size
        perm = act_order_perm(g_idx, in_features, scales.shape[0], group)
        if np.array_equal(perm, np.arange(in_features)):     # stored, but trivial
            layer = cls(qweight, scales, zeros, bits, group_size, in_features, qweight.shape[1], scale_dtype)
        else:
            codes = packing.unpack(qweight, bits)[perm]
            layer = cls(packing.pack(codes, bits), scales, zeros, bits, group_size,
                        in_features, qweight.shape[1], scale_dtype)
            layer._perm = perm
            layer._matrix = layer._build_matrix()
        layer._g_idx = np.ascontiguousarray(g_idx, dtype=np.int32)
        return layer

    @classmethod
    def stack(cls, layers):
        """One layer computing [a(x) | b(x) | ...]: the layers' output columns side by
        side (same input, bits, group size and row groups), e.g. q, k and v."""
        first = layers[0]
        for layer in layers[1:]:
            if not first.can_stack(layer):
                raise UnsupportedError(f"cannot stack {layer!r} onto {first!r}: inputs, bits, groups or "
                                       "act-order rows differ")
        return cls.from_packed(np.concatenate([l.qweight for l in layers], axis=1),
                               np.concatenate([l.scales for l in layers], axis=1),
                               np.concatenate([l.zeros for l in layers], axis=1),
                               first.bits, first.group_size, first.g_idx,
                               "float32" if any(l.scale_dtype == "float32" for l in layers) else None)

    def can_stack(self, other):
        same_rows = (self._g_idx is None and other._g_idx is None) or (
            self._g_idx is not None and other._g_idx is not None and np.array_equal(self._g_idx, other._g_idx))
        return (isinstance(other, QuantizedLinear) and same_rows and
                (self.bits, self.group_size, self.in_features) == (other.bits, other.group_size, other.in_features))

    def split(self, widths):
        """The stacked parts back: layers of `widths` output columns (they must add up)."""
        if sum(widths) != self.out_features or min(widths) < 1:
            raise ShapeError(f"widths {list(widths)} do not split {self.out_features} outputs")
        qweight, scales, zeros = self.qweight, self.scales, self.zeros
        edges = np.cumsum([0, *widths])
        return [QuantizedLinear.from_packed(qweight[:, a:b], scales[:, a:b], zeros[:, a:b],
                                            self.bits, self.group_size, self._g_idx, self.scale_dtype)
                for a, b in zip(edges[:-1], edges[1:])]

    # -------------------------------------------------------------- compute
    def __call__(self, x, threads=None):
        return matmul(self._matrix, x, self.in_features, self.out_features, threads)

    # ----------------------------------------------------------- inspection
    def _untile(self, flat, rows):
        return _untiles(flat, rows, self._tu, self.out_features)

    @property
    def qweight(self):
        """The GPTQ-layout int32 words [in*bits/32, out], rows in their original order."""
        rows = self.in_features * self.bits // 32
        words = self._untile(self._words, rows).view(np.int32)
        if self._perm is None:
            return words
        codes = packing.unpack(words, self.bits)
        unsorted = np.empty_like(codes)
        unsorted[self._perm] = codes
        return packing.pack(unsorted, self.bits)

    @property
    def scales(self):
        """float32 [n_groups, out_features]."""
        return self._untile(self._scales, self.in_features // self._group).astype(np.float32)

    @property
    def zeros(self):
        """float32 [n_groups, out_features]."""
        groups = self.in_features // self._group
        held = self._untile(self._zeros, self.zero_groups)
        return np.broadcast_to(held, (groups, self.out_features)).astype(np.float32)

    @property
    def zero_groups(self):
        """Rows of zeros held per column: the number of groups, or 1 when every group of a
        column has the same zero (symmetric formats), which is then held once."""
        return self._zeros.size // (-(-self.out_features // self._tu) * self._tu)

    @property
    def scale_dtype(self):
        """"float16" or "float32": how the scales and zeros are held (the values are the same)."""
        return self._scales.dtype.name

    @property
    def g_idx(self):
        return self._g_idx

    def dequantize(self):
        """The float32 weight [out_features, in_features] the kernels multiply by."""
        codes = packing.unpack(self.qweight, self.bits).astype(np.float32)
        if self._g_idx is not None:
            group_of_row = self._g_idx
        else:
            group_of_row = np.arange(self.in_features) // self._group
        w = self.scales[group_of_row] * (codes - self.zeros[group_of_row])
        return np.ascontiguousarray(w.T)

    @property
    def nbytes(self):
        held = self._words.nbytes + self._scales.nbytes + self._zeros.nbytes
        return held + (self._perm.nbytes if self._perm is not None else 0)

    def __repr__(self):
        group = "full column" if self.group_size == -1 else f"group {self.group_size}"
        return (f"QuantizedLinear({self.in_features} -> {self.out_features}, "
                f"{self.bits}-bit, {group}, {self.nbytes / 2**20:.2f} MiB)")
