"""`qinfer sweep GRID.toml`: every configuration of a grid file quantized, scored and timed, as Ray
tasks (qinfer.sweep); the table goes to --out, the rows are cached for the next run."""
import json
import os
import sys

from .options import positive_int


def default_cache():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "qinfer", "sweep")


def add_parser(sub):
    p = sub.add_parser("sweep", help="quantize, score and time every configuration of a grid file, as Ray tasks",
                       description="Run a grid of quantization settings (a TOML file: [sweep] settings, [[grid]] "
                                   "products of lists, [[config]] single configurations; docs/scaling.md) as one "
                                   "Ray task per configuration, on a local Ray instance or the cluster at "
                                   "--address, and write the table of perplexity, size and decode speed. "
                                   "Results are cached per configuration: an interrupted sweep resumes.")
    p.add_argument("grid", metavar="GRID", help="the grid file (TOML)")
    p.add_argument("--out", metavar="FILE", default="sweep-results.md",
                   help="the markdown table to write (default sweep-results.md); the rows also go to FILE's "
                        "name with .json")
    p.add_argument("--address", metavar="ADDR", default=None,
                   help="join the Ray cluster at ADDR (HOST:PORT of its head, ray://HOST:PORT, or auto); "
                        "default: start a local Ray instance for the run")
    p.add_argument("--serial", action="store_true", help="run every configuration in this process, without Ray")
    p.add_argument("--cache", metavar="DIR", default=default_cache(),
                   help=f"checkpoints and cached results (default {default_cache()}; on a cluster, a path every "
                        f"node can write, or each node keeps its own checkpoints)")
    p.add_argument("--fresh", action="store_true", help="measure every configuration again (checkpoints are reused)")
    p.add_argument("--max-retries", type=int, default=3, metavar="N",
                   help="times Ray retries a task whose worker died (default 3)")
    p.add_argument("--ship-limit", type=positive_int, default=512, metavar="MIB",
                   help="the model and calibration text go to nodes that lack them through Ray's object store "
                        "when at most this many MiB (default 512); larger ones must be on a shared path")
    return p


def run(args):
    from ..errors import QinferError
    from ..sweep import load_grid, run_sweep
    from ..sweep.table import markdown, write_atomic

    if args.max_retries < 0:
        raise QinferError(f"--max-retries must be >= 0, got {args.max_retries}")
    sweep = load_grid(args.grid)
    result = run_sweep(sweep, os.path.expanduser(args.cache), address=args.address, serial=args.serial,
                       max_retries=args.max_retries, ship_limit=args.ship_limit * 2 ** 20, fresh=args.fresh)
    write_atomic(args.out, markdown(result, sweep))
    stem = os.path.splitext(args.out)[0]
    write_atomic(stem + ".json", json.dumps(result.rows, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out} and {stem}.json ({len(result.rows)} configurations, {result.failed} failed)",
          file=sys.stderr)
    return 1 if result.failed else 0
