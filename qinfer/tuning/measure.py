"""Timing one layer shape's kernels under given parameters, on random weights.

The kernels' speed does not depend on the values, only on the shape, so the
layers are random codes. qgemv is timed as in decoding, with the weights
coming from memory: it cycles through copies of the layer that together
exceed the last-level cache. qgemm is timed as in a prompt, on GEMM_ROWS
activation rows; its weights are reused for every row and stay in cache, so
one layer suffices, cut to at most GEMM_MAX_OUT output columns: mb, nb and
tb shape the work of each tile (set by in_features), and fewer tiles keep the
measurement short. Each figure is the best of up to REPEATS samples.
"""
import time

import numpy as np

from .. import kernels
from ..linear import QuantizedLinear

GEMM_ROWS = 192             # a mid-sized prompt chunk: several row chunks of nb candidates
GEMM_MAX_OUT = 1024
REPEATS = 3
MIN_SAMPLE_SECONDS = 0.003  # shorter qgemm calls are repeated inside C so timer noise stays small
SAMPLE_SECONDS = 0.02       # qgemv: calls per sample
WARM_CALLS = 4
COLD_BYTES_MAX = 128 << 20  # memory the qgemv copies may take
COLD_COPIES_MAX = 2048


def random_layer(rng, shape, out_features=None):
    out_f = out_features or shape.out_features
    bits, in_f, group = shape.bits, shape.in_features, shape.group_size
    qweight = rng.integers(-2**31, 2**31, size=(in_f * bits // 32, out_f), dtype=np.int64).astype(np.int32)
    n_groups = 1 if group == -1 else in_f // group
    # float16-exact, as the layers of a checkpoint or of quantize-on-load are, so
    # the kernels read the scale bytes real layers have
    scales = rng.uniform(0.001, 0.01, size=(n_groups, out_f)).astype(np.float16).astype(np.float32)
    zeros = np.full((n_groups, out_f), 2 ** (bits - 1), dtype=np.float32)
    return QuantizedLinear.from_packed(qweight, scales, zeros, bits, group)


def _best_of(run, calls, deadline, clock):
    """Seconds per call: the fastest of up to REPEATS samples, fewer once past the deadline."""
    best = float("inf")
    for _ in range(REPEATS):
        t0 = clock()
        run()
        best = min(best, (clock() - t0) / calls)
        if clock() >= deadline:
            break
    return best


class GemvTimer:
    """qgemv with the weights streamed from memory, as each decoded token reads them.

    Successive calls walk on through the copies, so no call finds its weights
    in cache; a sample is as many calls as take about SAMPLE_SECONDS.
    """

    def __init__(self, shape, threads, rng, clock=time.perf_counter):
        first = random_layer(rng, shape)
        cold = 2 * kernels.machine().get("l3_bytes", 32 << 20)
        count = min(COLD_COPIES_MAX, max(2, -(-cold // first.nbytes)), max(2, COLD_BYTES_MAX // first.nbytes))
        self.layers = [first] + [first.copy() for _ in range(count - 1)]
        self.x = rng.standard_normal((1, shape.in_features)).astype(np.float32)
        self.out = np.empty((1, shape.out_features), np.float32)
        self.threads, self.clock = threads, clock
        self.next = 0

    def _calls(self, count, deadline):
        """Run `count` calls on through the copies (fewer past the deadline); returns the calls run."""
        done = 0
        while done < count:
            self.layers[self.next]._matrix.matmul(self.x, self.out, self.threads, True)
            self.next = (self.next + 1) % len(self.layers)
            done += 1
            if self.clock() >= deadline:
                break
        return done

    def __call__(self, params, deadline):
        for layer in self.layers:
            layer.set_kernel_params(params)
        t0 = self.clock()
        warm = self._calls(WARM_CALLS, deadline)      # also an estimate of one call
        once = max((self.clock() - t0) / warm, 1e-7)
        count = max(1, int(SAMPLE_SECONDS / once))
        best = float("inf")
        for _ in range(REPEATS):
            t0 = self.clock()
            done = self._calls(count, deadline)
            best = min(best, (self.clock() - t0) / done)
            if self.clock() >= deadline:
                break
        return best


class GemmTimer:
    """qgemm on GEMM_ROWS rows, weights in cache."""

    def __init__(self, shape, threads, rng, clock=time.perf_counter):
        out_f = min(shape.out_features, GEMM_MAX_OUT)
        self.layer = random_layer(rng, shape, out_f)
        self.x = rng.standard_normal((GEMM_ROWS, shape.in_features)).astype(np.float32)
        self.out = np.empty((GEMM_ROWS, out_f), np.float32)
        self.threads, self.clock = threads, clock

    def __call__(self, params, deadline):
        self.layer.set_kernel_params(params)
        m = self.layer._matrix
        t0 = self.clock()
        m.matmul(self.x, self.out, self.threads, True)   # warm-up, and a first estimate
        once = max(self.clock() - t0, 1e-7)
        calls = max(1, int(MIN_SAMPLE_SECONDS / once))
        return _best_of(lambda: m.matmul(self.x, self.out, self.threads, True, calls), calls,
                        deadline, self.clock)
