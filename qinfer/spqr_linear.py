"""SpqrLinear: a SpQR layer (qinfer/quant/spqr.py) held the way the kernels run it.

The codes are re-laid into tiles like QuantizedLinear's (pyx/qmatrix.h); the
group statistics stay compressed, as records of 16 output rows x one group
(pyx/spqr.h draws them): the scale codes and integer zero points as bit planes,
then the run's float16 second-level scale and zero. A call widens a few tiles'
records at a time into float32 and runs the bitwidth's own dense kernels on
them, then adds the float16 outliers (a compressed-sparse-row table) of the
same rows. docs/FORMAT.md, section 6, gives the checkpoint's tensors.
"""
import numpy as np

from . import _runtime, kernels, packing
from .errors import ShapeError, UnsupportedError
from .linear import _tiles, matmul
# RUN: beta2, output rows per record (the kernels read runs of 16); the bit widths SpQR
# layers take: the checkpoint reader's, which refuses other values by name
from .readers.spqr import SPQR_BITS, STAT_BITS, STAT_GROUP as RUN
from .tuning import table as tuning_table
from .tuning.space import LayerShape, segment_rows


def record_halves(stat_bits, bits):
    """uint16 entries per record: the scale-code planes, the zero planes, s2 and z2."""
    return stat_bits + bits + 2


def _planes(codes, n_bits):
    """codes [groups, runs * 16] -> [runs, groups, n_bits] uint16: bit i of plane p is bit p
    of row (16 run + i)'s code."""
    groups, rows = codes.shape
    by_run = codes.reshape(groups, rows // RUN, RUN).transpose(1, 0, 2).astype(np.uint32)   # [runs, groups, 16]
    weights = np.uint32(1) << np.arange(RUN, dtype=np.uint32)
    return np.stack([((by_run >> p) & 1) @ weights for p in range(n_bits)], axis=-1).astype(np.uint16)


def _unplanes(planes, rows):
    """The inverse of _planes: [runs, groups, n_bits] -> codes [groups, rows]."""
    runs, groups, n_bits = planes.shape
    bits = (planes[..., None].astype(np.uint32) >> np.arange(RUN, dtype=np.uint32)) & 1   # [runs, groups, p, 16]
    codes = (bits << np.arange(n_bits, dtype=np.uint32)[:, None]).sum(axis=2)              # [runs, groups, 16]
    return codes.transpose(1, 0, 2).reshape(groups, runs * RUN)[:, :rows].astype(np.uint8)


def pack_records(scale_codes, zeros, scale_scale, scale_zero, stat_bits, bits):
    """The statistics of spqr.SpqrResult ([groups, out] codes and zero points, [groups, runs]
    second-level scale and zero) -> records uint16 [runs][groups][record_halves] (pyx/spqr.h)."""
    groups, out = scale_codes.shape
    runs = -(-out // RUN)
    if scale_scale.shape != (groups, runs) or scale_zero.shape != (groups, runs):
        raise ShapeError(f"the second-level statistics must be [{groups}, {runs}] (runs of {RUN} rows)")
    pad = ((0, 0), (0, runs * RUN - out))
    records = np.empty((runs, groups, record_halves(stat_bits, bits)), dtype=np.uint16)
    records[..., :stat_bits] = _planes(np.pad(scale_codes, pad), stat_bits)
    records[..., stat_bits:stat_bits + bits] = _planes(np.pad(zeros, pad), bits)
    records[..., -2] = np.asarray(scale_scale, dtype=np.float16).T.view(np.uint16)
    records[..., -1] = np.asarray(scale_zero, dtype=np.float16).T.view(np.uint16)
    return records


def unpack_records(records, out, stat_bits, bits):
    """records -> (scale_codes, zeros [groups, out] uint8, scale_scale, scale_zero [groups, runs] float32)."""
    return (_unplanes(records[..., :stat_bits], out), _unplanes(records[..., stat_bits:stat_bits + bits], out),
            records[..., -2].T.view(np.float16).astype(np.float32),
            records[..., -1].T.view(np.float16).astype(np.float32))


def check_outliers(rows, cols, vals, out_features, in_features):
    """A compressed-sparse-row outlier table that the kernels can walk safely."""
    if rows.shape != (out_features + 1,) or rows[0] != 0 or np.any(np.diff(rows) < 0):
        raise ShapeError(f"the outlier row pointers must be {out_features + 1} non-decreasing offsets from 0")
    if rows[-1] != len(cols) or len(cols) != len(vals):
        raise ShapeError(f"the outlier table holds {len(cols)} columns and {len(vals)} values, its row "
                         f"pointers end at {rows[-1]}")
    if len(cols) and cols.max() >= in_features:
        raise ShapeError(f"an outlier's column {int(cols.max())} is past in_features={in_features}")


class SpqrLinear:
    """y = x @ W^T, W = SpQR's dense part (b-bit codes, scales stored as 3-bit codes)
    plus float16 outliers."""

    def __init__(self, qweight, records, outlier_rows, outlier_cols, outlier_vals, bits, group_size, stat_bits,
                 in_features, out_features, perm=None):
        """qweight: GPTQ-layout words [in*bits/32, out] of the codes in the weight's column
        order; records: uint16 [runs, groups, record_halves] (pyx/spqr.h); the outliers
        as row pointers (int32 [out + 1]), columns (uint16) and float16 values; perm:
        act-order's column order (int32 [in]: group g is perm[g*group_size:(g+1)*group_size])."""
        if bits not in SPQR_BITS:
            raise UnsupportedError(f"SpQR layers take {', '.join(map(str, SPQR_BITS))} bits, got {bits}")
        if stat_bits not in STAT_BITS:
            raise UnsupportedError(f"the SpQR statistics take 2 to 8 bits, got {stat_bits}")
        if in_features % 32 or group_size <= 0 or in_features % group_size or group_size % 16:
            raise ShapeError(f"in_features={in_features} must be a multiple of 32 and of the group size "
                             f"{group_size} (a multiple of 16)")
        if in_features > 65536:
            raise ShapeError(f"in_features={in_features} is more than an outlier's 16-bit column holds")
        self.bits, self.group_size, self.stat_bits = bits, group_size, stat_bits
        self.in_features, self.out_features = in_features, out_features
        groups, runs = in_features // group_size, -(-out_features // RUN)
        qweight = np.asarray(qweight)
        if qweight.shape != (in_features * bits // 32, out_features) or qweight.dtype.itemsize != 4:
            raise ShapeError(f"qweight must be int32 [{in_features * bits // 32}, {out_features}], "
                             f"got {qweight.dtype} {qweight.shape}")
        records = np.asarray(records)
        if records.shape != (runs, groups, record_halves(stat_bits, bits)) or records.dtype.itemsize != 2:
            raise ShapeError(f"the statistics must be uint16 [{runs}, {groups}, {record_halves(stat_bits, bits)}], "
                             f"got {records.dtype} {records.shape}")
        rows = np.ascontiguousarray(outlier_rows, dtype=np.int32)
        cols = np.ascontiguousarray(outlier_cols, dtype=np.uint16)
        vals = np.ascontiguousarray(np.asarray(outlier_vals).view(np.uint16))
        check_outliers(rows, cols, vals, out_features, in_features)
        if perm is not None:
            perm = np.ascontiguousarray(perm, dtype=np.int32)
            if not np.array_equal(np.sort(perm), np.arange(in_features)):
                raise ShapeError(f"perm must be a permutation of the {in_features} input columns")
            codes = packing.unpack(qweight.view(np.int32), bits)[perm]     # the kernels' input order
            qweight = packing.pack(codes, bits)
        self._tu = kernels.params(bits)["tu"]
        self._words = _tiles(qweight.view(np.uint32), self._tu).reshape(-1)
        self._records = np.ascontiguousarray(records, dtype=np.uint16).reshape(-1)
        self._rows, self._cols, self._vals, self._perm = rows, cols, vals, perm
        self._matrix = _runtime.SpqrMatrix(
            kernels.module(bits).KERNELS, bits, in_features, out_features, group_size, self._tu,
            segment_rows(self.shape), self._words, stat_bits, self._records, rows, cols, vals, perm)
        p = tuning_table.params_for(self.shape)
        self._matrix.configure(p.nv, p.mb, p.nb, p.tb // self._tu)

    @classmethod
    def from_result(cls, result):
        """From the quantizer's spqr.SpqrResult."""
        if result.stat_group != RUN:
            raise UnsupportedError(f"the kernels read the statistics in runs of {RUN} output rows; this "
                                   f"layer has runs of {result.stat_group}")
        records = pack_records(result.scale_codes, result.zeros, result.scale_scale, result.scale_zero,
                               result.stat_bits, result.bits)
        return cls(packing.pack(result.codes.T, result.bits), records, result.outlier_rows, result.outlier_cols,
                   result.outlier_values, result.bits, result.group_size, result.stat_bits,
                   result.in_features, result.out_features, result.perm)

    # -------------------------------------------------------------- compute
    def __call__(self, x, threads=None):
        return matmul(self._matrix, x, self.in_features, self.out_features, threads)

    # ----------------------------------------------------------- inspection
    @property
    def shape(self):
        return LayerShape(self.bits, self.out_features, self.in_features, self.group_size)

    @property
    def qweight(self):
        """GPTQ-layout words [in*bits/32, out] of the codes, in the weight's column order."""
        rows = self.in_features * self.bits // 32
        n_tiles = -(-self.out_features // self._tu)
        words = self._words.reshape(n_tiles, rows, self._tu).transpose(1, 0, 2).reshape(rows, -1)
        words = np.ascontiguousarray(words[:, :self.out_features]).view(np.int32)
        if self._perm is None:
            return words
        codes = packing.unpack(words, self.bits)
        ordered = np.empty_like(codes)
        ordered[self._perm] = codes
        return packing.pack(ordered, self.bits)

    @property
    def records(self):
        groups = self.in_features // self.group_size
        return self._records.reshape(-1, groups, record_halves(self.stat_bits, self.bits))

    @property
    def outliers(self):
        """(row pointers int32 [out + 1], columns uint16, values float16)."""
        return self._rows, self._cols, self._vals.view(np.float16)

    @property
    def perm(self):
        return self._perm

    @property
    def n_outliers(self):
        return len(self._cols)

    def scales(self):
        """float32 [groups, out]: the group scales as the kernels widen them (group g: the
        kernels' input columns g*group_size.., act-order's)."""
        codes, _, s2, z2 = unpack_records(self.records, self.out_features, self.stat_bits, self.bits)
        run = np.arange(self.out_features) // RUN
        return (s2[:, run] * (codes.astype(np.float32) - z2[:, run])).astype(np.float32)

    def zeros(self):
        """float32 [groups, out]: the integer zero points."""
        return unpack_records(self.records, self.out_features, self.stat_bits, self.bits)[1].astype(np.float32)

    def dequantize(self):
        """The float32 weight [out_features, in_features]: dense part plus outliers."""
        codes = packing.unpack(self.qweight, self.bits).astype(np.float32)          # [in, out], weight's order
        order = np.arange(self.in_features) if self._perm is None else np.argsort(self._perm)
        group = order // self.group_size
        w = (self.scales()[group] * (codes - self.zeros()[group])).T.copy()
        rows = np.repeat(np.arange(self.out_features), np.diff(self._rows))
        w[rows, self._cols.astype(np.intp)] += self._vals.view(np.float16).astype(np.float32)
        return w

    @property
    def nbytes(self):
        held = self._words.nbytes + self._records.nbytes + self._rows.nbytes + self._cols.nbytes + self._vals.nbytes
        return held + (self._perm.nbytes if self._perm is not None else 0)

    def bits_per_weight(self):
        """Bits stored per weight, SpQR's count: codes, statistics, outliers (16-bit column +
        16-bit value); the row pointers and a permutation left out, as the paper leaves them."""
        weights = self.in_features * self.out_features
        stats = self.records.size * 16
        padded_rows = self.records.shape[0] * RUN
        stats -= (padded_rows - self.out_features) * (self.stat_bits + self.bits) * self.records.shape[1]
        return (weights * self.bits + stats + 32 * self.n_outliers) / weights

    def __repr__(self):
        return (f"SpqrLinear({self.in_features} -> {self.out_features}, {self.bits}-bit, group {self.group_size}, "
                f"{self.stat_bits}-bit statistics, {self.n_outliers} outliers, {self.nbytes / 2**20:.2f} MiB)")
