"""Helpers shared by the benchmark scripts (not part of the installed package)."""
import time

import numpy as np

from qinfer import _runtime, kernels


def aligned_buffer(nbytes, align=64):
    raw = np.empty(nbytes + align, dtype=np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start:start + nbytes]


def read_bandwidth(threads, nbytes=1 << 30, repeats=5):
    """Best-of-`repeats` streaming read over a buffer far larger than the caches, in GB/s."""
    buf = aligned_buffer(nbytes).view(np.uint64)
    buf[:] = 1   # touch every page so the reads measure memory, not page faults
    avx2 = kernels.cpu_has_avx2()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        _runtime.stream_read(buf, threads, avx2)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def best_time(fn, min_seconds=0.5, min_calls=3):
    """Median seconds per call of fn() over a run of at least min_seconds."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))
