"""config.json fields: read correctly in either transformers shape, or refused naming the field.

transformers 4 writes the RoPE base and scaling as top-level `rope_theta` and
`rope_scaling`; transformers 5 writes one `rope_parameters` dict (with
`rope_type` and `rope_theta` inside, no top-level rope_theta). The same random
tiny weights (tests/llama_reference.py) under both shapes must give the same
logits, and those of the float64 reference. Every field that would change the
maths in a way qinfer does not implement, or that contradicts another, must
be refused with a QinferError naming it, through the API and the CLI.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_reference as ref  # noqa: E402
from helpers import needs_tokenizer  # noqa: E402

import qinfer  # noqa: E402
from qinfer.errors import FormatError, QinferError, UnsupportedError  # noqa: E402
from qinfer.readers import open_model  # noqa: E402
from qinfer.readers.hf_config import model_config  # noqa: E402

pytestmark = needs_tokenizer

LOGIT_TOL = 1e-3          # engine (float32) vs. the float64 reference, as in test_engine.py
THETA = 100000.0          # not the 10000 a reader falling back to the default would use
IDS = np.random.default_rng(0).integers(0, 32000, size=100).tolist()


def max_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def to_v5(cfg):
    """A transformers 4 config (top-level rope_theta, rope_scaling) in transformers 5's shape."""
    c = dict(cfg)
    theta = c.pop("rope_theta")
    scaling = c.pop("rope_scaling", None)
    c["rope_parameters"] = dict(scaling or {"rope_type": "default"}, rope_theta=theta)
    return c


def variant(base, dest, cfg):
    """A checkpoint directory sharing base's files (symlinks) with its own config.json."""
    dest = Path(dest)
    dest.mkdir()
    for f in Path(base).iterdir():
        if f.name != "config.json":
            (dest / f.name).symlink_to(f)
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    return dest


def logits(directory):
    return qinfer.Engine(directory, threads=1).logits(IDS)


@pytest.fixture(scope="module")
def untied(write_tiny):
    return write_tiny("untied", tied=False, seed=21, rope_theta=THETA)


@pytest.fixture(scope="module")
def tied(write_tiny):
    return write_tiny("tied", tied=True, seed=22, rope_theta=THETA)


# ----------------------------------------------------------------- both shapes, same model
@pytest.mark.parametrize("theta, scaling", [(THETA, None), (500000.0, ref.LLAMA3_SCALING)],
                         ids=["default", "llama3"])
def test_v4_and_v5_configs_give_the_same_logits(tmp_path, theta, scaling):
    weights, v4 = ref.write_tiny_llama(tmp_path / "v4", tied=False, seed=5, rope_theta=theta, rope_scaling=scaling)
    v5 = to_v5(v4)
    assert "rope_theta" not in v5 and "rope_scaling" not in v5
    d5 = variant(tmp_path / "v4", tmp_path / "v5", v5)

    expected = ref.forward(weights, v4, IDS)
    # the RoPE base and scaling matter for this sequence, or the test says nothing
    assert max_err(ref.forward(weights, dict(v4, rope_theta=10000.0, rope_scaling=None), IDS), expected) \
        > 10 * LOGIT_TOL
    if scaling:
        assert max_err(ref.forward(weights, dict(v4, rope_scaling=None), IDS), expected) > 10 * LOGIT_TOL

    got4, got5 = logits(tmp_path / "v4"), logits(d5)
    assert max_err(got4, expected) <= LOGIT_TOL
    assert max_err(got5, expected) <= LOGIT_TOL
    np.testing.assert_array_equal(got4, got5)
    c5 = open_model(d5).config
    assert c5.rope_theta == theta
    assert c5.rope_scaling == scaling


def test_v5_theta_only_in_rope_parameters_is_read(untied, tmp_path):
    base, _, cfg = untied
    d = variant(base, tmp_path / "v5", to_v5(cfg))
    assert json.loads((d / "config.json").read_text())["rope_parameters"] == {"rope_type": "default",
                                                                              "rope_theta": THETA}
    c = open_model(d).config
    assert c.rope_theta == THETA and c.rope_scaling is None


def test_explicit_head_dim_is_honoured(tmp_path):
    """head_dim 32 with hidden_size 64 and 4 heads (q is 128 wide): the forward pass takes head_dim."""
    weights, cfg = ref.write_tiny_llama(tmp_path, tied=False, seed=7, head_dim=32, rope_theta=THETA)
    assert cfg["hidden_size"] // cfg["num_attention_heads"] != 32
    assert weights["model.layers.0.self_attn.q_proj.weight"].shape == (128, 64)
    eng = qinfer.Engine(tmp_path, threads=1)
    assert eng.config.head_dim == 32
    assert max_err(eng.logits(IDS), ref.forward(weights, cfg, IDS)) <= LOGIT_TOL


# ----------------------------------------------------------------- accepted spellings
def read(cfg):
    return model_config(cfg, "config.json")


@pytest.mark.parametrize("extra, theta, scaling", [
    # both shapes given, agreeing
    (dict(rope_theta=THETA, rope_parameters={"rope_type": "default", "rope_theta": THETA}), THETA, None),
    (dict(rope_theta=5e5, rope_scaling=ref.LLAMA3_SCALING, rope_parameters=dict(ref.LLAMA3_SCALING, rope_theta=5e5)),
     5e5, ref.LLAMA3_SCALING),
    # rope_scaling null beside rope_parameters: transformers 5 reads rope_parameters
    (dict(rope_scaling=None, rope_parameters=dict(ref.LLAMA3_SCALING, rope_theta=5e5)), 5e5, ref.LLAMA3_SCALING),
    # the older key "type"; no rope_type at all means default
    (dict(rope_parameters={"type": "default", "rope_theta": THETA}), THETA, None),
    (dict(rope_parameters={"rope_theta": THETA}), THETA, None),
    (dict(rope_scaling={"type": "llama3", "factor": 8, "low_freq_factor": 1, "high_freq_factor": 4,
                        "original_max_position_embeddings": 64}), 10000.0, ref.LLAMA3_SCALING),
    # original_max_position_embeddings at the top level (transformers 5 reads it there too), or 64.0
    (dict(original_max_position_embeddings=64, rope_parameters={
        k: v for k, v in ref.LLAMA3_SCALING.items() if k != "original_max_position_embeddings"}), 10000.0,
     ref.LLAMA3_SCALING),
    (dict(rope_parameters=dict(ref.LLAMA3_SCALING, original_max_position_embeddings=64.0)), 10000.0,
     ref.LLAMA3_SCALING),
    # harmless fields
    (dict(pretraining_tp=2, hidden_act="swish", sliding_window=None, attention_bias=False, mlp_bias=None,
          partial_rotary_factor=1.0, layer_types=["full_attention"] * 2), 10000.0, None),
    (dict(use_sliding_window=False, sliding_window=4096), 10000.0, None),
], ids=["both-default", "both-llama3", "scaling-null", "type-key", "no-rope-type", "v4-type-llama3",
        "top-level-original-max", "original-max-float", "harmless", "window-off"])
def test_accepted_configs(untied, extra, theta, scaling):
    cfg = {k: v for k, v in untied[2].items() if k not in ("rope_theta", "rope_scaling")}
    c = read(dict(cfg, **extra))
    assert c.rope_theta == theta
    want = None if scaling is None else {k: (int(v) if k == "original_max_position_embeddings" else
                                             v if k == "rope_type" else float(v)) for k, v in scaling.items()}
    assert c.rope_scaling == want


# ----------------------------------------------------------------- refused, naming the field
def drop(cfg, *keys):
    return {k: v for k, v in cfg.items() if k not in keys}


L3 = ref.LLAMA3_SCALING
REFUSED = [
    # (id, base, config edit, words the message must hold, error class)
    ("rope-type-yarn", "untied", lambda c: dict(drop(c, "rope_theta"), rope_parameters={
        "rope_type": "yarn", "rope_theta": THETA, "factor": 4.0, "original_max_position_embeddings": 64}),
     ["rope_parameters.rope_type", "yarn"], UnsupportedError),
    ("rope-type-linear-v4", "untied", lambda c: dict(c, rope_scaling={"rope_type": "linear", "factor": 2.0}),
     ["rope_scaling.rope_type", "linear"], UnsupportedError),
    ("rope-type-dynamic-old-key", "untied", lambda c: dict(c, rope_scaling={"type": "dynamic", "factor": 2.0}),
     ["rope_scaling.rope_type", "dynamic"], UnsupportedError),
    ("rope-per-layer-type", "untied", lambda c: dict(drop(c, "rope_theta"), rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": THETA}}),
     ["rope_parameters", "layer type", "full_attention"], UnsupportedError),
    ("rope-unknown-key", "untied", lambda c: dict(drop(c, "rope_theta"), rope_parameters={
        "rope_type": "default", "rope_theta": THETA, "factor": 2.0}),
     ["rope_parameters.factor"], UnsupportedError),
    ("partial-rotary", "untied", lambda c: dict(c, partial_rotary_factor=0.5),
     ["partial_rotary_factor"], UnsupportedError),
    ("partial-rotary-inside", "untied", lambda c: dict(drop(c, "rope_theta"), rope_parameters={
        "rope_type": "default", "rope_theta": THETA, "partial_rotary_factor": 0.5}),
     ["rope_parameters.partial_rotary_factor"], UnsupportedError),
    ("attention-bias", "untied", lambda c: dict(c, attention_bias=True), ["attention_bias"], UnsupportedError),
    ("mlp-bias", "untied", lambda c: dict(c, mlp_bias=True), ["mlp_bias"], UnsupportedError),
    ("bias-not-bool", "untied", lambda c: dict(c, attention_bias="false"), ["attention_bias"], FormatError),
    ("sliding-window", "untied", lambda c: dict(c, sliding_window=4096), ["sliding_window"], UnsupportedError),
    ("use-sliding-window", "untied", lambda c: dict(c, use_sliding_window=True), ["use_sliding_window"],
     UnsupportedError),
    ("layer-types", "untied", lambda c: dict(c, layer_types=["sliding_attention", "full_attention"]),
     ["layer_types", "sliding_attention"], UnsupportedError),
    ("hidden-act", "untied", lambda c: dict(c, hidden_act="gelu"), ["hidden_act", "gelu"], UnsupportedError),
    ("theta-contradiction", "untied", lambda c: dict(c, rope_theta=10000.0, rope_parameters={
        "rope_type": "default", "rope_theta": THETA}), ["rope_theta", "rope_parameters.rope_theta"], FormatError),
    ("scaling-contradiction", "untied", lambda c: dict(c, rope_scaling=L3, rope_parameters={
        "rope_type": "default", "rope_theta": THETA}), ["rope_parameters", "rope_scaling"], FormatError),
    ("scaling-factor-contradiction", "untied", lambda c: dict(c, rope_scaling=L3, rope_parameters=dict(
        L3, factor=16.0)), ["rope_parameters", "rope_scaling"], FormatError),
    ("type-vs-rope-type", "untied", lambda c: dict(c, rope_scaling=dict(L3, type="linear")),
     ["rope_scaling.rope_type", "rope_scaling.type"], FormatError),
    ("original-max-contradiction", "untied", lambda c: dict(c, rope_scaling=L3,
                                                            original_max_position_embeddings=128),
     ["original_max_position_embeddings", "rope_scaling.original_max_position_embeddings"], FormatError),
    ("original-max-missing", "untied", lambda c: dict(drop(c, "rope_theta"), rope_parameters={
        k: v for k, v in dict(L3, rope_theta=THETA).items() if k != "original_max_position_embeddings"}),
     ["rope_parameters.original_max_position_embeddings", "missing"], FormatError),
    ("original-max-half", "untied", lambda c: dict(drop(c, "rope_theta"), rope_parameters=dict(
        L3, rope_theta=THETA, original_max_position_embeddings=0.5)),
     ["rope_parameters.original_max_position_embeddings", "integer"], FormatError),
    ("llama3-factor-below-1", "untied", lambda c: dict(c, rope_scaling=dict(L3, factor=0.5)),
     ["rope_scaling.factor", ">= 1"], FormatError),
    ("theta-below-1", "untied", lambda c: dict(c, rope_theta=0.5), ["rope_theta", ">= 1"], FormatError),
    ("theta-below-1-inside", "untied", lambda c: dict(drop(c, "rope_theta"), rope_parameters={
        "rope_type": "default", "rope_theta": 0.5}), ["rope_parameters.rope_theta", ">= 1"], FormatError),
    ("theta-not-a-number", "untied", lambda c: dict(c, rope_theta="1e5"), ["rope_theta"], FormatError),
    ("rms-norm-eps-large", "untied", lambda c: dict(c, rms_norm_eps=0.1), ["rms_norm_eps", "0.01"], FormatError),
    ("rms-norm-eps-zero", "untied", lambda c: dict(c, rms_norm_eps=0), ["rms_norm_eps"], FormatError),
    ("max-position-2-31", "untied", lambda c: dict(c, max_position_embeddings=2 ** 31),
     ["max_position_embeddings"], FormatError),
    ("head-dim-vs-tensors", "untied", lambda c: dict(c, head_dim=32), ["q_proj", "from the config", "head_dim 32"],
     FormatError),
    ("tied-but-head-differs", "untied", lambda c: dict(c, tie_word_embeddings=True),
     ["tie_word_embeddings", "lm_head.weight", "differs"], FormatError),
    ("untied-without-head", "tied", lambda c: dict(c, tie_word_embeddings=False),
     ["tie_word_embeddings", "lm_head.weight", "missing"], FormatError),
    ("quant-method-awq", "untied", lambda c: dict(c, quantization_config={"quant_method": "awq", "bits": 4}),
     ["quant_method", "awq"], UnsupportedError),
]


def refused_dir(case, bases, tmp_path):
    name, base, edit = case[:3]
    directory, _, cfg = bases[base]
    return variant(directory, tmp_path / name, edit(dict(cfg)))


@pytest.fixture(scope="module")
def bases(untied, tied):
    return {"untied": untied, "tied": tied}


def assert_names(exc, words):
    msg = str(exc)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_through_the_api(case, bases, tmp_path):
    _, _, _, words, kind = case
    d = refused_dir(case, bases, tmp_path)
    with pytest.raises(kind) as info:
        open_model(d)
    assert isinstance(info.value, QinferError)
    assert_names(info.value, words)
    with pytest.raises(kind) as info:
        qinfer.Engine(d, threads=1)
    assert_names(info.value, words)


def test_refused_through_the_cli(bases, tmp_path):
    case = REFUSED[0]
    d = refused_dir(case, bases, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "qinfer", "generate", "--model", str(d), "--prompt", "x"],
                          capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("qinfer: error:"), proc.stderr
    assert_names(lines[0], case[3])


# ----------------------------------------------------------------- tied head, gguf quant_method
def test_tied_head_stored_as_a_copy_loads(tied, tmp_path):
    base, weights, cfg = tied
    d = tmp_path / "copy"
    d.mkdir()
    ref.save_safetensors(dict(weights, **{"lm_head.weight": weights["model.embed_tokens.weight"].copy()}),
                         d / "model.safetensors")
    for f in Path(base).iterdir():
        if f.name != "model.safetensors":
            (d / f.name).symlink_to(f)
    assert "lm_head.weight" not in open_model(d).tensors
    np.testing.assert_array_equal(logits(d), logits(base))


def test_gguf_quant_method_over_float_tensors_loads_as_float(untied, tmp_path):
    """transformers' save_pretrained after loading a GGUF: quant_method "gguf" over float32 tensors."""
    base, weights, cfg = untied
    d = variant(base, tmp_path / "gguf", dict(cfg, quantization_config={"quant_method": "gguf"}))
    got = logits(d)
    np.testing.assert_array_equal(got, logits(base))
    assert max_err(got, ref.forward(weights, cfg, IDS)) <= LOGIT_TOL


def test_gguf_quant_method_over_integer_tensors_is_refused(untied, tmp_path):
    save_file = pytest.importorskip("safetensors.numpy").save_file
    base, weights, cfg = untied
    d = tmp_path / "gguf-int"
    d.mkdir()
    stored = dict(weights, **{"model.layers.0.mlp.up_proj.weight":
                              np.zeros(weights["model.layers.0.mlp.up_proj.weight"].shape, np.int8)})
    save_file(stored, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(dict(cfg, quantization_config={"quant_method": "gguf"})))
    with pytest.raises(UnsupportedError) as info:
        open_model(d)
    assert_names(info.value, ["quant_method", "gguf", "up_proj", "I8"])


# ----------------------------------------------------------------- GGUF metadata
GGUF_REFUSED = [
    # (id, {key: (value type name, value)}, words, error class)
    ("expert-count", {"llama.expert_count": ("UINT32", 8)}, ["llama.expert_count"], UnsupportedError),
    ("heads-do-not-divide", {"llama.embedding_length": ("UINT32", 66), "llama.rope.dimension_count": (None, None)},
     ["llama.embedding_length", "llama.attention.head_count"], FormatError),
    ("freq-base-below-1", {"llama.rope.freq_base": ("FLOAT32", 0.5)}, ["rope_theta", ">= 1"], FormatError),
    ("rms-eps-large", {"llama.attention.layer_norm_rms_epsilon": ("FLOAT32", 0.5)}, ["rms_norm_eps"], FormatError),
    ("context-2-31", {"llama.context_length": ("UINT64", 2 ** 31)}, ["max_position_embeddings"], FormatError),
]


@pytest.mark.parametrize("case", GGUF_REFUSED, ids=[c[0] for c in GGUF_REFUSED])
def test_gguf_config_key_is_refused(case, tmp_path):
    pytest.importorskip("gguf")
    from test_readers import VT, tiny_gguf, tiny_kvs   # the reader tests' GGUF writer

    _, override, words, kind = case
    kvs = tiny_kvs(**{k: (None if t is None else VT[t], v) for k, (t, v) in override.items()})
    path, _, _ = tiny_gguf(tmp_path, kvs=kvs)
    with pytest.raises(kind) as info:
        open_model(path)
    assert_names(info.value, words)
