"""Tuning at first use: an Engine has loaded a quantized model whose layer shapes this CPU lacks.

One line on stderr, a search of the missing shapes within DEFAULT_BUDGET
seconds, the cache saved, and every layer given its parameters (the forward
pass reads them from the layers' structs, so it needs no rebuilding).

Tuning never breaks a run: a failure or an interrupt gives one line and the
performance model's parameters (the shapes are searched again by the next
process); shapes the budget did not reach keep the model's parameters and
are saved so, with one line (`qinfer tune` searches them again).
"""
from .. import kernels
from ..linear import QuantizedLinear
from . import cache, search, space, table

DEFAULT_BUDGET = 60.0


def _unique_layers(layers):
    return list({id(layer): layer for layer in layers if isinstance(layer, QuantizedLinear)}.values())


def _search_missing(missing, threads, budget):
    table.notice(f"tuning kernels for this CPU (once, < {budget:.0f} s)...")
    results = search.search(missing, budget, threads)
    stored = table.update(results)
    try:
        cache.save(stored, kernels.resolve_threads(threads))
    except OSError as exc:
        table.notice(f"could not save the tuning cache ({exc}); tuning again next time")
    unreached = sum(r.status == "skipped" for r in results)
    if unreached:
        table.notice(f"kernel tuning ran out of time for {unreached} of {len(results)} layer shapes; "
                     f"they keep the performance model's parameters (`qinfer tune` searches again)")


def _fall_back(layers, missing):
    """The model's parameters for every layer, remembered for the missing shapes for this process."""
    table.update(search.Result(s, space.model_params(s), space.model_params(s), "failed") for s in missing)
    for layer in layers:
        layer.set_kernel_params(space.model_params(layer.shape))


def tune_layers(layers, threads=None, budget=None):
    """Give each QuantizedLinear in `layers` its tuned parameters, searching first if needed. Never raises."""
    layers = _unique_layers(layers)
    if not layers or not table.enabled() or kernels.active_path() != "avx2":
        return
    missing = []
    try:
        known = table.entries()
        missing = [s for s in dict.fromkeys(layer.shape for layer in layers) if s not in known]
        if missing:
            _search_missing(missing, threads, DEFAULT_BUDGET if budget is None else budget)
        for layer in layers:
            layer.set_kernel_params(table.params_for(layer.shape))
    except (Exception, KeyboardInterrupt) as exc:
        why = "was interrupted" if isinstance(exc, KeyboardInterrupt) else f"failed ({type(exc).__name__}: {exc})"
        table.notice(f"kernel tuning {why}; using the performance model's parameters")
        try:
            _fall_back(layers, missing)
        except Exception:
            pass    # the layers keep the parameters they were built with
