"""`qinfer tune`: run the kernel parameter search again and show what it chose.

    qinfer tune [--model PATH] [--budget SECONDS] [--bits 2,3,4,8] [--threads N]

The shapes are the model's quantized layers with --model (a float model's
linear maps at each of --bits, group 128), else DEFAULT_SHAPES: LLaMA-7B's
and SmolLM2-135M's. The results replace those shapes' entries in this CPU's
cache (qinfer/tuning/cache.py), which Engines then use.
"""
import argparse
import sys
import time

from . import kernels
from .errors import QinferError
from .packing import BITWIDTHS
from .tuning import cache, measure, search, table
from .tuning.space import LayerShape

# (out_features, in_features, group_size)
DEFAULT_SHAPES = [(4096, 4096, 128), (11008, 4096, 128), (4096, 11008, 128),
                  (576, 576, 32), (1536, 576, 32), (576, 1536, 32)]
FLOAT_GROUP = 128


def model_shapes(path, bits):
    """The distinct quantized layer shapes of a model file (float maps at each of `bits`)."""
    from .readers import open_model
    from .readers.source import PackedTensor

    source = open_model(path)
    packed = [t for t in source.tensors.values() if isinstance(t, PackedTensor)]
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


def cmd_tune(args):
    if kernels.active_path() != "avx2":
        raise QinferError("tuning measures the AVX2 kernels, and this run uses the scalar path")
    bits = args.bits
    if args.model is not None:
        shapes = model_shapes(args.model, bits)
        if not shapes:
            raise QinferError(f"{args.model}: no quantized layers of {','.join(map(str, bits))} bits to tune")
    else:
        shapes = [LayerShape(b, o, i, g) for b in bits for o, i, g in DEFAULT_SHAPES]
    threads = kernels.resolve_threads(args.threads)
    print(f"qinfer tune: {len(shapes)} layer shapes, budget {args.budget:g} s, {threads} thread(s); "
          f"qgemm timed on {measure.GEMM_ROWS} rows", file=sys.stderr)
    print(HEADER)
    start = time.perf_counter()
    results = search.search(shapes, args.budget, threads, progress=lambda r: print(row(r), flush=True))
    stored = table.update(results)
    path = cache.save(stored, threads)
    print(f"{time.perf_counter() - start:.1f} s; saved to {path}"
          + ("" if table.enabled() else " (QINFER_TUNE=0: Engines will not use it)"))


def _bits_list(text):
    try:
        values = sorted({int(b) for b in text.split(",") if b.strip()})
    except ValueError:
        values = []
    if not values or any(b not in BITWIDTHS for b in values):
        raise argparse.ArgumentTypeError(f"expected bitwidths from {BITWIDTHS} separated by commas, got {text!r}")
    return values


def _seconds(text):
    try:
        value = float(text)
    except ValueError:
        value = 0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def add_tune_parser(sub, positive_int):
    t = sub.add_parser("tune", help="measure the fastest kernel parameters for this CPU (cached)",
                       description="Search the qgemv tile count and the qgemm block parameters per layer "
                                   "shape within a time budget, print before/after, and save the results "
                                   "to this CPU's tuning cache.")
    t.add_argument("--model", metavar="PATH", default=None,
                   help="tune this model's layer shapes (default: LLaMA-7B's and SmolLM2-135M's)")
    t.add_argument("--budget", type=_seconds, default=60.0, metavar="SECONDS",
                   help="time for the whole search (default 60)")
    t.add_argument("--bits", type=_bits_list, default=list(BITWIDTHS), metavar="2,3,4,8",
                   help="bitwidths to tune (default: all)")
    t.add_argument("--threads", type=positive_int, default=None, help="threads (default: all cores)")
    t.set_defaults(func=cmd_tune)
