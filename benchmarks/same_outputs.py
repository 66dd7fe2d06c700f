"""Record every output a refactor must not change, or compare against a record.

    python benchmarks/same_outputs.py record FILE.npz
    python benchmarks/same_outputs.py compare FILE.npz     (exit 1 on any difference)

What is recorded, on the default SmolLM2-135M-Instruct (Q4_1 GGUF):
  - greedy text (token ids) for a few prompts, 24 new tokens each;
  - the logits of a fixed 40-token sequence at every position (a prefill:
    the qgemm) and of the same sequence decoded one token at a time (the
    qgemv), with float and int8 activations, at 1 and 2 threads;
  - the same on the scalar kernel path, and with AVX-512 held to AVX2;
  - the summed NLL of 2 WikiText-2 windows of 512 tokens.
and, for the 2/3/4/5/6/8-bit kernel families, the logits of the committed
tiny K-quant GGUFs (tests/data/tiny-llama.*.gguf).

A comparison is exact (bit for bit): a reshaping of the code keeps the same
operations in the same order. Records depend on the CPU's instruction sets,
so compare on the machine that recorded.
"""
import argparse
import glob
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,")
NEW_TOKENS = 24
SEQUENCE = [1, 504, 3458, 282, 4649, 314, 2569, 30, 378, 1462, 1018, 1226, 20, 2391, 2066, 940,
            28, 1543, 1337, 4024, 355, 46, 254, 7330, 216, 17, 18, 19, 1120, 6655, 30, 2,
            11, 744, 5345, 44, 29, 1002, 8193, 99]
WINDOW = 512
WIKITEXT = os.path.join(ROOT, os.pardir, "shared", "data", "wikitext-2-raw", "wiki.test.raw")


def _logits_both_ways(engine, threads):
    """(prefill logits [n, vocab], decode logits [n, vocab]) of SEQUENCE."""
    prefill = engine.logits(SEQUENCE, threads=threads)
    engine.reset()
    decode = np.stack([engine.decode_step(t, threads=threads).copy() for t in SEQUENCE])
    engine.reset()
    return prefill, decode


def collect():
    import qinfer
    from qinfer import kernels
    from qinfer.perplexity import load_text, split_windows, tokenize, window_nll

    out = {}
    engine = qinfer.Engine(threads=2, ctx=WINDOW + 64)
    for i, prompt in enumerate(PROMPTS):
        text = engine.generate(prompt, max_new_tokens=NEW_TOKENS)
        out[f"greedy/{i}/ids"] = np.asarray(engine.last_stats.token_ids, dtype=np.int64)
        out[f"greedy/{i}/text"] = np.asarray(text)
    for activations in ("float", "int8"):
        with kernels.use_activations(activations):
            for threads in (1, 2):
                pre, dec = _logits_both_ways(engine, threads)
                out[f"logits/{activations}/t{threads}/prefill"] = pre
                out[f"logits/{activations}/t{threads}/decode"] = dec
    with kernels.use_path("scalar"):
        pre, dec = _logits_both_ways(engine, 2)
        out["logits/scalar/prefill"], out["logits/scalar/decode"] = pre, dec
    with kernels.use_float_avx512(False):
        pre, dec = _logits_both_ways(engine, 2)
        out["logits/avx2/prefill"], out["logits/avx2/decode"] = pre, dec
    tokens = tokenize(engine, load_text(WIKITEXT))
    for i, window in enumerate(split_windows(tokens, WINDOW, 2)):
        out[f"nll/window{i}"] = np.float64(window_nll(engine, window, 0, 2))
    engine.reset()
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "data", "tiny-llama.*.gguf"))):
        tiny = qinfer.Engine(path, threads=2)
        name = os.path.basename(path)
        ids = [i % tiny.config.vocab_size for i in SEQUENCE]
        out[f"tiny/{name}/prefill"] = tiny.logits(ids)
        tiny.reset()
        out[f"tiny/{name}/decode"] = np.stack([tiny.decode_step(t).copy() for t in ids])
        for activations in ("int8",):
            with kernels.use_activations(activations):
                tiny.reset()
                out[f"tiny/{name}/{activations}/decode"] = np.stack([tiny.decode_step(t).copy() for t in ids])
    return out


def compare(record, now):
    bad = 0
    for key in sorted(set(record) | set(now)):
        if key not in record or key not in now:
            print(f"{key}: only in the {'record' if key in record else 'new run'}")
            bad += 1
            continue
        a, b = np.asarray(record[key]), np.asarray(now[key])
        if a.shape != b.shape or a.dtype != b.dtype or not np.array_equal(a, b):
            diff = (np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))
                    if a.shape == b.shape else float("nan"))
            print(f"{key}: DIFFERS (shape {a.shape} vs {b.shape}, max |diff| {diff:.3g})")
            bad += 1
    print(f"{len(record)} outputs recorded, {len(now)} now: "
          f"{'all bit-identical' if not bad else f'{bad} differ'}")
    return bad


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("record", "compare"))
    parser.add_argument("file")
    args = parser.parse_args()
    now = collect()
    if args.action == "record":
        tmp = args.file + ".tmp.npz"
        np.savez(tmp, **now)
        os.replace(tmp, args.file)
        print(f"recorded {len(now)} outputs in {args.file}")
        return 0
    with np.load(args.file) as f:
        record = {k: f[k] for k in f.files}
    return 1 if compare(record, now) else 0


if __name__ == "__main__":
    sys.exit(main())
