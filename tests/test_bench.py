"""`qinfer bench` (qinfer/bench.py) on tiny random models (tests/llama_reference.py):
the JSON rows, the forward calls each test makes (tokens and positions), the
tokens/s recomputed from the per-run seconds, the weight sizes against a count
from the config, and the errors a user gets. Speed itself is never asserted.
"""
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_reference as ref  # noqa: E402

import qinfer  # noqa: E402
from helpers import assert_user_error, run_cli, skip_without_tokenizer  # noqa: E402
from qinfer import QinferError  # noqa: E402
from qinfer.bench import bench, parse_threads, weight_summary  # noqa: E402


@pytest.fixture(scope="module")
def tiny(write_tiny):
    return write_tiny("tiny_bench", tied=False, seed=5)


def q_bytes(out_f, in_f, bits, group, scale_bytes=4):
    """Packed codes + a scale and zero per group and output column (float32: 4 bytes, float16: 2)."""
    return out_f * in_f * bits // 8 + 2 * scale_bytes * (in_f // group) * out_f


def expected_sizes(config, bits=None, group=None, head_bits=8):
    """(all weights, weights read per decoded token) counted from the config alone; quantized
    on load, so with float16 scales and zeros."""
    d, ff, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = d // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    maps = [(q, d), (kv, d), (kv, d), (d, q), (ff, d), (ff, d), (d, ff)]
    per_layer = sum(q_bytes(o, i, bits, group, 2) if bits else 4 * o * i for o, i in maps) + 2 * 4 * d
    blocks = config["num_hidden_layers"] * per_layer + 4 * d            # + final norm
    embedding = 4 * vocab * d
    head = q_bytes(vocab, d, head_bits, group, 2) if bits else 4 * vocab * d
    if config["tie_word_embeddings"] and not bits:
        return blocks + embedding, blocks + embedding
    return blocks + embedding + head, blocks + 4 * d + head


def test_size_formula_is_what_a_layer_holds(tiny):
    _, weights, _ = tiny
    w = weights["model.layers.0.mlp.down_proj.weight"]          # [64, 160]
    for bits, group in ((4, 32), (8, 32), (3, 32), (4, 16)):
        layer = qinfer.QuantizedLinear.from_float(w, bits, group)     # float32 scales
        assert layer.nbytes == q_bytes(*w.shape, bits, group)
        half = qinfer.QuantizedLinear.from_packed(layer.qweight, layer.scales.astype(np.float16),
                                                  layer.zeros, bits, group)
        assert half.scale_dtype == "float16" and half.nbytes == q_bytes(*w.shape, bits, group, 2)
        sym = qinfer.QuantizedLinear.from_float(w, bits, group, sym=True)   # one zero, 2^(b-1), per column
        groups = w.shape[1] // group
        assert sym.zero_groups == 1 and sym.nbytes == q_bytes(*w.shape, bits, group) - 4 * (groups - 1) * w.shape[0]


def test_cli_json_rows_and_times(tiny):
    d, _, config = tiny
    t0 = time.perf_counter()
    proc = run_cli("bench", "--model", d, "-p", 12, "-n", 5, "-t", "1,2", "-r", 2, "--quantize", 4, "--group-size", 32,
                   "--json")
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [(r["threads"], r["test"]) for r in rows] == [(1, "pp12"), (1, "tg5"), (2, "pp12"), (2, "tg5")]
    size, decode = expected_sizes(config, bits=4, group=32)
    for r in rows:
        pp = r["test"] == "pp12"
        assert (r["n_prompt"], r["n_gen"], r["n_tokens"]) == ((12, 0, 12) if pp else (0, 5, 5))
        assert r["model"] == d.name and r["bits"] == "4" and r["group"] == "32" and r["lm_head"] == "8-bit g32"
        assert r["size_bytes"] == size and r["decode_bytes"] == decode
        assert r["repetitions"] == 2 and len(r["seconds"]) == 2 and len(r["samples_ts"]) == 2
        assert all(0 < s < wall for s in r["seconds"])
        ts = [r["n_tokens"] / s for s in r["seconds"]]
        assert r["samples_ts"] == pytest.approx(ts, rel=1e-9)
        assert r["avg_ts"] == pytest.approx(statistics.fmean(ts), rel=1e-9)
        assert r["stddev_ts"] == pytest.approx(statistics.stdev(ts), rel=1e-9)
        assert r["ctx"] == 17
        # the weights are resident, so the peak RSS is at least their size
        assert r["peak_rss_kib"] * 1024 >= size
    assert sum(s for r in rows for s in r["seconds"]) < wall


def test_cli_table(tiny):
    d, _, _ = tiny
    proc = run_cli("bench", "--model", d, "-p", 0, "-n", 3, "-t", 1, "-r", 1)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split("|")[1].strip() == "model" and "t/s" in lines[0]
    body = [line for line in lines[2:] if line.startswith("|")]
    assert len(body) == 1                                   # -p 0 skips the prefill test
    cells = [c.strip() for c in body[0].strip("|").split("|")]
    assert cells[0] == d.name and cells[3] == "f32" and cells[4] == "float" and cells[7] == "tg3"
    assert lines[-2].startswith("peak resident memory:") and "MiB" in lines[-2]
    cfg = qinfer.Engine(d, threads=1).config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
    assert lines[-1].startswith(f"KV cache: f32, {per_token} bytes per token"), lines[-1]


def test_forward_calls_tokens_and_positions(tiny):
    d, _, config = tiny
    engine = qinfer.Engine(d, threads=1, ctx=32)
    calls = []
    forward = engine.model.forward

    def recording(tokens, pos, all_logits=False, threads=None):
        calls.append((list(np.asarray(tokens)), pos, threads))
        return forward(tokens, pos, all_logits, threads)

    engine.model.forward = recording
    results = bench(engine, n_prompt=7, n_gen=3, threads=[2], repetitions=2, seed=3)
    assert [(r.test, r.threads, r.n_tokens, len(r.seconds)) for r in results] == [("pp7", 2, 7, 2), ("tg3", 2, 3, 2)]
    shape = [(len(t), pos, th) for t, pos, th in calls]
    # warm-up prefill, 2 timed prefills from position 0; a 1-token warm-up, 2 x 3 decode steps from 0
    assert shape == [(7, 0, 2)] * 3 + [(1, 0, 2)] + [(1, 0, 2), (1, 1, 2), (1, 2, 2)] * 2
    ids = [t for tokens, _, _ in calls for t in tokens]
    assert all(0 <= t < config["vocab_size"] for t in ids) and len(set(ids)) > len(ids) // 2
    assert engine.pos == 0                                   # the cache is left empty

    calls.clear()
    bench(engine, n_prompt=7, n_gen=3, threads=[2], repetitions=2, seed=3)
    again = [t for tokens, _, _ in calls for t in tokens]
    assert again == ids                                      # the seed fixes the token ids
    calls.clear()
    bench(engine, n_prompt=7, n_gen=3, threads=[2], repetitions=2, seed=4)
    assert [t for tokens, _, _ in calls for t in tokens] != ids


def test_weight_summary_float_and_tied(tmp_path):
    skip_without_tokenizer()
    _, config = ref.write_tiny_llama(tmp_path, tied=True, seed=2)
    s = weight_summary(qinfer.Engine(tmp_path, threads=1, ctx=8))
    assert (s.bits, s.group, s.lm_head) == ("f32", "float", "f32 (tied)")
    assert (s.nbytes, s.decode_bytes) == expected_sizes(config)
    s = weight_summary(qinfer.Engine(tmp_path, threads=1, ctx=8, quantize=8, group_size=16))
    assert (s.bits, s.group, s.lm_head) == ("8", "16", "8-bit g16")
    assert (s.nbytes, s.decode_bytes) == expected_sizes(config, bits=8, group=16)


@pytest.mark.parametrize("spec, expected", [("1,2", [1, 2]), (" 4 ", [4]), (3, [3]), ([2, 1], [2, 1])])
def test_parse_threads(spec, expected):
    assert parse_threads(spec) == expected


@pytest.mark.parametrize("spec", ["", "1,", "a", "1,x", "0", "-2", "1.5", [], [1, True]])
def test_bad_thread_lists(spec):
    with pytest.raises(QinferError, match="thread"):
        parse_threads(spec)


def test_bad_counts_in_the_api(tiny):
    d, _, _ = tiny
    engine = qinfer.Engine(d, threads=1, ctx=16)
    for kwargs, word in [(dict(n_prompt=0, n_gen=0), "nothing to run"), (dict(n_prompt=-1), "-p"),
                         (dict(repetitions=0), "-r"), (dict(n_prompt=10, n_gen=7), "context")]:
        with pytest.raises(QinferError, match=word):
            bench(engine, **dict(dict(n_prompt=4, n_gen=2, threads=[1]), **kwargs))


@pytest.mark.parametrize("args, words", [
    (["-t", "1,x"], ["thread", "1,x"]),
    (["-t", "0"], ["thread"]),
    (["-p", "0", "-n", "0"], ["nothing to run"]),
    (["-r", "0"], ["-r"]),
    (["-p", "200", "-n", "100"], ["300", "context of 256"]),
])
def test_cli_errors(tiny, args, words):
    d, _, _ = tiny
    assert_user_error(run_cli("bench", "--model", d, *args), *words)


def test_cli_missing_model(tmp_path):
    assert_user_error(run_cli("bench", "--model", tmp_path / "nothing.gguf", "-p", 4, "-n", 2), "no such file")
