"""The run-time kernel parameters of one layer and the values valid for it.

The AVX2 kernels read four parameters per layer at run time (pyx/qmatrix.h):

    nv  qgemv: tiles walked side by side (a micro-kernel exists for 1..nv_max,
        the most the 16 vector registers hold)
    mb  qgemm: input rows per row block (whole packing units and groups,
        dividing in_features)
    nb  qgemm: activation rows per pass over the weights
    tb  qgemm: output columns per column block (whole tiles of tu columns)

The performance model's values (kernels.params, fitted to the layer's shape)
are the defaults; the tuner measures the candidates around them.
"""
import math
from dataclasses import asdict, dataclass, replace

from .. import kernels, packing

MAX_MB = 1024          # the performance model's bound: a float tile of mb x tu stays in L1/L2
MB_STEP = 128          # mb candidates are fitted from 128, 256, ..., MAX_MB


@dataclass(frozen=True)
class LayerShape:
    """What the tuned parameters are keyed by: group_size -1 is a full column."""
    bits: int
    out_features: int
    in_features: int
    group_size: int

    @property
    def key(self):
        return f"b{self.bits}:{self.out_features}x{self.in_features}:g{self.group_size}"

    @classmethod
    def from_key(cls, key):
        bits, dims, group = key.split(":")
        out_f, in_f = dims.split("x")
        if not (bits.startswith("b") and group.startswith("g")):
            raise ValueError(f"not a layer shape key: {key!r}")
        return cls(int(bits[1:]), int(out_f), int(in_f), int(group[1:]))

    def __str__(self):
        group = "full" if self.group_size == -1 else str(self.group_size)
        return f"{self.out_features}x{self.in_features} g{group}"


@dataclass(frozen=True)
class LayerParams:
    nv: int
    mb: int
    nb: int
    tb: int

    def as_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        values = {name: d[name] for name in ("nv", "mb", "nb", "tb")}
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values.values()):
            raise ValueError(f"kernel parameters must be positive integers, got {values}")
        return cls(**values)

    def __str__(self):
        return f"{self.nv}/{self.mb}/{self.nb}/{self.tb}"


def row_block(in_features, unit, wanted):
    """The largest multiple of `unit` that divides in_features and is <= wanted (at least unit)."""
    best = unit
    for mb in range(unit, min(wanted, in_features) + 1, unit):
        if in_features % mb == 0:
            best = mb
    return best


def block_unit(shape):
    """mb steps by whole packing units and, with groups, whole groups."""
    _, values = packing.unit_shape(shape.bits)
    return values if shape.group_size == -1 else math.lcm(values, shape.group_size)


def model_params(shape):
    """The performance model's choice for this bitwidth, fitted to the layer's shape."""
    p = kernels.params(shape.bits)
    wanted_mb = p["mb"] if shape.group_size == -1 else max(p["mb"], shape.group_size)
    return LayerParams(nv=p["nv"], mb=row_block(shape.in_features, block_unit(shape), wanted_mb),
                       nb=p["nb"], tb=max(1, p["tb"] // p["tu"]) * p["tu"])


def segment_rows(shape):
    """Rows per Eq. 1 segment of a full-column layer: the model's mb, never tuned,
    so qgemv's arithmetic is the same whatever the tuner picks."""
    return model_params(shape).mb


def max_gemv_tiles(bits):
    p = kernels.params(bits)
    return max(p["nv"], p.get("nv_max", p["nv"]))


def fit(params, shape):
    """The nearest valid parameters for `shape` (a per-bitwidth fallback may come from another shape)."""
    tu = kernels.params(shape.bits)["tu"]
    return LayerParams(nv=min(max(1, params.nv), max_gemv_tiles(shape.bits)),
                       mb=row_block(shape.in_features, block_unit(shape), params.mb),
                       nb=max(1, params.nb), tb=max(tu, params.tb // tu * tu))


def _model_first(model_value, values):
    rest = sorted(set(values) - {model_value})
    return [model_value] + rest


def candidates(shape):
    """{name: values to try}, the model's value first. Bounded: a few per parameter."""
    p = kernels.params(shape.bits)
    model = model_params(shape)
    unit = block_unit(shape)
    mu, tu = p["mu"], p["tu"]
    wanted = range(MB_STEP, MAX_MB + 1, MB_STEP)
    mbs = {row_block(shape.in_features, unit, max(w, unit)) for w in wanted}
    nbs = {max(mu, round(model.nb * f / mu) * mu) for f in (0.25, 0.5, 1, 2)}
    tbs = {max(tu, round(model.tb * f / tu) * tu) for f in (0.5, 1, 2, 4)}
    return dict(nv=_model_first(model.nv, range(1, max_gemv_tiles(shape.bits) + 1)),
                mb=_model_first(model.mb, mbs), nb=_model_first(model.nb, nbs),
                tb=_model_first(model.tb, tbs))


def with_value(params, name, value):
    return replace(params, **{name: value})
