"""Whether a packed 2-, 3- or 4-bit layer shape decodes faster on the lookup-table kernels.

    $XDG_CACHE_HOME/qinfer/lut-<digest>.json     (default ~/.cache/qinfer/; the digest as
                                                 the tuning cache's: CPU, flags, version, build)

For each (bits, out, in, group) shape, thread count and activation mode, the
first model that needs it measures one-row products as a decode step runs
them, weights streamed from memory: random layers of the shape on their dense
kernel, and the same layers as LutLinear, alternating rounds, each kernel's
best. The lookup tables win the shape only when they are at least MARGIN
faster: on a machine whose timings vary by a few percent a near tie is not a
reason to change kernels. One line on stderr while it measures; the choice is
saved atomically (a reader never sees half a file), and never breaks a run: a
failed measurement or an unreadable cache means the dense kernels.
"""
import json
import os
import time

import numpy as np

from .. import kernels
from . import cache, table
from .measure import random_layer

MARGIN = 1.10               # the tables must be this much faster to be chosen
ROUNDS = 3
SAMPLE_SECONDS = 0.05
COLD_BYTES_MAX = 96 << 20
FORMAT_VERSION = 1
_memo = {}                  # this process's choices: {key: bool}


def _path():
    return cache.cache_path().replace(os.sep + "tuning-", os.sep + "lut-")


def key(shape, threads, activations):
    group = "col" if shape.group_size == -1 else f"g{shape.group_size}"
    return f"b{shape.bits}-{shape.out_features}x{shape.in_features}-{group}-t{threads}-{activations}"


def _load():
    try:
        with open(_path()) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION or not isinstance(data.get("shapes"), dict):
        return {}
    return {k: v for k, v in data["shapes"].items() if isinstance(v, dict) and isinstance(v.get("lut"), bool)}


def _save(shapes):
    cache.write_json(_path(), dict(format=FORMAT_VERSION, key=cache.machine_key(), shapes=shapes))


def _cycle_seconds(layers, x, threads):
    """Seconds a call, the best sample of ROUNDS, calls walking on through the copies."""
    state = {"i": 0}

    def calls(n):
        t0 = time.perf_counter()
        for _ in range(n):
            layers[state["i"] % len(layers)](x, threads=threads)
            state["i"] += 1
        return (time.perf_counter() - t0) / n

    once = calls(2)
    n = max(2, int(SAMPLE_SECONDS / max(once, 1e-7)))
    return min(calls(n) for _ in range(ROUNDS))


def measure(shape, threads, activations):
    """(dense seconds, lookup-table seconds) a one-row call of `shape` (tuning.space.LayerShape)."""
    from ..lut_linear import LutLinear

    rng = np.random.default_rng(0)
    first = random_layer(rng, shape)
    cold = 2 * kernels.machine().get("l3_bytes", 32 << 20)
    count = max(2, min(-(-cold // first.nbytes), COLD_BYTES_MAX // first.nbytes))
    dense = [first] + [first.copy() for _ in range(count - 1)]
    luts = [LutLinear.from_quantized(first)]
    luts += [luts[0].copy() for _ in range(count - 1)]
    x = rng.standard_normal(shape.in_features).astype(np.float32)
    best = {"dense": float("inf"), "lut": float("inf")}
    with kernels.use_activations(activations):
        for _ in range(ROUNDS):
            best["dense"] = min(best["dense"], _cycle_seconds(dense, x, threads))
            best["lut"] = min(best["lut"], _cycle_seconds(luts, x, threads))
    return best["dense"], best["lut"]


def faster(shape, threads, activations):
    """Whether layers of `shape` should run on the lookup-table kernels here (measured once;
    never with tuning off, QINFER_TUNE=0, or off the AVX2 path)."""
    if not table.enabled() or kernels.active_path() != "avx2":
        return False
    k = key(shape, threads, activations)
    if k in _memo:
        return _memo[k]
    stored = _load()
    if k in stored:
        _memo[k] = stored[k]["lut"]
        return _memo[k]
    try:
        table.notice(f"timing the lookup-table kernels for {shape.bits}-bit {shape.out_features}x"
                     f"{shape.in_features} layers (once)...")
        dense, lut = measure(shape, threads, activations)
        choice = dense >= MARGIN * lut
        stored[k] = dict(lut=choice, dense_us=round(dense * 1e6, 1), lut_us=round(lut * 1e6, 1))
        _save(stored)
    except (Exception, KeyboardInterrupt) as exc:
        why = "was interrupted" if isinstance(exc, KeyboardInterrupt) else f"failed ({type(exc).__name__}: {exc})"
        table.notice(f"timing the lookup-table kernels {why}; using the dense kernels")
        choice = False
    _memo[k] = choice
    return choice
