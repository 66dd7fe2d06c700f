"""SmoothQuant and ZeroQuant's W8A8: qinfer.quantize(method="smoothquant" / "zeroquant"), the
checkpoint's input_activations record, the engine on the int8 x int8 kernels, `--smooth`.

* Smoothing is the same model: the smoothed float model's logits equal the original's for
  any alpha (and with down_proj smoothed too); s matches the formula for given maxima.
* The checkpoint: 8-bit symmetric GPTQ tensors (decoded by this file's own unpacker), one
  scale per row, quantization_config.input_activations; the engine's logits against the
  numpy reference forward pass with each linear map's input rounded to int8 per token
  (this file's rounding), in prefill and in decode steps (the decode team's entry points).
* Errors: alpha outside [0, 1], bits the methods do not take, options that do not apply,
  a calibration file too short, edited input_activations settings: one clear error (the
  CLI: one `qinfer: error:` line, exit 1), nothing written.
"""
import json
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_reference as ref  # noqa: E402
from helpers import (edit_settings, leftovers, needs_tokenizer, needs_wikitext, refused,  # noqa: E402
                     run_cli)

import qinfer  # noqa: E402
from qinfer import QinferError, UnsupportedError  # noqa: E402
from qinfer.errors import FormatError  # noqa: E402
from qinfer.int8_linear import Int8Linear  # noqa: E402
from qinfer.model import LINEAR_NAMES, Model  # noqa: E402
from qinfer.quant import smoothquant  # noqa: E402
from qinfer.quant.progress import Progress  # noqa: E402
from qinfer.quant.writer import float_weight  # noqa: E402
from qinfer.readers import open_model  # noqa: E402

PROMPT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def tiny_src(write_tiny):
    return write_tiny("w8a8_src", tied=False, seed=11)


@pytest.fixture(scope="module")
def zeroquant(tiny_src, tmp_path_factory):
    out = tmp_path_factory.mktemp("zq") / "ckpt"
    report = qinfer.quantize(tiny_src[0], out, method="zeroquant", threads=1, progress=False, float_dtype="float32")
    return out, report


def unpack(words, bits):
    """uint codes [rows * 32 / bits, out] of GPTQ words int32 [rows, out]: row (32 / bits) i + j at
    bits * j of word i."""
    w = words.view(np.uint32)
    per = 32 // bits
    return np.stack([(w >> (bits * j)) & (2 ** bits - 1) for j in range(per)], axis=1).reshape(-1, w.shape[1])


def int8_layers(directory, in_features):
    """{weight name: (codes int [out, in], scales float [out, groups], group, bits)} decoded from the
    checkpoint's tensors (in_features: {weight name: inputs}, which give each layer's bits)."""
    from safetensors.numpy import load_file

    stored = load_file(str(Path(directory) / "model.safetensors"))
    layers = {}
    for name in stored:
        if name.endswith(".qweight"):
            base = name[:-len(".qweight")]
            bits = 32 * stored[name].shape[0] // in_features[base + ".weight"]
            mid = 2 ** (bits - 1)
            codes = unpack(stored[name], bits).astype(np.int64) - mid
            zeros_less_one = unpack(stored[base + ".qzeros"], bits).astype(np.int64)     # v1: zero - 1
            assert (zeros_less_one == mid - 1).all(), f"symmetric: every zero point {mid}"
            scales = stored[base + ".scales"].astype(np.float64).T                       # [out, groups]
            layers[base + ".weight"] = (codes.T, scales, codes.shape[0] // scales.shape[1], bits)
    return layers, stored


def inputs_of(weights):
    return {k: v.shape[1] for k, v in weights.items() if v.ndim == 2}


def dequantized(layers):
    return {k: c * np.repeat(s, g, axis=1) for k, (c, s, g, _) in layers.items()}


def per_token(x):
    """x rounded to int8 per row as a W8A8 layer's input: (q, d)."""
    x = np.asarray(x, dtype=np.float64)
    d = np.abs(x).max(axis=1) / 127
    safe = np.where(d > 0, d, 1)
    return np.clip(np.rint(x / safe[:, None]), -127, 127), d


def w8a8_linear(layers):
    """A linear map with its input rounded per token: per group, the integer dot product times
    the group's scale, summed, times the token's d."""
    def linear(x, name):
        codes, scales, group, _ = layers[name]
        q, d = per_token(x)
        y = 0.0
        for g in range(scales.shape[1]):
            cols = slice(g * group, (g + 1) * group)
            y = y + (q[:, cols] @ codes[:, cols].T) * scales[None, :, g]
        return y * d[:, None]
    return linear


# ------------------------------------------------------------------ smoothing
def test_smoothing_factors_follow_the_formula():
    rng = np.random.default_rng(0)
    act = np.abs(rng.standard_normal(12)) * 10
    act[3] = 0.0                                   # a channel never active: clamped
    ws = [rng.standard_normal((5, 12)), rng.standard_normal((7, 12))]
    ws[1][:, 5] = 0.0
    ws[0][:, 5] = 0.0                              # a column of zeros in every map: clamped
    for alpha in (0.0, 0.25, 0.5, 1.0):
        wmax = np.maximum(np.abs(ws[0]).max(axis=0), np.abs(ws[1]).max(axis=0))
        want = np.maximum(np.maximum(act, 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1 - alpha), 1e-5)
        np.testing.assert_allclose(smoothquant.smoothing_factors(act, ws, alpha), want, rtol=1e-6)
    for bad in (-0.1, 1.5, "0.5", True, float("nan")):
        with pytest.raises(QinferError, match="alpha"):
            smoothquant.check_alpha(bad)
    assert smoothquant.check_alpha("auto") == "auto"


@needs_tokenizer
@needs_wikitext
def test_smoothing_leaves_the_float_model_unchanged(tiny_src):
    src = open_model(tiny_src[0])
    ids = np.arange(5, 29)
    windows = np.stack([np.arange(100, 132), np.arange(300, 332)]).astype(np.int32)
    stats = smoothquant.calibrate(src, windows, 1, Progress(2, enabled=False), keep_sample=True,
                                  groups=smoothquant.groups_for(True))
    want = Model(src, threads=1).forward(ids, 0, all_logits=True)
    for alpha, down in ((0.0, False), (0.5, False), (1.0, False), (0.8, True), ("auto", True)):
        tensors, alphas = smoothquant.smooth(src, stats, alpha, lambda n: float_weight(src, n),
                                             smoothquant.groups_for(down))
        smoothed = smoothquant.smoothed_source(src, tensors)
        # the weights did change (a no-op would pass the logits check too) ...
        q = "model.layers.0.self_attn.q_proj.weight"
        assert not np.allclose(float_weight(smoothed, q), float_weight(src, q))
        if down:
            up = "model.layers.1.mlp.up_proj.weight"
            assert alphas["model.layers.1.mlp.up_proj"] in smoothquant.ALPHA_GRID + (0.8,)
            assert not np.allclose(float_weight(smoothed, up), float_weight(src, up))
        # ... and the function did not
        got = Model(smoothed, threads=1).forward(ids, 0, all_logits=True)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


# ------------------------------------------------------------------ the checkpoint and the engine
@needs_tokenizer
def test_zeroquant_checkpoint_runs_w8a8_against_the_reference(tiny_src, zeroquant):
    out, report = zeroquant
    assert (report.method, report.bits, report.group_size) == ("zeroquant", 8, -1)
    assert "activations int8 per token" in report.summary()
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["input_activations"] == {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True,
                                       "strategy": "token"}
    assert (qc["bits"], qc["group_size"], qc["sym"]) == (8, -1, True)
    src_w = tiny_src[1]
    layers, stored = int8_layers(out, inputs_of(src_w))
    cfg = tiny_src[2]
    assert len(layers) == cfg["num_hidden_layers"] * len(LINEAR_NAMES)
    for name, (codes, scales, group, bits) in layers.items():       # round to nearest of the float weight, per row
        w = src_w[name]
        assert (bits, scales.shape[1]) == (8, 1)
        np.testing.assert_allclose(scales[:, 0], (np.abs(w).max(axis=1) / 127).astype(np.float16), rtol=0, atol=0)
        assert np.abs(codes * scales - w).max() <= 0.5 * scales.max() * (1 + 1e-3)
    assert open_model(out).activations == "int8-token"

    engine = qinfer.Engine(out, threads=2)
    kernel_layers = engine.model.quantized_layers()
    assert kernel_layers and all(isinstance(layer, Int8Linear) for layer in kernel_layers)
    weights = {k: v for k, v in src_w.items() if k not in layers}
    weights.update(dequantized(layers))
    ids = engine.tokenizer.encode(PROMPT, add_bos=True)
    want = ref.forward(weights, cfg, ids, linear=w8a8_linear(layers))
    floats = ref.forward(weights, cfg, ids)             # the same weights, float activations
    got = engine.logits(ids)
    gap = np.abs(floats - want).max()
    assert gap > 1e-3 * np.abs(want).max()            # the activations' rounding is visible ...
    assert np.abs(got - want).max() < 0.05 * gap       # ... and the engine rounds as the reference does
    # decode steps (the decode team's entry points, one token at a time) give the same logits
    steps = np.stack([engine.model.forward(ids[t:t + 1], t) for t in range(len(ids))])
    np.testing.assert_allclose(steps, got, rtol=1e-5, atol=1e-5 * np.abs(got).max())
    # the same checkpoint dequantized: float activations, the weight-only reference
    np.testing.assert_allclose(qinfer.Engine(out, threads=1, dequantize=True).logits(ids), floats,
                               rtol=1e-4, atol=1e-4 * np.abs(floats).max())


@needs_tokenizer
def test_prefill_on_the_amx_tile_loop(zeroquant):
    """A W8A8 prefill of 16 rows or more through the AMX-INT8 loop (pyx/w8a8_amx.h; its C
    model of the tiles here, the tiles too where the CPU has them: every layer with inputs
    a multiple of 64, all but down_proj's 160) gives the vector loops' logits bit for bit."""
    from qinfer import kernels
    out, _ = zeroquant
    with kernels.use_int8_amx(False):
        engine = qinfer.Engine(out, threads=2)
        ids = engine.tokenizer.encode(" ".join([PROMPT] * 4), add_bos=True)[:40]
        assert len(ids) > 32
        want = engine.logits(ids)
    for mode in ["model"] + (["tiles"] if kernels.has_int8_amx() else []):
        with kernels.use_int8_amx(mode):
            model = qinfer.Engine(out, threads=2)
            assert {layer._matrix.amx for layer in model.model.quantized_layers()} == {mode}
            np.testing.assert_array_equal(model.logits(ids), want, err_msg=mode)
    with kernels.use_int8_amx(kernels.int8_amx()):     # restores the setting after
        with pytest.raises(UnsupportedError, match="no AMX-INT8") if not kernels.has_int8_amx() else nullcontext():
            kernels.set_int8_amx(True)


@needs_tokenizer
def test_batched_steps_and_info_name_the_loops(zeroquant):
    """A server's batched decode step (forward_rows: the rows team entry points) gives each
    sequence the logits it gets alone; `qinfer info` names the loops the settings pick."""
    out, _ = zeroquant
    model = qinfer.Engine(out, threads=2).model
    prompts = [[1, 5, 9, 13], [1, 7, 2], [1, 30, 31, 32, 33]]
    cache = model.new_cache(32, seqs=len(prompts))
    for seq, ids in enumerate(prompts):
        model.forward(ids, 0, cache=cache, seq=seq)
    got = model.forward_rows([40, 41, 42], range(len(prompts)), [len(p) for p in prompts], cache)
    for seq, ids in enumerate(prompts):
        alone = model.forward(ids + [40 + seq], 0)
        np.testing.assert_allclose(got[seq], alone, rtol=1e-5, atol=1e-5 * np.abs(alone).max())
    import os
    from qinfer import kernels
    cases = [({"QINFER_KERNELS": "scalar"}, "portable")]
    if kernels.cpu_has_avx2():
        cases.append(({"QINFER_INT8_ISA": "avx2"}, "avx2"))
    for env, loops in cases:
        proc = run_cli("info", env=dict(os.environ, **env))
        assert proc.returncode == 0 and f"W8A8 kernels: {loops}" in proc.stdout, proc.stdout[-2000:]


@needs_tokenizer
@needs_wikitext
def test_smoothquant_checkpoint_and_smooth_option(tiny_src, tmp_path):
    calib = ref.WIKITEXT
    out = tmp_path / "sq"
    report = qinfer.quantize(tiny_src[0], out, method="smoothquant", alpha="auto", smooth_down=True, calib=calib,
                             nsamples=2, seqlen=32, threads=1, progress=False, float_dtype="float32")
    assert report.method == "smoothquant" and report.alpha.startswith("alpha")
    meta = json.loads((out / "quantize_config.json").read_text())["qinfer"]
    assert meta["smooth_down"] is True and meta["nsamples"] == 2 and "auto" in meta["smoothquant_alpha"]
    layers, stored = int8_layers(out, inputs_of(tiny_src[1]))
    cfg = tiny_src[2]
    # the norms carry the division: smoothed and original models agree in float
    weights = {k: v.astype(np.float32) for k, v in stored.items() if k.endswith(".weight")}
    weights.update(dequantized(layers))
    assert not np.allclose(weights["model.layers.0.input_layernorm.weight"],
                           tiny_src[1]["model.layers.0.input_layernorm.weight"])
    ids = np.arange(3, 20)
    engine = qinfer.Engine(out, threads=1)
    want = ref.forward(weights, cfg, ids, linear=w8a8_linear(layers))
    gap = np.abs(ref.forward(weights, cfg, ids) - want).max()
    assert np.abs(engine.logits(ids) - want).max() < 0.05 * gap
    # --smooth before GPTQ-format round to nearest: an ordinary checkpoint, float activations
    rtn = tmp_path / "rtn"
    qinfer.quantize(tiny_src[0], rtn, method="rtn", bits=8, group_size=-1, smooth=0.5, calib=calib, nsamples=2,
                    seqlen=32, threads=1, progress=False)
    assert "input_activations" not in json.loads((rtn / "config.json").read_text())["quantization_config"]
    assert json.loads((rtn / "quantize_config.json").read_text())["qinfer"]["smooth_alpha"] == 0.5
    assert open_model(rtn).activations is None
    base = qinfer.Engine(tiny_src[0], threads=1).logits(ids)
    smoothed = qinfer.Engine(rtn, threads=1).logits(ids)
    assert np.abs(smoothed - base).max() < 0.05 * np.abs(base).max()    # the same model, 8-bit weights


@needs_tokenizer
def test_w4_8_checkpoint_runs_against_the_reference(tiny_src, tmp_path):
    """ZeroQuant's W4/8-A8: the MLP at 4 bits in groups, the attention at 8 bits per row."""
    out = tmp_path / "w4"
    report = qinfer.quantize(tiny_src[0], out, method="zeroquant", bits=4, group_size=32, threads=1, progress=False,
                             float_dtype="float32")
    assert (report.bits, report.group_size) == (4, 32) and "bits 8" in report.summary()
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["dynamic"] == {"+:.*\\.self_attn\\..*": {"bits": 8, "group_size": -1}}
    src_w = tiny_src[1]
    layers, _ = int8_layers(out, inputs_of(src_w))
    for name, (codes, scales, group, bits) in layers.items():
        attention = ".self_attn." in name
        assert (bits, group) == ((8, codes.shape[1]) if attention else (4, 32)), name
        assert np.abs(codes).max() <= (127 if attention else 7)
    engine = qinfer.Engine(out, threads=2)
    held = {(l.bits, l.group_size) for l in engine.model.quantized_layers()}
    assert held == {(8, -1), (4, 32)}
    weights = {k: v for k, v in src_w.items() if k not in layers}
    weights.update(dequantized(layers))
    cfg = tiny_src[2]
    ids = engine.tokenizer.encode(PROMPT, add_bos=True)
    want = ref.forward(weights, cfg, ids, linear=w8a8_linear(layers))
    gap = np.abs(ref.forward(weights, cfg, ids) - want).max()
    got = engine.logits(ids)
    assert np.abs(got - want).max() < 0.05 * gap
    steps = np.stack([engine.model.forward(ids[t:t + 1], t) for t in range(len(ids))])
    np.testing.assert_allclose(steps, got, rtol=1e-5, atol=1e-5 * np.abs(got).max())


@needs_tokenizer
def test_int8_lm_head(write_tiny, tmp_path):
    """--int8-lm-head: a tied model's head becomes an untied int8 W8A8 layer (the embedding stays
    float), run on the int8-activation kernels, its logits as the reference's with the head's
    input rounded per token too."""
    src, src_w, cfg = write_tiny("w8a8_tied", tied=True, seed=12)
    out = tmp_path / "head"
    report = qinfer.quantize(src, out, method="zeroquant", lm_head=True, threads=1, progress=False,
                             float_dtype="float32")
    assert "int8 LM head" in report.summary()
    written = json.loads((out / "config.json").read_text())
    assert written["tie_word_embeddings"] is False
    assert json.loads((out / "quantize_config.json").read_text())["qinfer"]["int8_lm_head"] is True
    layers, stored = int8_layers(out, dict(inputs_of(src_w), **{"lm_head.weight": cfg["hidden_size"]}))
    assert "lm_head.weight" in layers and "lm_head.weight" not in stored
    codes, scales, _, bits = layers["lm_head.weight"]
    emb = src_w["model.embed_tokens.weight"]
    assert bits == 8 and np.abs(codes * scales - emb).max() <= 0.5 * scales.max() * (1 + 1e-3)
    np.testing.assert_array_equal(stored["model.embed_tokens.weight"], emb)         # the lookup stays float
    engine = qinfer.Engine(out, threads=2)
    assert any(isinstance(l, Int8Linear) and l.shape == emb.shape for l in engine.model.quantized_layers())
    weights = {k: v for k, v in src_w.items() if k not in layers}
    weights.update(dequantized(layers))
    ref_cfg = dict(cfg, tie_word_embeddings=False)
    ids = engine.tokenizer.encode(PROMPT, add_bos=True)
    want = ref.forward(weights, ref_cfg, ids, linear=w8a8_linear(layers), head_linear=True)
    gap = np.abs(ref.forward(weights, ref_cfg, ids) - want).max()
    got = engine.logits(ids)
    assert np.abs(got - want).max() < 0.05 * gap
    steps = np.stack([engine.model.forward(ids[t:t + 1], t) for t in range(len(ids))])
    np.testing.assert_allclose(steps, got, rtol=1e-5, atol=1e-5 * np.abs(got).max())
    # with grouped block weights the head keeps one scale a row: a 'dynamic' rule says so to the reader
    grouped = tmp_path / "grouped"
    qinfer.quantize(src, grouped, method="zeroquant", group_size=32, lm_head=True, threads=1, progress=False)
    qc = json.loads((grouped / "config.json").read_text())["quantization_config"]
    assert qc["dynamic"] == {"+:lm_head$": {"bits": 8, "group_size": -1}}
    heads = [l for l in qinfer.Engine(grouped, threads=1).model.quantized_layers() if l.shape == emb.shape]
    assert len(heads) == 1 and heads[0].group_size == -1
    with pytest.raises(QinferError, match="int8-lm-head"):
        qinfer.quantize(src, tmp_path / "x", method="rtn", lm_head=True, progress=False)


# ------------------------------------------------------------------ errors
@needs_tokenizer
def test_bad_settings_are_refused_and_nothing_is_written(tiny_src, tmp_path):
    out = tmp_path / "never"
    cases = [
        (dict(method="smoothquant", alpha=1.5, calib="x"), QinferError, "alpha"),
        (dict(method="smoothquant", alpha=-0.1, calib="x"), QinferError, "alpha"),
        (dict(method="zeroquant", bits=6), UnsupportedError, "6 bits"),
        (dict(method="smoothquant", a_bits=4, calib="x"), UnsupportedError, "activations at 4 bits"),
        (dict(method="zeroquant", act_order=True), QinferError, "act_order"),
        (dict(method="zeroquant", sym=True), QinferError, "sym"),
        (dict(method="zeroquant", alpha=0.5), QinferError, "alpha"),
        (dict(method="smoothquant"), QinferError, "calibration text"),
        (dict(method="gptq", alpha=0.5, calib="x"), QinferError, "alpha"),
        (dict(method="spqr", smooth=0.5, calib="x"), QinferError, "smooth"),
        (dict(method="rtn", smooth=0.5), QinferError, "calibration"),
        (dict(method="rtn", smooth_down=True), QinferError, "smooth_down"),
        (dict(method="zeroquant", group_size=128), UnsupportedError, "groups of 128"),
    ]
    for kwargs, error, words in cases:
        with pytest.raises(error, match=words):
            qinfer.quantize(tiny_src[0], out, progress=False, **kwargs)
        assert not out.exists() and not leftovers(tmp_path), kwargs


@needs_tokenizer
def test_short_calibration_file_is_refused(tiny_src, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    with pytest.raises(QinferError, match="fewer than one window"):
        qinfer.quantize(tiny_src[0], tmp_path / "out", method="smoothquant", calib=short, seqlen=64, nsamples=2,
                        progress=False)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


@needs_tokenizer
def test_edited_activation_settings_are_refused(zeroquant, tmp_path):
    out, _ = zeroquant
    for key, value, words in (("num_bits", 4, "num_bits"), ("strategy", "tensor", "strategy"),
                              ("dynamic", False, "dynamic"), ("symmetric", False, "symmetric"),
                              ("group_size", 64, "group_size")):
        def change(qc, key=key, value=value):
            qc["input_activations"][key] = value
        refused(out, tmp_path / key, edit_settings(change), UnsupportedError, "input_activations", words)
    refused(out, tmp_path / "kind", edit_settings(lambda qc: qc.update(input_activations="int8")), FormatError,
            "input_activations")
    refused(out, tmp_path / "bits", edit_settings(lambda qc: qc.update(bits=3), ("config.json",
                                                                                  "quantize_config.json")),
            UnsupportedError, "8- or 4-bit")
    refused(out, tmp_path / "negative", edit_settings(lambda qc: qc.update(dynamic={"-:.*o_proj": {}}),
                                                      ("config.json", "quantize_config.json")),
            UnsupportedError, "leaves layers float")


@needs_tokenizer
def test_asymmetric_weights_with_int8_activations_are_refused(tiny_src, tmp_path):
    out = tmp_path / "asym"
    qinfer.quantize(tiny_src[0], out, method="rtn", bits=8, group_size=-1, progress=False)

    def add(qc):
        qc["input_activations"] = {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True,
                                   "strategy": "token"}
    edit_settings(add)(out)
    with pytest.raises(FormatError, match="zero point 128") as info:
        qinfer.Engine(out, threads=1)
    assert "model.layers.0" in str(info.value)


@needs_tokenizer
@needs_wikitext
def test_command_line(tiny_src, tmp_path):
    out = tmp_path / "cli"
    proc = run_cli("quantize", "--model", str(tiny_src[0]), "--method", "smoothquant", "--alpha", "0.5",
                   "--w-bits", "8", "--a-bits", "8", "--calib", str(ref.WIKITEXT), "--nsamples", "2",
                   "--seqlen", "32", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "smoothquant 8-bit" in proc.stderr and "activations int8 per token, alpha 0.5" in proc.stderr
    proc = run_cli("generate", "--model", str(out), "--prompt", "Hello", "--max-new-tokens", "3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for args, words in ((("--alpha", "2"), ("alpha",)), (("--alpha", "x"), ("alpha",)),
                        (("--a-bits", "4"), ("activations at 4 bits",)),
                        (("--w-bits", "6"), ("6 bits",)), (("--bits", "8", "--w-bits", "8"), ("--w-bits",))):
        proc = run_cli("quantize", "--model", str(tiny_src[0]), "--method", "smoothquant", "--calib",
                       str(ref.WIKITEXT), "--out", str(tmp_path / "bad"), *args)
        # the library's refusals exit 1, the parser's (a value it cannot take) 2; one line either way
        assert proc.returncode in (1, 2) and "Traceback" not in proc.stderr, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "error:" in lines[0], proc.stderr
        assert all(w in lines[0] for w in words), (words, lines[0])
        assert not (tmp_path / "bad").exists()
