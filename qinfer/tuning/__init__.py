"""The autotuner: run-time kernel parameters measured per CPU and layer shape.

space.py      the parameters (nv, mb, nb, tb), the model's defaults and the candidates
measure.py    times one shape's qgemv/qgemm under given parameters, on random weights
search.py     the bounded search: coordinate descent per shape within a time budget
cache.py      the per-CPU JSON cache in the user's cache directory (atomic writes)
table.py      which parameters a layer gets (tuned, per-bitwidth fallback, or the model's)
first_use.py  what an Engine calls after loading a model: search what is missing, never fail
"""
