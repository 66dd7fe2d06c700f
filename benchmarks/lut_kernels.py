"""The lookup-table kernels (pyx/lut.h) against qinfer's dense kernels, one row (decode).

    python benchmarks/lut_kernels.py [--threads 1,2] [--bits 2,3,4] [--shapes 4096x4096,11008x4096,4096x11008]
                                     [--groups 128] [--rounds 3]

For each shape, bitwidth and group size it builds enough random layers that together
they exceed the last-level cache several times (weights come from memory, as in a
decode step) and times one-row calls cycling through them, alternating the kernels
in rounds and keeping each one's best:
  dense float   the default kernel of that bitwidth (float activations)
  dense int8    the same layers with int8 activations (the speed mode), where the
                bitwidth has that kernel here
  lut           the same weights as a LutLinear (uniform kind), tables rounded to int8
  bcq           a binary-coding layer of the same bits and group (random planes): the
                per-plane multipliers' extra work
and prints microseconds a call, GB/s of the bytes each layer holds, and the LUT's
speed-up over dense float and dense int8. The LUT's error against the float product
of the same weights is printed as well (max |y - y_ref| / max |y_ref|).
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qinfer  # noqa: E402
from qinfer import kernels  # noqa: E402
from qinfer.lut_linear import LutLinear  # noqa: E402
from qinfer.quant.bcq import BcqResult  # noqa: E402
from common import ReadProbe  # noqa: E402
from kernels import activations, random_layer, time_cycling  # noqa: E402

LLC_MULTIPLE = 3


def random_bcq(rng, out_f, in_f, bits, group):
    planes = np.where(rng.random((bits, out_f, in_f)) < 0.5, 1, -1).astype(np.int8)
    groups = in_f // group
    alphas = rng.uniform(0.001, 0.01, size=(groups, out_f, bits)).astype(np.float32)
    offsets = rng.uniform(-0.01, 0.01, size=(groups, out_f)).astype(np.float32)
    return LutLinear.from_bcq(BcqResult(bits, group, planes, alphas, offsets))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--bits", default="2,3,4")
    parser.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008")
    parser.add_argument("--groups", default="128")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    threads_list = [int(t) for t in args.threads.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    llc = kernels.machine()["l3_bytes"]
    rng = np.random.default_rng(0)
    print(f"qinfer {qinfer.__version__} lookup-table kernels on {kernels.machine()['cpu_model']}, "
          f"path {kernels.active_path()}, LLC {llc >> 20} MiB; best of {args.rounds} alternating rounds")
    probe = ReadProbe()
    for t in threads_list:
        print(f"streaming read, {t} thread(s): {probe.gbs(t):.1f} GB/s")
    print(f"{'out x in':>12} {'bits':>4} {'group':>5} {'thr':>3} {'kernel':>11} {'us/call':>8} {'GB/s':>6} "
          f"{'lut vs it':>9}")
    for shape in shapes:
        for bits in (int(b) for b in args.bits.split(",")):
            for group in (int(g) for g in args.groups.split(",")):
                first = random_layer(rng, *shape, bits, group, "float16")
                count = max(2, -(-LLC_MULTIPLE * llc // first.nbytes))
                dense = [first] + [random_layer(rng, *shape, bits, group, "float16") for _ in range(count - 1)]
                luts = [LutLinear.from_quantized(d) for d in dense]
                bcqs = [random_bcq(rng, *shape, bits, group if group > 0 else shape[1]) for _ in range(count)]
                x = rng.standard_normal(shape[1]).astype(np.float32)
                ref = dense[0].dequantize() @ x
                err = np.abs(luts[0](x) - ref).max() / np.abs(ref).max()
                kinds = {"dense float": (dense, "float"), "lut": (luts, "float"), "bcq": (bcqs, "float")}
                if dense[0]._matrix.has_int8(kernels.active_path() == "avx2"):
                    kinds["dense int8"] = (dense, "int8")
                for t in threads_list:
                    best = {k: [] for k in kinds}
                    for _ in range(args.rounds):
                        for name, (layers, mode) in kinds.items():
                            with activations(mode):
                                best[name].append(time_cycling(layers, x, t, min_seconds=0.5))
                    sec = {k: min(v) for k, v in best.items()}
                    for name, (layers, _) in kinds.items():
                        ratio = sec[name] / sec["lut"]
                        print(f"{shape[0]:>5}x{shape[1]:<6} {bits:>4} {group if group > 0 else 'full':>5} {t:>3} "
                              f"{name:>11} {sec[name] * 1e6:>8.1f} {layers[0].nbytes / sec[name] / 1e9:>6.1f} "
                              f"{ratio:>8.2f}x")
                print(f"{'':>12} lut error against the float product: {err:.4f} of max |y|")
                del dense, luts, bcqs


if __name__ == "__main__":
    main()
