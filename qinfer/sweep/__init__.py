"""Sweeps of quantization settings: each configuration quantized, scored for perplexity and
timed, as one task each on Ray (a local instance, or a cluster) or in this process.

    from qinfer.sweep import Config, Sweep, load_grid, run_sweep
    sweep = Sweep([Config.make("float"), Config.make("rtn", 4, 128)], data="wiki.test.raw", windows=4)
    result = run_sweep(sweep, cache="~/.cache/qinfer/sweep")     # result.rows: one dict a configuration

grid.py (the configurations, TOML grid files), measure.py (one configuration),
runner.py (the cache, Ray, faults), shipping.py (files to the workers), store.py
(the results cache), table.py (the markdown table). docs/scaling.md has the rest.
"""
from .grid import Config, GridError, Sweep, load_grid
from .runner import SweepResult, run_sweep

__all__ = ["Config", "GridError", "Sweep", "SweepResult", "load_grid", "run_sweep"]
