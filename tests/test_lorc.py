"""ZeroQuant-V2's low-rank compensation (LoRC): quant/lorc.py, Int8Linear's factors, the checkpoint.

* The factors: B A equals the rank-r projection of the error from numpy's exact SVD (the
  randomized one finds the same directions), and A and B split the singular values evenly.
* The kernels: y = W_q x + B (A x), the same bits on every instruction set and thread count,
  and equal to a float64 reference up to float32 rounding; stacking keeps each part's factors.
* The checkpoint: `--lorc-rank` writes `.lorc_a` / `.lorc_b` and quantization_config's
  lorc_rank; the engine's logits follow the reference with the compensated weights; the
  compensation lowers the layers' error; bad ranks and a lorc_rank without int8
  activations are refused.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_reference as ref  # noqa: E402
from helpers import edit_settings, edit_tensors, needs_tokenizer, refused  # noqa: E402

import qinfer  # noqa: E402
from qinfer import QinferError, UnsupportedError, _w8a8  # noqa: E402
from qinfer.errors import FormatError  # noqa: E402
from qinfer.int8_linear import Int8Linear  # noqa: E402
from qinfer.quant.lorc import low_rank_factors  # noqa: E402
from qinfer.readers import open_model  # noqa: E402


def best_rank(e, r):
    u, s, vt = np.linalg.svd(e.astype(np.float64), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r], s


@pytest.mark.parametrize("shape,rank", [((96, 64), 4), ((40, 200), 8), ((16, 16), 16)])
def test_factors_are_the_residuals_rank_r_projection(shape, rank):
    rng = np.random.default_rng(rank)
    # a residual with a decaying spectrum, as rounding errors of real layers have
    e = rng.standard_normal(shape) @ np.diag(np.linspace(1, 0.05, shape[1])) * 0.01
    a, b = low_rank_factors(e, rank)
    assert a.shape == (rank, shape[1]) and b.shape == (shape[0], rank) and a.dtype == b.dtype == np.float32
    want, s = best_rank(e, rank)
    np.testing.assert_allclose(b @ a, want, atol=1e-4 * np.abs(want).max(), rtol=1e-3)
    # A = S^(1/2) V^T, B = U S^(1/2): the rows of A and columns of B carry equal norms
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=0), rtol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1) ** 2, s[:rank], rtol=1e-3)
    assert low_rank_factors(e, rank)[0].tobytes() == a.tobytes()          # the same every time
    with pytest.raises(QinferError, match="exceeds"):
        low_rank_factors(e, min(shape) + 1)


def test_randomized_svd_of_large_layers_finds_the_top_directions():
    from qinfer.quant import lorc

    rng = np.random.default_rng(0)
    out_f, in_f, rank = 1100, 1040, 8                  # past EXACT_LIMIT: the randomized SVD
    assert min(out_f, in_f) > lorc.EXACT_LIMIT
    # a few strong directions over noise: the rank-8 projection is well defined
    signal = rng.standard_normal((out_f, rank)) @ np.diag(np.linspace(3, 1, rank)) @ rng.standard_normal((rank, in_f))
    e = (signal * 0.01 + rng.standard_normal((out_f, in_f)) * 1e-4).astype(np.float32)
    a, b = low_rank_factors(e, rank)
    want, _ = best_rank(e, rank)
    np.testing.assert_allclose(b @ a, want, atol=1e-3 * np.abs(want).max())
    assert low_rank_factors(e, rank, seed=0)[0].tobytes() == a.tobytes()     # seeded


@pytest.mark.parametrize("bits", [8, 4])
def test_kernels_add_the_compensation_on_every_path(bits):
    rng = np.random.default_rng(bits)
    out_f, in_f, group, rank = 37, 96, 32, 5
    top = 2 ** (bits - 1)
    codes = rng.integers(-top, top, size=(out_f, in_f)).astype(np.int8)
    scales = (rng.random((out_f, in_f // group)) * 0.01 + 1e-3).astype(np.float32)
    a = rng.standard_normal((rank, in_f)).astype(np.float32) * 0.1
    b = rng.standard_normal((out_f, rank)).astype(np.float32) * 0.1
    x = rng.standard_normal((11, in_f)).astype(np.float32)
    plain = _w8a8.Int8Matrix(codes, scales, group, "portable", 1, bits)
    base = np.empty((11, out_f), np.float32)
    plain.matmul(x, base, 1)
    want = base.astype(np.float64) + (x.astype(np.float64) @ a.T) @ b.T
    first = None
    for isa in _w8a8.cpu_isas():
        m = _w8a8.Int8Matrix(codes, scales, group, isa, 1, bits, (a, b))
        for threads in (1, 2):
            y = np.full((11, out_f), np.nan, np.float32)
            m.matmul(x, y, threads)
            np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
            if first is None:
                first = y
            np.testing.assert_array_equal(y, first, err_msg=f"{isa}, {threads} thread(s)")
    with pytest.raises(ValueError, match="low-rank"):
        _w8a8.Int8Matrix(codes, scales, group, "portable", 1, bits, (a, b[:5]))


def test_stacked_layers_keep_each_parts_compensation():
    rng = np.random.default_rng(2)
    parts = []
    for n, rank in ((24, 3), (16, 0), (8, 2)):
        codes = rng.integers(-127, 128, size=(n, 64)).astype(np.int8)
        scales = (rng.random((n, 1)) * 0.01).astype(np.float32)
        low = None if rank == 0 else (rng.standard_normal((rank, 64)).astype(np.float32),
                                      rng.standard_normal((n, rank)).astype(np.float32))
        parts.append(Int8Linear(codes, scales, -1, 8, low))
    whole = Int8Linear.stack(parts)
    assert whole.rank == 5
    x = rng.standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_allclose(whole(x), np.concatenate([p(x) for p in parts], axis=1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(whole.dequantize(), np.concatenate([p.dequantize() for p in parts]), rtol=1e-6,
                               atol=1e-6)
    for got, part in zip(whole.split([24, 16, 8]), parts):
        assert got.rank == part.rank
        np.testing.assert_array_equal(got.dequantize(), part.dequantize())


@pytest.fixture(scope="module")
def tiny_src(write_tiny):
    return write_tiny("lorc_src", tied=False, seed=21)


@needs_tokenizer
def test_checkpoint_with_lorc(tiny_src, tmp_path):
    from safetensors.numpy import load_file

    plain, comp = tmp_path / "plain", tmp_path / "lorc"
    for out, rank in ((plain, None), (comp, 4)):
        qinfer.quantize(tiny_src[0], out, method="zeroquant", bits=4, group_size=32, lorc_rank=rank, threads=1,
                        progress=False, float_dtype="float32")
    assert json.loads((comp / "config.json").read_text())["quantization_config"]["lorc_rank"] == 4
    stored = load_file(str(comp / "model.safetensors"))
    src_w, cfg = tiny_src[1], tiny_src[2]
    base = "model.layers.1.mlp.down_proj"
    a, b = stored[base + ".lorc_a"], stored[base + ".lorc_b"]
    assert a.dtype == b.dtype == np.float16 and a.shape == (4, 160) and b.shape == (64, 4)
    # the factors are the rank-4 projection of the layer's rounding error
    loaded = open_model(comp).tensors[base + ".weight"]
    from qinfer.linear import QuantizedLinear
    wq = QuantizedLinear.from_packed(loaded.qweight, loaded.scales, loaded.zeros, loaded.bits,
                                     loaded.group_size).dequantize()
    want, _ = best_rank(src_w[base + ".weight"] - wq, 4)
    np.testing.assert_allclose(b.astype(np.float32) @ a.astype(np.float32), want, atol=2e-3 * np.abs(want).max())
    # every layer's error is lower with the compensation
    e_plain = qinfer.Engine(plain, threads=1, dequantize=True)
    e_comp = qinfer.Engine(comp, threads=1, dequantize=True)
    ids = np.arange(3, 30)
    floats = ref.forward(src_w, cfg, ids)
    err = lambda e: np.abs(e.logits(ids) - floats).max()
    assert err(e_comp) < err(e_plain)
    # the engine runs the factors: its layers hold them, and its logits match the reference with B A added
    engine = qinfer.Engine(comp, threads=2)
    assert all(layer.rank in (4, 8, 12) for layer in engine.model.quantized_layers())
    comp_w = {k: v for k, v in src_w.items()}
    t = open_model(comp).tensors
    for name in list(comp_w):
        if isinstance(t.get(name), type(loaded)):
            p = t[name]
            q = QuantizedLinear.from_packed(p.qweight, p.scales, p.zeros, p.bits, p.group_size).dequantize()
            comp_w[name] = q + p.low_rank[1] @ p.low_rank[0]
    want = ref.forward(comp_w, cfg, ids)
    got = engine.logits(ids)
    assert np.abs(got - want).max() < 0.1 * np.abs(want - floats).max() + 0.02 * np.abs(want).max()
    np.testing.assert_allclose(e_comp.logits(ids), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@needs_tokenizer
def test_bad_ranks_and_misplaced_compensation_are_refused(tiny_src, tmp_path):
    for rank, error in ((0, QinferError), (-1, QinferError), (2.5, QinferError), (True, QinferError)):
        with pytest.raises(error, match="rank"):
            qinfer.quantize(tiny_src[0], tmp_path / "x", method="zeroquant", lorc_rank=rank, progress=False)
    with pytest.raises(QinferError, match="lorc-rank"):
        qinfer.quantize(tiny_src[0], tmp_path / "x", method="rtn", lorc_rank=4, progress=False)
    assert not (tmp_path / "x").exists()
    out = tmp_path / "ok"
    qinfer.quantize(tiny_src[0], out, method="zeroquant", lorc_rank=2, threads=1, progress=False)
    both = ("config.json", "quantize_config.json")
    refused(out, tmp_path / "a", edit_settings(lambda qc: qc.pop("input_activations"), both), UnsupportedError,
            "lorc_rank")
    refused(out, tmp_path / "b", edit_settings(lambda qc: qc.update(lorc_rank=3), both), FormatError,
            "lorc_a", "[3, 64]")
    refused(out, tmp_path / "c", edit_tensors(lambda t: t.pop("model.layers.0.mlp.up_proj.lorc_b")), FormatError,
            "lorc_b", "missing")

    def poison(t):
        t["model.layers.0.mlp.up_proj.lorc_a"][0, 0] = np.nan
    refused(out, tmp_path / "d", edit_tensors(poison), FormatError, "lorc_a", "NaN")
