"""The bounded empirical search: the fastest parameters per layer shape, within a time budget.

Per shape, starting from the performance model's parameters, one parameter
at a time (qgemv's nv; then qgemm's mb, nb, tb, each with the best of those
before it), every candidate of space.candidates() is timed and the fastest
kept. A candidate must beat the current best by MIN_GAIN to replace it, so
timing noise does not move the parameters away from the model's for nothing.

The budget is shared out as the search goes: each shape may use the time
left divided by the shapes left (small shapes first, so what they do not use
goes to the large ones). The clock is checked between measurements; a shape
whose time runs out keeps the best found so far, and a shape never reached
keeps the model's parameters. Either way every shape gets valid parameters.
A winner is timed again against the model's parameters before it is kept.
"""
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .. import kernels
from . import measure, space

MIN_GAIN = 0.03
QGEMM_PARAMS = ("mb", "nb", "tb")


@dataclass
class Result:
    shape: space.LayerShape
    model: space.LayerParams
    params: space.LayerParams
    status: str                          # "tuned", "partial" (ran out of time) or "skipped"
    gemv_seconds: Optional[tuple] = None  # (model's, chosen) seconds per call
    gemm_seconds: Optional[tuple] = None

    def entry(self):
        """The cache's record of this result."""
        return dict(params=self.params.as_dict(), model=self.model.as_dict(), status=self.status,
                    gemv_seconds=list(self.gemv_seconds) if self.gemv_seconds else None,
                    gemm_seconds=list(self.gemm_seconds) if self.gemm_seconds else None,
                    gemm_rows=measure.GEMM_ROWS)


class _OutOfTime(Exception):
    pass


class _Descent:
    """Coordinate descent over one kernel's parameters, with a deadline."""

    def __init__(self, timer, start, deadline, clock):
        self.timer, self.deadline, self.clock = timer, deadline, clock
        self.start = self.best = start
        self.model_seconds = self.best_seconds = self._time(start)

    def _time(self, params):
        if self.clock() >= self.deadline:
            raise _OutOfTime
        return self.timer(params, self.deadline)

    def try_values(self, name, values):
        base = self.best
        for value in values:
            candidate = space.with_value(base, name, value)
            if candidate == base:
                continue
            seconds = self._time(candidate)
            if seconds < self.best_seconds * (1 - MIN_GAIN):
                self.best, self.best_seconds = candidate, seconds

    def confirm(self):
        """Time the start and the winner once more each: the winner was the fastest of many
        noisy figures, the start had one. It must still win by MIN_GAIN, else the start stays."""
        if self.best == self.start:
            return
        self.model_seconds = min(self.model_seconds, self._time(self.start))
        self.best_seconds = min(self.best_seconds, self._time(self.best))
        if self.best_seconds >= self.model_seconds * (1 - MIN_GAIN):
            self.best, self.best_seconds = self.start, self.model_seconds


def tune_shape(shape, deadline, threads, rng, clock=time.perf_counter):
    """Result for one shape; stops at `deadline` (a clock() value) with the best so far."""
    model = space.model_params(shape)
    options = space.candidates(shape)
    result = Result(shape, model, model, "skipped")
    if clock() >= deadline:
        return result
    gemv = gemm = None
    try:
        gemv = _Descent(measure.GemvTimer(shape, threads, rng, clock), model, deadline, clock)
        result.status = "partial"
        gemv.try_values("nv", options["nv"])
        gemv.confirm()
        # qgemm does not read nv: its descent starts from the model's other values.
        gemm = _Descent(measure.GemmTimer(shape, threads, rng, clock), gemv.best, deadline, clock)
        for name in QGEMM_PARAMS:
            gemm.try_values(name, options[name])
        gemm.confirm()
        result.status = "tuned"
    except _OutOfTime:
        pass     # the best so far stands
    for descent in (gemv, gemm):
        if descent:
            result.params = descent.best
    if gemv:
        result.gemv_seconds = (gemv.model_seconds, gemv.best_seconds)
    if gemm:
        result.gemm_seconds = (gemm.model_seconds, gemm.best_seconds)
    return result


def search(shapes, budget, threads=None, clock=time.perf_counter, seed=0, progress=None):
    """[Result] for each shape (in the given order), spending at most about `budget` seconds.

    progress: called with each Result as it is done (e.g. to print a table row).
    """
    threads = kernels.resolve_threads(threads)
    rng = np.random.default_rng(seed)
    start = clock()
    deadline = start + budget
    by_cost = sorted(dict.fromkeys(shapes), key=lambda s: s.out_features * s.in_features * s.bits)
    results = {}
    for i, shape in enumerate(by_cost):
        now = clock()
        share = (deadline - now) / (len(by_cost) - i)
        results[shape] = tune_shape(shape, min(deadline, now + share), threads, rng, clock)
        if progress:
            progress(results[shape])
    return [results[s] for s in dict.fromkeys(shapes)]
