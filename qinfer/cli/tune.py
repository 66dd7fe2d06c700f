"""`qinfer tune`: search the kernel parameters again (qinfer.tune) and print what it chose.

    qinfer tune [--model PATH] [--budget SECONDS] [--bits 2,3,4,8] [--threads N]
"""
import sys
import time

from ..packing import BITWIDTHS
from .options import add_threads_option, bit_widths, positive_seconds


def add_parser(sub):
    t = sub.add_parser("tune", help="measure the fastest kernel parameters for this CPU (cached)",
                       description="Search the qgemv tile count and the qgemm block parameters per layer "
                                   "shape within a time budget, print before/after, and save the results "
                                   "to this CPU's tuning cache.")
    t.add_argument("--model", metavar="PATH", default=None,
                   help="tune this model's layer shapes (default: LLaMA-7B's and SmolLM2-135M's)")
    t.add_argument("--budget", type=positive_seconds, default=60.0, metavar="SECONDS",
                   help="time for the whole search (default 60)")
    t.add_argument("--bits", type=bit_widths, default=list(BITWIDTHS), metavar="2,3,4,8",
                   help="bitwidths to tune (default: all)")
    add_threads_option(t)
    return t


def run(args):
    from .. import kernels
    from ..tune import HEADER, require_avx2, row, shapes_to_tune, tune
    from ..tuning.measure import GEMM_ROWS

    require_avx2()          # before reading --model: a scalar machine can tune nothing
    shapes = shapes_to_tune(args.model, args.bits)
    threads = kernels.resolve_threads(args.threads)
    print(f"qinfer tune: {len(shapes)} layer shapes, budget {args.budget:g} s, {threads} thread(s); "
          f"qgemm timed on {GEMM_ROWS} rows", file=sys.stderr)
    print(HEADER)
    start = time.perf_counter()
    path, used = tune(shapes, args.budget, threads, progress=lambda r: print(row(r), flush=True))
    print(f"{time.perf_counter() - start:.1f} s; saved to {path}"
          + ("" if used else " (QINFER_TUNE=0: Engines will not use it)"))
