"""Choose GPTQ's sink weight on held-out text, not on the windows the accuracy table scores.

    python benchmarks/gptq_sink.py [--bits 3] [--group-size 16] [--weights 1,16,64,256,1024]
                                   [--scored 4] [--validation 4] [--nsamples 2] [--threads 2]
                                   [--clip-search] [--act-order] [--mix PATTERN=BITS ...]

WikiText-2's test text is cut into windows of 2048 tokens, as benchmarks/accuracy.py cuts it:
windows 0..scored-1 are the ones docs/results.md scores (never looked at here), the next
`validation` windows are this script's validation set, and GPTQ calibrates on the tokens
after those (nsamples windows, seed 0). For each sink weight (quant/api.py: how many times
each calibration window's first token, SmolLM2's attention sink, counts in the Hessians) the
script quantizes SmolLM2-135M with GPTQ, prints the validation perplexity next to round to
nearest's with the same bits and groups, and names the weight with the lowest. Checkpoints
are cached under accuracy.py's cache folder (~/.cache/qinfer/accuracy).
"""
import argparse
import gc
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qinfer  # noqa: E402
from accuracy import (MIX_SUFFIX, SEQLEN, WIKITEXT, calibration_file, checkpoint_key,  # noqa: E402
                      default_cache, ensure_checkpoint, score)
from qinfer.perplexity import load_text, split_windows, tokenize  # noqa: E402


def float_list(text):
    return [float(v) for v in text.split(",") if v.strip()]


def log(message):
    print(f"[gptq_sink] {message}", file=sys.stderr, flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="the float source (default: SmolLM2-135M-Instruct's GGUF)")
    p.add_argument("--data", default=WIKITEXT, help=f"WikiText-2's wiki.test.raw (default {WIKITEXT})")
    p.add_argument("--bits", type=int, default=3, choices=(2, 3, 4, 8))
    p.add_argument("--group-size", type=int, default=16, choices=(16, 32, 64, 128, -1))
    p.add_argument("--weights", type=float_list, default=[1, 16, 64, 256, 1024],
                   help="sink weights to try (default 1,16,64,256,1024; 1 is plain GPTQ)")
    p.add_argument("--scored", type=int, default=4, help="windows the accuracy table scores, skipped (default 4)")
    p.add_argument("--validation", type=int, default=4, help="validation windows (default 4)")
    p.add_argument("--nsamples", type=int, default=2, help="GPTQ calibration windows (default 2)")
    p.add_argument("--clip-search", action="store_true",
                   help="quantize (round to nearest and GPTQ alike) with qinfer quantize --clip-search")
    p.add_argument("--act-order", action="store_true", help="GPTQ with act-order")
    p.add_argument("--mix", action="append", default=[], metavar="PATTERN=BITS[gGROUP]",
                   help="mixed precision: the layers PATTERN matches get other bits (qinfer quantize "
                        "--dynamic's syntax, e.g. '.*down_proj=4'); repeatable")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default=default_cache())
    args = p.parse_args()
    if args.scored < 0 or args.validation < 1 or args.nsamples < 1:
        p.error("--scored must be >= 0, --validation and --nsamples >= 1")
    if any(w < 1 for w in args.weights):
        p.error("sink weights must be >= 1")
    if not os.path.isfile(args.data):
        p.error(f"no data file {args.data}")

    from qinfer.engine import default_model_path
    model = os.path.abspath(args.model or default_model_path())
    text = load_text(args.data)
    engine = qinfer.Engine(model, dequantize=True, ctx=SEQLEN, threads=args.threads)
    tokens = tokenize(engine, text)
    total = len(tokens) // SEQLEN
    first, last = args.scored, args.scored + args.validation
    if last >= total:
        p.error(f"the text has {total} windows: too few for {args.scored} scored + {args.validation} validation "
                f"windows and calibration text after them")
    validation = split_windows(tokens, SEQLEN, last)[first:]
    tag = f"{os.path.splitext(os.path.basename(args.data))[0]}{os.path.getsize(args.data)}"
    calib, calib_note, _ = calibration_file(args.cache, text, tokens, engine, last, total, tag)
    log(f"validation: windows {first}..{last - 1}; calibration: {calib_note}")
    rows = [("float32", score(engine, validation, args.threads)["ppl"])]
    del engine
    gc.collect()

    group = "col" if args.group_size == -1 else f"g{args.group_size}"
    calib_id = f"{tag}-tail{last * SEQLEN}"
    for method, weight in [("rtn", 1.0)] + [("gptq", w) for w in args.weights]:
        name = "rtn" if method == "rtn" else f"gptq sink {weight:g}"
        method += MIX_SUFFIX if args.mix else ""
        log(name)
        args.sink_weight = weight
        out = os.path.join(args.cache, "checkpoints",
                           checkpoint_key(method, args.bits, args.group_size, args, calib_id))
        ensure_checkpoint(model, out, method, args.bits, args.group_size, args, calib)
        engine = qinfer.Engine(out, ctx=SEQLEN, threads=args.threads)
        rows.append((name, score(engine, validation, args.threads)["ppl"]))
        log(f"  validation ppl {rows[-1][1]:.4f}")
        del engine
        gc.collect()

    base = rows[0][1]
    print(f"SmolLM2-135M, {args.bits}-bit {group}{' mixed (' + ', '.join(args.mix) + ')' if args.mix else ''}, "
          f"GPTQ nsamples {args.nsamples}"
          f"{', clip search' if args.clip_search else ''}{', act-order' if args.act_order else ''}: "
          f"perplexity on validation "
          f"windows {first}..{last - 1} of {total} ({args.validation * (SEQLEN - 1):,} predicted tokens)")
    print(f"{'model':<18} {'ppl':>10} {'vs float':>9}")
    for name, ppl in rows:
        print(f"{name:<18} {ppl:>10.4f} {100 * (ppl / base - 1):>+8.2f}%")
    best = min(rows[2:], key=lambda r: r[1])
    print(f"lowest validation perplexity: {best[0]}")


if __name__ == "__main__":
    main()
