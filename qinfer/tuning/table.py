"""Which kernel parameters a layer gets: the tuned ones if this CPU has them, else the model's.

Lookup is by layer shape (bits, out, in, group); a shape that was never tuned
takes the tuned parameters of the largest tuned shape of its bitwidth, fitted
to it; with nothing tuned for the bitwidth, the performance model's.
QINFER_TUNE=0 turns all of this off (no cache is read). Reading the cache
never fails a caller: an unusable file gives one notice and the model's
parameters.
"""
import os
import sys

from .. import kernels
from . import cache, space

_state = {"path": None, "layers": {}}     # the cache file read, and its entries


def enabled():
    return os.environ.get("QINFER_TUNE", "1").strip() != "0"


def notice(message):
    print(f"qinfer: {message}", file=sys.stderr)


def _parse(raw):
    """{LayerShape: (LayerParams, entry)}; CacheError if any entry is malformed."""
    layers = {}
    try:
        for key, entry in raw.items():
            layers[space.LayerShape.from_key(key)] = (space.LayerParams.from_dict(entry["params"]), entry)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise cache.CacheError(f"malformed entry ({type(exc).__name__}: {exc})") from None
    return layers


def entries():
    """{LayerShape: (LayerParams, entry dict)} of this machine's cache, read once per process."""
    path = cache.cache_path()
    if _state["path"] != path:
        try:
            layers = _parse(cache.load(path))
        except cache.CacheError as exc:
            notice(f"ignoring the tuning cache ({exc}); using the performance model's parameters")
            layers = {}
        _state.update(path=path, layers=layers)
    return _state["layers"]


def update(results):
    """Add search results (search.Result) to the table; returns the entries the cache should
    store (all but failed searches, which the next process tries again)."""
    layers = entries()
    for r in results:
        layers[r.shape] = (r.params, r.entry())
    return {shape.key: entry for shape, (_, entry) in layers.items() if entry.get("status") != "failed"}


def reset():
    """Forget what was read (the next lookup reads the cache again)."""
    _state.update(path=None, layers={})


def _fallback(layers, bits):
    same_bits = [s for s in layers if s.bits == bits]
    if not same_bits:
        return None
    return layers[max(same_bits, key=lambda s: (s.out_features * s.in_features, s.key))][0]


def params_for(shape):
    """The parameters a layer of this shape runs with."""
    model = space.model_params(shape)
    if not enabled() or kernels.active_path() != "avx2":
        return model     # the scalar kernels read none of the parameters
    layers = entries()
    if shape in layers:
        return space.fit(layers[shape][0], shape)
    tuned = _fallback(layers, shape.bits)
    return space.fit(tuned, shape) if tuned else model
