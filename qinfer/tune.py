"""Tuning on request (`qinfer tune`, qinfer/cli/tune.py): search the kernel parameters again.

    shapes = shapes_to_tune(model_path_or_None, bits=[4])
    path, used = tune(shapes, budget=60, threads=2, progress=lambda r: print(row(r)))

The shapes are a model's quantized layers (a float model's linear maps at
each bit width asked for, group 128), else DEFAULT_SHAPES: LLaMA-7B's and
SmolLM2-135M's. The results replace those shapes' entries in this CPU's
cache (qinfer/tuning/cache.py), which Engines then use.
"""
from . import kernels
from .errors import QinferError
from .tuning import cache, search, table
from .tuning.space import LayerShape

# (out_features, in_features, group_size)
DEFAULT_SHAPES = [(4096, 4096, 128), (11008, 4096, 128), (4096, 11008, 128),
                  (576, 576, 32), (1536, 576, 32), (576, 1536, 32)]
FLOAT_GROUP = 128


def model_shapes(path, bits):
    """The distinct quantized layer shapes of a model file (float maps at each of `bits`)."""
    from .readers import open_model
    from .readers.source import is_quantized

    source = open_model(path)
    packed = [t for t in source.tensors.values() if is_quantized(t)]     # SpQR layers run the same dense kernels
    if packed:
        shapes = [LayerShape(t.bits, t.shape[0], t.shape[1], t.group_size) for t in packed]
        return [s for s in dict.fromkeys(shapes) if s.bits in bits]
    linear = [name for name in source.tensors if name.endswith("_proj.weight")]
    dims = dict.fromkeys(tuple(source.float_tensor(name).shape) for name in linear)
    return [LayerShape(b, out_f, in_f, FLOAT_GROUP) for b in bits for out_f, in_f in dims
            if in_f % FLOAT_GROUP == 0]


def _fmt_us(pair, scale, unit):
    if not pair:
        return "-"
    return f"{pair[0] * scale:.1f} -> {pair[1] * scale:.1f} {unit}"


def _speedup(pair):
    return f"{pair[0] / pair[1]:.2f}x" if pair and pair[1] > 0 else "-"


HEADER = (f"{'bits':>4}  {'out x in, group':<20} {'model nv/mb/nb/tb':<18} {'tuned nv/mb/nb/tb':<18} "
          f"{'qgemv per call':<22} {'qgemm per call':<22} {'speedup v/m':<12} status")


def row(result):
    r = result
    return (f"{r.shape.bits:>4}  {str(r.shape):<20} {str(r.model):<18} {str(r.params):<18} "
            f"{_fmt_us(r.gemv_seconds, 1e6, 'us'):<22} {_fmt_us(r.gemm_seconds, 1e3, 'ms'):<22} "
            f"{_speedup(r.gemv_seconds) + ' ' + _speedup(r.gemm_seconds):<12} {r.status}")


def tuned_summary():
    """Lines for `qinfer info`: the cached parameters of this CPU, if any."""
    try:
        layers = table.entries()
    except Exception as exc:     # info must print even when the cache is odd
        return [f"Tuned kernel parameters: unavailable ({exc})"]
    if not layers:
        return ["Tuned kernel parameters: none yet (an Engine tunes on first use; or run `qinfer tune`)"]
    state = "" if table.enabled() else " (not used: QINFER_TUNE=0)"
    lines = [f"Tuned kernel parameters{state}, from {cache.cache_path()}:",
             f"  {'width':<6} {'out x in, group':<20} {'nv/mb/nb/tb':<16} status"]
    for shape in sorted(layers, key=lambda s: (s.bits, s.out_features, s.in_features, s.group_size)):
        params, entry = layers[shape]
        lines.append(f"  {str(shape.bits) + '-bit':<6} {str(shape):<20} {str(params):<16} {entry.get('status', '?')}")
    return lines


def require_avx2():
    if kernels.active_path() != "avx2":
        raise QinferError("tuning measures the AVX2 kernels, and this run uses the scalar path")


def shapes_to_tune(model, bits):
    """The layer shapes of `model` (a path) at `bits`, or DEFAULT_SHAPES at each of them (model None)."""
    if model is None:
        return [LayerShape(b, o, i, g) for b in bits for o, i, g in DEFAULT_SHAPES]
    shapes = model_shapes(model, bits)
    if not shapes:
        raise QinferError(f"{model}: no quantized layers of {','.join(map(str, bits))} bits to tune")
    return shapes


def tune(shapes, budget, threads, progress=None):
    """Search `shapes` within `budget` seconds (progress(result) after each), store the results in
    this CPU's cache; returns (the cache's path, whether Engines use it: not with QINFER_TUNE=0)."""
    require_avx2()
    results = search.search(shapes, budget, threads, progress=progress)
    path = cache.save(table.update(results), threads)
    return path, table.enabled()
