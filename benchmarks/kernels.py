"""qgemv/qgemm throughput against the machine's memory bandwidth.

    python benchmarks/kernels.py [--threads 1,2] [--quick] [--only qgemv|qgemm] [--bits 2,3,4,8]

For each shape (out x in) and bitwidth it builds enough distinct layers that
together they exceed the last-level cache several times, then times qgemv
calls cycling through them, so the weights come from memory as in a real
model. Effective bandwidth = packed bytes (words + scales + zeros) per call
/ time per call, set against a streaming read measured just before that
row's kernel (read GB/s: on a shared or virtual machine what two threads get
changes over minutes); both are the best of repeated passes (the best pass
is the one least disturbed, for the read and the kernel alike).
Each qgemv is timed with float activations (act float: the default kernel, which
for 2/4 bits multiplies in integers, x cut into three bytes of a 23-bit code per
block of 32 rows; act fma: the same layers with QINFER_FLOAT_LIMBS=0's float
multiply-adds) and, for 2/4/8 bits, again with int8 activations (act int8; "vs
float" is the speed-up over the float row of the same layers, same run), for 2/3/4 bits on the lookup-table
kernels too (act lut: the same weights as LutLinear layers, their activations rounded into int8 tables;
benchmarks/lut_kernels.py has more of them), and with the layers' scales and zeros held in
float16 (as checkpoints and quantize-on-load give them) and in float32. Last, qgemm with 64 rows against 64 separate qgemv
calls at 4 bits, with float activations (act float: on AMX tiles where the CPU has them, see
pyx/amx_gemm.h; act fma: QINFER_AMX=0's AVX multiply-adds) and with int8 activations, and
qgemm's multiply-add rate against what numpy's sgemm (OpenBLAS) reaches on the same cores in the same run: the
ceiling of float32 multiply-add instructions, which AMX and the int8 kernels' integer multiply-adds get past.
"""
import argparse
import contextlib
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qinfer  # noqa: E402
from qinfer import kernels  # noqa: E402
from common import ReadProbe, best_time, sgemm_gmacs  # noqa: E402
from qinfer.lut_linear import LutLinear  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]   # (out_features, in_features)
BITS = (2, 3, 4, 8)
GROUPS = (128, -1)
LLC_MULTIPLE = 3


SCALE_DTYPES = ("float16", "float32")


def random_layer(rng, out_features, in_features, bits, group_size, scale_dtype):
    """A layer with random codes: the kernels' speed does not depend on the values.
    The scales are exact in float16, held as scale_dtype says."""
    rows = in_features * bits // 32
    qweight = rng.integers(-2**31, 2**31, size=(rows, out_features), dtype=np.int64).astype(np.int32)
    groups = 1 if group_size == -1 else in_features // group_size
    scales = rng.uniform(0.001, 0.01, size=(groups, out_features)).astype(np.float16).astype(np.float32)
    zeros = np.full((groups, out_features), 2 ** (bits - 1), dtype=np.float32)
    return qinfer.QuantizedLinear.from_packed(qweight, scales, zeros, bits, group_size, scale_dtype=scale_dtype)


def layer_set(rng, shape, bits, group_size, llc_bytes, scale_dtype):
    first = random_layer(rng, *shape, bits, group_size, scale_dtype)
    count = max(2, -(-LLC_MULTIPLE * llc_bytes // first.nbytes))
    return [first] + [random_layer(rng, *shape, bits, group_size, scale_dtype) for _ in range(count - 1)]


def time_cycling(layers, x, threads, min_seconds=1.0):
    """Seconds per qgemv while cycling through the layers: the best pass over all of them,
    the statistic read_bandwidth reports, so the "% read BW" column sets like against like
    (on a machine shared with other work both vary from one pass to the next)."""
    state = {"i": 0}

    def call():
        layers[state["i"] % len(layers)](x, threads=threads)
        state["i"] += 1

    return best_time(lambda: [call() for _ in range(len(layers))], min_seconds=min_seconds,
                     statistic=min) / len(layers)


@contextlib.contextmanager
def activations(mode):
    """"float" (the default float kernels), "fma" (float, integer qgemv and AMX qgemm off) or "int8"."""
    with kernels.use_activations("int8" if mode == "int8" else "float"), \
            kernels.use_float_limbs(kernels.float_limbs() and mode != "fma"), \
            kernels.use_float_amx(kernels.float_amx() and mode != "fma"):
        yield


def qgemv_modes(layer):
    """The activation modes a qgemv of this layer can run in here ("lut": the lookup-table kernels)."""
    from qinfer.lut_linear import LUT_BITS

    limbs = kernels.float_limbs() and kernels.module(layer.bits).float_limbs() is not None
    return ("float",) + (("fma",) if limbs else ()) + (("int8",) if layer._matrix.has_int8() else ()) + \
        (("lut",) if layer.bits in LUT_BITS else ())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default=None, help="comma-separated thread counts (default: 1 and all cores)")
    parser.add_argument("--quick", action="store_true", help="4-bit only, 11008x4096 only")
    parser.add_argument("--only", choices=("qgemv", "qgemm"), help="time only the qgemv table or only the qgemm one")
    parser.add_argument("--bits", default=None, help="comma-separated bit widths of the qgemv table (default 2,3,4,8)")
    args = parser.parse_args()
    all_threads = os.cpu_count() or 1
    threads_list = ([int(t) for t in args.threads.split(",")] if args.threads
                    else sorted({1, all_threads}))
    shapes = [(11008, 4096)] if args.quick else SHAPES
    bits_list = (4,) if args.quick else tuple(int(b) for b in args.bits.split(",")) if args.bits else BITS
    llc = kernels.machine()["l3_bytes"]
    rng = np.random.default_rng(0)

    print(f"qinfer {qinfer.__version__} kernels on {kernels.machine()['cpu_model']}, "
          f"path {kernels.active_path()}, LLC {llc >> 20} MiB")
    probe = ReadProbe()
    for t in threads_list:
        print(f"streaming read, {t} thread(s): {probe.gbs(t):.1f} GB/s (again before each row below)")
    # The ceiling of any float32 kernel on this CPU: qgemm beyond it is impossible.
    sgemm = {t: sgemm_gmacs(t) for t in threads_list}
    for t in threads_list:
        print(f"float32 multiply-adds, numpy sgemm (OpenBLAS), {t} thread(s): {sgemm[t]:.1f} GMAC/s")
    print()
    if args.only != "qgemm":
        print(f"{'out x in':>12} {'bits':>4} {'group':>5} {'scales':>7} {'thr':>3} {'act':>5} {'layers':>6} "
              f"{'us/qgemv':>9} {'GB/s':>6} {'read GB/s':>9} {'% read BW':>9} {'GMAC/s':>7} {'vs float':>8}")
    for shape in shapes if args.only != "qgemm" else ():
        for bits in bits_list:
            for group in GROUPS:
                for scale_dtype in SCALE_DTYPES:
                    layers = layer_set(rng, shape, bits, group, llc, scale_dtype)
                    x = rng.standard_normal(shape[1]).astype(np.float32)
                    modes = qgemv_modes(layers[0])
                    luts = [LutLinear.from_quantized(layer) for layer in layers] if "lut" in modes else None
                    for t in threads_list:
                        float_sec = None
                        for mode in modes:
                            read = probe.gbs(t, repeats=3)
                            with activations("float" if mode == "lut" else mode):
                                sec = time_cycling(luts if mode == "lut" else layers, x, t)
                            float_sec = float_sec or sec
                            gbs = (luts if mode == "lut" else layers)[0].nbytes / sec / 1e9
                            print(f"{shape[0]:>5}x{shape[1]:<6} {bits:>4} {group if group > 0 else 'full':>5} "
                                  f"{scale_dtype[5:] + '-bit':>7} {t:>3} {mode:>5} {len(layers):>6} "
                                  f"{sec * 1e6:>9.1f} {gbs:>6.1f} {read:>9.1f} {100 * gbs / read:>8.0f}% "
                                  f"{shape[0] * shape[1] / sec / 1e9:>7.1f} {float_sec / sec:>7.2f}x")
                    del layers, luts

    print()
    print("qgemm (n = 64) against 64 qgemv calls, 4-bit, group 128, weights from memory; act: the activations "
          "of both (float: the default kernels; fma: both with float multiply-adds, QINFER_FLOAT_LIMBS=0 QINFER_AMX=0; "
          "int8: each row rounded as qgemv rounds it); 'vs float qgemv': against 64 float-activation qgemv:")
    print(f"{'out x in':>12} {'scales':>7} {'thr':>3} {'act':>5} {'64 x qgemv ms':>13} {'qgemm ms':>9} "
          f"{'speed-up':>8} {'vs float qgemv':>14} {'qgemm GMAC/s':>12} {'% sgemm':>7}")
    for shape in shapes if args.only != "qgemv" else ():
        for scale_dtype in SCALE_DTYPES:
            layers = layer_set(rng, shape, 4, 128, llc, scale_dtype)
            x = rng.standard_normal(shape[1]).astype(np.float32)
            X = rng.standard_normal((64, shape[1])).astype(np.float32)
            for t in threads_list:
                float_gemv = None
                for mode in ("float",) + (("fma",) if kernels.float_amx() else ()) + ("int8",):
                    with activations(mode):
                        gemv = time_cycling(layers, x, t) * 64
                        gemm = time_cycling(layers, X, t)
                    float_gemv = float_gemv or gemv
                    gmacs = 64 * shape[0] * shape[1] / gemm / 1e9
                    print(f"{shape[0]:>5}x{shape[1]:<6} {scale_dtype[5:] + '-bit':>7} {t:>3} {mode:>5} "
                          f"{gemv * 1e3:>13.2f} {gemm * 1e3:>9.2f} {gemv / gemm:>7.2f}x {float_gemv / gemm:>13.2f}x "
                          f"{gmacs:>12.1f} {100 * gmacs / sgemm[t]:>6.0f}%")
            del layers


if __name__ == "__main__":
    main()
