"""SpQR layers against the dense kernel they run: the cost of reading compressed statistics.

    python benchmarks/spqr_kernels.py [--shapes 1536x576,576x1536,4096x4096,4096x11008]
        [--rows 1,64] [--outliers 0.01] [--threads 2] [--rounds 5]

For each out x in shape: a 3-bit group-16 SpqrLinear (3-bit scale codes in runs of 16
rows, integer zeros, `--outliers` of the weights as float16 outliers; random codes) and
the QuantizedLinear of the same codes with float16 scales and zeros, which is what
the SpQR kernels run after widening the statistics (pyx/spqr.h). Each round times
both, alternating, for every row count; printed: the best microseconds per call of
each and their ratio. Not a target (issue 38 sets none on SpQR's speed): the price
of 0.5 bits of statistics per weight instead of 2.
"""
import argparse
import time

import numpy as np

from qinfer import packing
from qinfer.linear import QuantizedLinear
from qinfer.spqr_linear import SpqrLinear, pack_records


def layers(out_f, in_f, outliers, rng, bits=3, group=16):
    """(SpqrLinear, QuantizedLinear) of the same random codes and statistics."""
    groups, runs = in_f // group, -(-out_f // 16)
    codes = rng.integers(0, 2 ** bits, (out_f, in_f))
    scale_codes = rng.integers(0, 8, (groups, out_f))
    zeros = rng.integers(0, 2 ** bits, (groups, out_f))
    s2 = np.full((groups, runs), 2.0 ** -7, np.float32)       # scale codes x s2: exact in float16
    z2 = np.zeros((groups, runs), np.float32)
    where = rng.random((out_f, in_f)) < outliers
    rows = np.concatenate([[0], np.cumsum(where.sum(axis=1))]).astype(np.int32)
    cols = np.nonzero(where)[1].astype(np.uint16)
    vals = rng.standard_normal(len(cols)).astype(np.float16)
    qweight = packing.pack(codes.T, bits)
    spqr = SpqrLinear(qweight, pack_records(scale_codes, zeros, s2, z2, 3, bits), rows, cols, vals, bits, group, 3,
                      in_f, out_f)
    run = np.arange(out_f) // 16
    dense = QuantizedLinear.from_packed(qweight, (s2[:, run] * scale_codes).astype(np.float32),
                                        zeros.astype(np.float32), bits, group)
    return spqr, dense


def per_call(layer, x, threads, seconds=0.3):
    """Microseconds per call, calls repeated for about `seconds`."""
    layer(x, threads=threads)
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        layer(x, threads=threads)
        calls += 1
    return (time.perf_counter() - t0) / calls * 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="1536x576,576x1536,4096x4096,4096x11008", help="out x in, comma-separated")
    p.add_argument("--rows", default="1,64", help="rows per call, comma-separated")
    p.add_argument("--outliers", type=float, default=0.01, help="fraction of the weights kept as outliers")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    print(f"3-bit group 16, {args.outliers:.1%} outliers, {args.threads} threads; best of {args.rounds} "
          f"alternating rounds, microseconds per call")
    print(f"{'shape':>12} {'rows':>5} {'spqr':>10} {'dense f16':>10} {'ratio':>6}")
    for shape in args.shapes.split(","):
        out_f, in_f = (int(v) for v in shape.lower().split("x"))
        spqr, dense = layers(out_f, in_f, args.outliers, rng)
        assert dense.scale_dtype == "float16"
        for n in (int(v) for v in args.rows.split(",")):
            x = rng.standard_normal((n, in_f)).astype(np.float32)
            best = {"spqr": float("inf"), "dense": float("inf")}
            for _ in range(args.rounds):
                for name, layer in (("spqr", spqr), ("dense", dense)):
                    best[name] = min(best[name], per_call(layer, x, args.threads))
            print(f"{shape:>12} {n:>5} {best['spqr']:>10.1f} {best['dense']:>10.1f} "
                  f"{best['spqr'] / best['dense']:>6.2f}")


if __name__ == "__main__":
    main()
