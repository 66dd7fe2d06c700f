"""`qinfer perplexity`: qinfer.perplexity on a text file (or WikiText-2), one result line."""
import json
import os
import warnings

from .options import add_model_options, kv_cache_args

MAX_AUTO_CTX = 1 << 20                  # the KV cache when --ctx is absent: seqlen, at most this


def add_parser(sub):
    p = sub.add_parser("perplexity", help="perplexity of a model on a text (GPTQ's WikiText-2 protocol)",
                       description="Perplexity on a text file: its lines joined with a blank line, "
                                   "tokenized once, cut into non-overlapping windows of --seqlen tokens, "
                                   "each scored from an empty cache. Progress on stderr; the last line "
                                   "is 'ppl: VALUE'.")
    add_model_options(p)
    p.add_argument("--data", metavar="FILE", required=True,
                   help="a UTF-8 text file (e.g. wikitext-2-raw/wiki.test.raw), or 'wikitext2' to load "
                        "the test split with the Hugging Face datasets package")
    p.add_argument("--seqlen", type=int, default=2048, metavar="N", help="tokens per window (default 2048)")
    p.add_argument("--max-chunks", type=int, default=None, metavar="N",
                   help="score only the first N windows (default: all)")
    p.add_argument("--dequantize", action="store_true",
                   help="run a quantized model's weights as float32 (a float baseline)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (ppl, nll, tokens, windows, seconds, seqlen, model)")
    return p


def run(args):
    from ..engine import Engine, QinferWarning
    from ..perplexity import check_options, load_text, perplexity

    seqlen, max_chunks = check_options(args.seqlen, args.max_chunks)
    text = load_text(args.data)
    ctx = args.ctx if args.ctx is not None else min(seqlen, MAX_AUTO_CTX)
    with warnings.catch_warnings():
        if args.ctx is None:      # a cache sized from --seqlen: a seqlen too long is the error below
            warnings.simplefilter("ignore", QinferWarning)
        engine = Engine(args.model, threads=args.threads, ctx=ctx, quantize=args.quantize,
                        group_size=args.group_size, dequantize=args.dequantize, **kv_cache_args(args))
    result = perplexity(engine, text, seqlen=seqlen, max_chunks=max_chunks, threads=args.threads)
    if args.json:
        print(json.dumps(dict(result.to_dict(), model=engine.model_path, data=os.fspath(args.data))))
    else:
        print(f"{result.windows} windows of {seqlen} tokens ({result.text_tokens} in the text), "
              f"{result.tokens} scored, mean NLL {result.nll:.6f}, "
              f"{result.seconds:.1f} s ({result.tokens_per_second:.1f} tokens/s)")
        print(f"ppl: {result.ppl:.4f}")
