"""`qinfer bench`: qinfer.bench's pp/tg tests on a model, printed as llama-bench's table or JSON."""
import json

from ..bench import DEFAULT_GEN, DEFAULT_PROMPT, DEFAULT_REPETITIONS
from .options import add_model_options, kv_cache_args, non_negative_int, positive_int


def add_parser(sub):
    # "resolve": the bench's -t/--threads (a list) replaces the model options' single --threads
    p = sub.add_parser("bench", conflict_handler="resolve",
                       help="prefill (pp) and decode (tg) tokens/s and peak memory, like llama-bench",
                       description="Prefill p random tokens (ppP) and decode n tokens one at a time (tgN), "
                                   "each from an empty cache, at each thread count: one warm-up run, then "
                                   "-r timed runs; prints tokens/s mean ± standard deviation and the "
                                   "process's peak resident memory. A length of 0 skips that test. The KV "
                                   "cache holds p + n tokens unless --ctx is given.")
    add_model_options(p)
    p.add_argument("--ctx", type=positive_int, default=None,
                   help="context length: KV cache size in tokens (default: p + n, as llama-bench)")
    p.add_argument("-p", "--n-prompt", type=int, default=DEFAULT_PROMPT, metavar="P",
                   help=f"prompt tokens of the prefill test (default {DEFAULT_PROMPT}; 0 skips it)")
    p.add_argument("-n", "--n-gen", type=int, default=DEFAULT_GEN, metavar="N",
                   help=f"tokens of the decode test (default {DEFAULT_GEN}; 0 skips it)")
    p.add_argument("-t", "--threads", default=None, metavar="LIST",
                   help="thread counts, comma separated, e.g. 1,2 (default: all cores)")
    p.add_argument("-r", "--repetitions", type=int, default=DEFAULT_REPETITIONS, metavar="R",
                   help=f"timed runs per test (default {DEFAULT_REPETITIONS})")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random token ids (default 0)")
    p.add_argument("--dequantize", action="store_true",
                   help="run a quantized model's weights as float32 (a float baseline)")
    p.add_argument("--activations", choices=("float", "int8"), default=None,
                   help="int8: decode with activations rounded to int8 per block of 32 inputs (see generate)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list, one object per (threads, test), with each run's seconds")
    return p


def run(args):
    from .. import kernels
    from ..bench import bench, check_counts, format_table, parse_threads, peak_rss_kib
    from ..engine import Engine, default_model_path
    from ..readers import open_model

    threads = parse_threads(args.threads if args.threads is not None else str(kernels.get_num_threads()))
    check_counts(args.n_prompt, args.n_gen, args.repetitions)
    path = args.model if args.model is not None else default_model_path()
    # Check the lengths against the model before sizing a KV cache for them.
    max_ctx = open_model(path).config.max_position_embeddings
    limit, what = (args.ctx, "--ctx") if args.ctx is not None else (max_ctx, "the model's context")
    check_counts(args.n_prompt, args.n_gen, args.repetitions, limit, what)
    ctx = args.ctx if args.ctx is not None else args.n_prompt + args.n_gen
    engine = Engine(path, threads=max(threads), ctx=ctx, quantize=args.quantize, group_size=args.group_size,
                    dequantize=args.dequantize, activations=args.activations, **kv_cache_args(args))
    results = bench(engine, args.n_prompt, args.n_gen, threads, args.repetitions, seed=args.seed)
    rss = peak_rss_kib()
    per_token = engine.model.transformer.kv_bytes_per_token
    if args.json:
        print(json.dumps([dict(r.to_dict(), peak_rss_kib=rss, ctx=engine.ctx, kv_cache=engine.model.kv_cache,
                               kv_bytes_per_token=per_token) for r in results], indent=1))
    else:
        print(format_table(results, rss, kv=(engine.model.kv_spec.describe(), per_token, engine.ctx)))
