"""Helpers shared by the benchmark scripts (not part of the installed package)."""
import os
import subprocess
import sys
import time

import numpy as np

from qinfer import _runtime, kernels


def aligned_buffer(nbytes, align=64):
    raw = np.empty(nbytes + align, dtype=np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start:start + nbytes]


class ReadProbe:
    """A streaming read over one buffer far larger than the caches, kept for measuring
    again and again: on a shared or virtual machine the bandwidth two threads get
    changes over minutes (here 45-52 GB/s, at times 76), so a kernel is best set
    against a read measured next to it."""

    def __init__(self, nbytes=1 << 30):
        self.nbytes = nbytes
        self.buf = aligned_buffer(nbytes).view(np.uint64)
        self.buf[:] = 1   # touch every page so the reads measure memory, not page faults

    def gbs(self, threads, repeats=5):
        """Best-of-`repeats` read of the whole buffer with `threads` threads, in GB/s."""
        avx2 = kernels.cpu_has_avx2()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            _runtime.stream_read(self.buf, threads, avx2)
            best = min(best, time.perf_counter() - t0)
        return self.nbytes / best / 1e9


def read_bandwidth(threads, nbytes=1 << 30, repeats=5):
    """Best-of-`repeats` streaming read over a buffer far larger than the caches, in GB/s."""
    return ReadProbe(nbytes).gbs(threads, repeats)


def best_time(fn, min_seconds=0.5, min_calls=3, statistic=np.median):
    """Seconds per call of fn() over a run of at least min_seconds: the median of the
    calls, or another statistic of them (min: the best call, as read_bandwidth reports)."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(statistic(times))


_SGEMM_CHILD = """
import sys, time
import numpy as np
n = int(sys.argv[1])
a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
b = a.T.copy()
a @ b
best = float("inf")
for _ in range(5):
    t0 = time.perf_counter()
    a @ b
    best = min(best, time.perf_counter() - t0)
print(n ** 3 / best / 1e9)
"""


def sgemm_gmacs(threads, n=1536):
    """float32 multiply-adds per second (GMAC/s) numpy's BLAS (OpenBLAS sgemm) reaches
    with `threads` threads: what this CPU's FMA units give a well-tuned dense kernel.
    Run in a child process, as BLAS fixes its thread count when it loads."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", _SGEMM_CHILD, str(n)], env=env, capture_output=True,
                         text=True, check=True).stdout
    return float(out)
