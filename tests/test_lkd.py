"""ZeroQuant's layer-by-layer knowledge distillation (qinfer/quant/lkd.py, `--lkd-steps`).

* The numpy block pass: its output equals the engine's block (Model.run_layer) on a tiny
  model, with and without each linear map's input rounded to int8 per token (this file's
  rounding); its weight gradients equal finite differences of a block written here from
  llama_reference's pieces (float64).
* LKD lowers its own loss on a tiny model, and leaves the weights it was given alone.
* `quantize(..., lkd_steps=N)`: the checkpoint's layers are the rounding of the trained
  weights (different codes from plain rounding), its block outputs are closer to the
  float model's than plain rounding's on text it did not train on, and the settings are
  recorded.
* Bad settings: one clear error (the CLI: one line), nothing written.
"""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_reference as ref  # noqa: E402
from helpers import leftovers, needs_tokenizer, needs_wikitext, run_cli  # noqa: E402

import qinfer  # noqa: E402
from qinfer import QinferError  # noqa: E402
from qinfer.model import LINEAR_NAMES, Model, rope_frequencies  # noqa: E402
from qinfer.quant import lkd  # noqa: E402
from qinfer.readers import open_model  # noqa: E402


def int8_per_token(x):
    """Each row to int8 with scale max|row| / 127, round half to even (the kernels' rounding)."""
    x = np.asarray(x, dtype=np.float32)
    d = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
    safe = np.where(d > 0, d, np.float32(1))
    return (np.clip(np.rint(x / safe), -127, 127) * d).astype(np.float32)


def reference_block(w, norms, cfg, x, round_inputs=False):
    """One LLaMA block on x [T, dim] (positions 0..), from llama_reference's pieces; w {short: [out, in]}."""
    nh, nkv, hd = cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    T = len(x)
    pos = np.arange(T, dtype=np.float64)
    inv = ref.rope_inv_freq(hd, cfg["theta"])
    r = int8_per_token if round_inputs else (lambda a: a)
    h = r(ref.rms_norm(x, norms[0], cfg["eps"]))
    q = ref.apply_rope((h @ w["wq"].T).reshape(T, nh, hd), pos, inv)
    k = ref.apply_rope((h @ w["wk"].T).reshape(T, nkv, hd), pos, inv)
    v = (h @ w["wv"].T).reshape(T, nkv, hd)
    att = np.empty((T, nh, hd), dtype=q.dtype)
    mask = np.triu(np.full((T, T), -np.inf), k=1)
    for head in range(nh):
        kv = head // (nh // nkv)
        s = q[:, head] @ k[:, kv].T / math.sqrt(hd) + mask
        s = np.exp(s - s.max(axis=-1, keepdims=True))
        att[:, head] = (s / s.sum(axis=-1, keepdims=True)) @ v[:, kv]
    x1 = x + r(att.reshape(T, nh * hd)) @ w["wo"].T
    h2 = r(ref.rms_norm(x1, norms[1], cfg["eps"]))
    return x1 + r(ref.silu(h2 @ w["w_gate"].T) * (h2 @ w["w_up"].T)) @ w["w_down"].T


def random_block(rng, dim=24, nh=4, nkv=2, hd=6, ffn=40):
    shapes = {"wq": (nh * hd, dim), "wk": (nkv * hd, dim), "wv": (nkv * hd, dim), "wo": (dim, nh * hd),
              "w_gate": (ffn, dim), "w_up": (ffn, dim), "w_down": (dim, ffn)}
    w = {k: rng.standard_normal(s) * 0.3 for k, s in shapes.items()}
    norms = (1 + 0.1 * rng.standard_normal(dim), 1 + 0.1 * rng.standard_normal(dim))
    cfg = dict(heads=nh, kv_heads=nkv, head_dim=hd, eps=1e-5, theta=10000.0)
    return w, norms, cfg


def shape_of(norms, cfg):
    return lkd.BlockShape(cfg["heads"], cfg["kv_heads"], cfg["head_dim"], cfg["eps"], norms[0], norms[1],
                          ref.rope_inv_freq(cfg["head_dim"], cfg["theta"]))


def test_gradients_match_finite_differences():
    rng = np.random.default_rng(3)
    w, norms, cfg = random_block(rng)
    x, target = rng.standard_normal((9, 24)), rng.standard_normal((9, 24))
    out, saved = lkd.block_forward(w, shape_of(norms, cfg), x, round_inputs=False)
    np.testing.assert_allclose(out, reference_block(w, norms, cfg, x), rtol=1e-10, atol=1e-10)
    grads = lkd.block_backward(w, shape_of(norms, cfg), saved, 2 * (out - target) / out.size)

    def loss():
        return np.mean((reference_block(w, norms, cfg, x) - target) ** 2)

    eps = 1e-6
    for name in lkd.MAPS:
        for idx in zip(*(rng.integers(0, n, 8) for n in w[name].shape)):
            old = w[name][idx]
            w[name][idx] = old + eps
            up = loss()
            w[name][idx] = old - eps
            down = loss()
            w[name][idx] = old
            numeric = (up - down) / (2 * eps)
            assert abs(grads[name][idx] - numeric) <= 1e-6 * max(1.0, abs(numeric)) + 1e-9, (name, idx)


@pytest.fixture(scope="module")
def tiny_src(write_tiny):
    return write_tiny("lkd_src", tied=False, seed=5)


def block_of(weights, config, i):
    p = f"model.layers.{i}."
    w = {k: weights[p + LINEAR_NAMES[k] + ".weight"] for k in lkd.MAPS}
    norms = (weights[p + "input_layernorm.weight"], weights[p + "post_attention_layernorm.weight"])
    cfg = dict(heads=config["num_attention_heads"], kv_heads=config["num_key_value_heads"],
               head_dim=config["hidden_size"] // config["num_attention_heads"], eps=config["rms_norm_eps"],
               theta=config["rope_theta"])
    return w, norms, cfg


@needs_tokenizer
def test_block_pass_matches_the_engine(tiny_src):
    directory, weights, config = tiny_src
    model = Model(open_model(directory), ctx=64, threads=1, kv_cache="f32")
    x = np.random.default_rng(0).standard_normal((40, config["hidden_size"])).astype(np.float32)
    w, norms, cfg = block_of(weights, config, 1)
    engine = x.copy()
    model.run_layer(1, engine, 0)
    shape = shape_of(norms, cfg)
    np.testing.assert_allclose(shape.inv_freq, rope_frequencies(cfg["head_dim"], cfg["theta"]), rtol=1e-6)
    ours, _ = lkd.block_forward(w, shape, x, round_inputs=False)
    np.testing.assert_allclose(ours, engine, rtol=1e-4, atol=1e-4 * np.abs(engine).max())
    rounded, _ = lkd.block_forward(w, shape, x, round_inputs=True)
    want = reference_block(w, norms, cfg, x, round_inputs=True)
    assert np.abs(rounded - want).max() < 1e-3 * np.abs(want).max()
    assert np.abs(rounded - engine).max() > 1e-3 * np.abs(engine).max()      # the rounding shows


def rounder(bits, group):
    """Symmetric rounding per row and group (this file's own): scale max|w| / (2^(b-1) - 1)."""
    top = 2 ** (bits - 1) - 1

    def run(w):
        g = w.reshape(w.shape[0], -1, group)
        s = np.abs(g).max(axis=2, keepdims=True) / top
        return (np.clip(np.rint(g / np.where(s > 0, s, 1)), -top, top) * s).reshape(w.shape).astype(np.float32)
    return run


@needs_tokenizer
def test_lkd_lowers_its_own_loss(tiny_src):
    directory, weights, config = tiny_src
    w, norms, cfg = block_of(weights, config, 0)
    rng = np.random.default_rng(1)
    # as many windows as it evaluates on: it trains on the windows that judge it, its own loss
    inputs = rng.standard_normal((lkd.EVAL_WINDOWS, 32, config["hidden_size"])).astype(np.float32)
    targets = np.stack([reference_block(w, norms, cfg, x).astype(np.float32) for x in inputs])
    before = {k: v.copy() for k, v in w.items()}
    d = lkd.distill_block(w, shape_of(norms, cfg), {k: rounder(4, 16) for k in lkd.MAPS}, inputs, targets,
                          steps=80, lr=1e-3)
    assert all(np.array_equal(w[k], before[k]) for k in w), "the given weights are left alone"
    assert d.kept and d.loss_after < 0.8 * d.loss_before, (d.loss_before, d.loss_after)
    # the loss it reports is the rounded block's on those windows, recomputed here
    rounded = {k: rounder(4, 16)(d.weights[k]) for k in lkd.MAPS}
    recomputed = np.mean([np.mean((reference_block(rounded, norms, cfg, x, True) - y) ** 2)
                          for x, y in zip(inputs, targets)])
    assert recomputed == pytest.approx(d.loss_after, rel=1e-3)
    # a learning rate far too high cannot make a block worse: the plain rounding stays
    bad = lkd.distill_block(w, shape_of(norms, cfg), {k: rounder(4, 16) for k in lkd.MAPS}, inputs, targets,
                            steps=5, lr=10.0)
    assert not bad.kept and all(np.array_equal(bad.weights[k], w[k]) for k in w)


def hidden_error(directory, weights, config, ids):
    """Mean squared difference of the last block's output of the checkpoint `directory` (its
    own engine, int8 activations) and of the float weights, over the tokens ids."""
    model = Model(open_model(directory), ctx=len(ids), threads=1, kv_cache="f32")
    x = np.ascontiguousarray(model.embedding[ids], dtype=np.float32)
    want = np.asarray(weights["model.embed_tokens.weight"][ids], dtype=np.float64)
    for i in range(config["num_hidden_layers"]):
        model.run_layer(i, x, 0)
        w, norms, cfg = block_of(weights, config, i)
        want = reference_block(w, norms, cfg, want)
    return float(np.mean((x - want) ** 2))


@needs_wikitext
@needs_tokenizer
def test_quantize_with_lkd(tiny_src, tmp_path):
    from safetensors.numpy import load_file

    directory, weights, config = tiny_src
    settings = dict(method="zeroquant", bits=4, group_size=16, threads=1, progress=False, float_dtype="float32")
    plain, trained = tmp_path / "plain", tmp_path / "lkd"
    qinfer.quantize(directory, plain, **settings)
    report = qinfer.quantize(directory, trained, calib=ref.WIKITEXT, nsamples=16, seqlen=48, lkd_steps=60,
                             lkd_lr=3e-5, **settings)
    assert report.lkd.startswith("LKD: mean block loss") and "kept in" in report.lkd
    assert report.lkd in report.summary()
    qc = json.loads((trained / "quantize_config.json").read_text())["qinfer"]
    assert (qc["lkd_steps"], qc["lkd_lr"], qc["nsamples"], qc["seqlen"]) == (60, 3e-5, 16, 48)
    a, b = load_file(str(plain / "model.safetensors")), load_file(str(trained / "model.safetensors"))
    assert any(not np.array_equal(a[k], b[k]) for k in a if k.endswith(".qweight"))
    # judged on text the calibration did not draw (the file's start; windows come from a seeded draw)
    tokenizer = qinfer.Engine(trained, threads=1).tokenizer
    ids = tokenizer.encode(ref.WIKITEXT.read_text()[:4000], add_bos=True)[:96]
    assert hidden_error(trained, weights, config, ids) < hidden_error(plain, weights, config, ids)


@needs_tokenizer
def test_bad_lkd_settings_are_refused(tiny_src, tmp_path):
    out = tmp_path / "never"
    cases = [
        (dict(method="zeroquant", lkd_steps=0, calib="x"), "lkd-steps"),
        (dict(method="zeroquant", lkd_steps=True, calib="x"), "lkd-steps"),
        (dict(method="zeroquant", lkd_steps=10, lkd_lr=-1.0, calib="x"), "lkd-lr"),
        (dict(method="zeroquant", lkd_steps=10, lkd_lr=float("nan"), calib="x"), "lkd-lr"),
        (dict(method="zeroquant", lkd_lr=1e-4), "lkd_steps"),
        (dict(method="zeroquant", lkd_steps=10), "calibration text"),
        (dict(method="rtn", lkd_steps=10), "'smoothquant' and 'zeroquant'"),
        (dict(method="gptq", lkd_steps=10, calib="x"), "'smoothquant' and 'zeroquant'"),
    ]
    for kwargs, words in cases:
        with pytest.raises(QinferError, match=words):
            qinfer.quantize(tiny_src[0], out, progress=False, **kwargs)
        assert not out.exists() and not leftovers(tmp_path), kwargs
    for args, words in ((("--lkd-steps", "0"), "--lkd-steps"), (("--lkd-steps", "5", "--lkd-lr", "x"), "--lkd-lr"),
                        (("--lkd-lr", "0.001"), "lkd_steps")):
        proc = run_cli("quantize", "--model", str(tiny_src[0]), "--method", "zeroquant", "--out", str(out), *args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode in (1, 2) and len(lines) == 1 and words in lines[0], proc.stderr
        assert not out.exists()
