"""The KV cache's memory (issue 36, "memory that follows use"): resident memory grows with
the tokens held, not with --ctx; a context whose full cache cannot fit in the memory the
machine has available is a clear error at load (model.check_cache_fits, the probe in
qinfer/memory.py); `qinfer info --model` prints the cache's bytes per token in each format.

SmolLM2-135M-Instruct's shape (its published config): 30 layers, 3 KV heads of 64
dimensions, a trained context of 8192 tokens.
"""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_reference as ref  # noqa: E402

import qinfer  # noqa: E402
from qinfer import memory  # noqa: E402
from qinfer.errors import QinferError  # noqa: E402
from helpers import assert_user_error, needs_smollm2, run_cli  # noqa: E402

LAYERS, KV_HEADS, HEAD_DIM, TRAINED = 30, 3, 64, 8192
VALUE_BYTES = {"f32": 4, "f16": 2}


def per_token(fmt):
    return 2 * LAYERS * KV_HEADS * HEAD_DIM * VALUE_BYTES[fmt]


@pytest.fixture
def smollm2():
    return ref.smollm2_path()


@pytest.fixture
def little_memory(monkeypatch):
    """The machine has 64 MiB available, less than SmolLM2's f32 cache of its trained context (360 MiB)."""
    monkeypatch.setattr(memory, "available_bytes", lambda: 64 * 2**20)


# ------------------------------------------------------------------ the probe
def test_available_bytes_reads_meminfo(tmp_path):
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:       16000000 kB\nMemFree:         1000000 kB\n"
                 "MemAvailable:    8000000 kB\nSwapTotal:       2000000 kB\nSwapFree:        1500000 kB\n")
    assert memory.available_bytes(f) == (8000000 + 1500000) * 1024
    f.write_text("MemTotal:       16000000 kB\nMemAvailable:    8000000 kB\n")       # no swap line
    assert memory.available_bytes(f) == 8000000 * 1024
    f.write_text("MemTotal:       16000000 kB\n")                                  # unknown: no check
    assert memory.available_bytes(f) is None
    assert memory.available_bytes(tmp_path / "absent") is None


def test_check_cache_fits_unit(monkeypatch):
    from types import SimpleNamespace

    from qinfer.model import check_cache_fits
    cfg = SimpleNamespace(num_hidden_layers=LAYERS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM)
    monkeypatch.setattr(memory, "available_bytes", lambda: None)               # unknown: not checked
    assert check_cache_fits(cfg, "f32", 10**6) == per_token("f32") * 10**6
    monkeypatch.setattr(memory, "available_bytes", lambda: 2**30)
    assert check_cache_fits(cfg, "f16", 1000, seqs=4) == 4 * 1000 * per_token("f16")
    with pytest.raises(QinferError) as e:
        check_cache_fits(cfg, "f32", 8192, seqs=4)                               # 1.4 GiB
    msg = str(e.value)
    fit = 2**30 // 4 // per_token("f32")
    assert "8192 tokens x 4 sequences" in msg and "1.4 GiB" in msg and "1.0 GiB" in msg, msg
    assert f"at most {fit} tokens" in msg and "--kv-cache (f16" in msg, msg
    assert "\n" not in msg


# ------------------------------------------------------------------ the error at load
@needs_smollm2
def test_engine_refuses_a_cache_that_cannot_fit(smollm2, little_memory):
    with pytest.raises(QinferError, match="context of 8192 tokens") as e:
        qinfer.Engine(smollm2)                                          # the default: the trained context
    assert "360.0 MiB" in str(e.value) and "64.0 MiB" in str(e.value)
    with pytest.raises(QinferError, match="context of 4096 tokens"):
        qinfer.Engine(smollm2, ctx=4096)                                # 180 MiB in f32
    with pytest.raises(QinferError, match=r"context of 4096 tokens \(f16\)"):
        qinfer.Engine(smollm2, ctx=4096, kv_cache="f16")                # 90 MiB


@needs_smollm2
def test_model_refuses_a_cache_that_cannot_fit(smollm2, little_memory):
    from qinfer.model import Model
    from qinfer.readers import open_model
    with pytest.raises(QinferError, match="context of 2048 tokens"):
        Model(open_model(smollm2), ctx=2048)                            # 90 MiB in f32


@needs_smollm2
def test_cli_error_is_one_line(smollm2, little_memory, capsys):
    from qinfer.cli import main
    assert main(["generate", "--model", smollm2, "--ctx", "4096", "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip("\n").splitlines()) == 1, err
    assert err.startswith("qinfer: error: the KV cache for a context of 4096 tokens"), err
    assert "Traceback" not in err


@needs_smollm2
def test_cli_error_with_the_real_probe(smollm2):
    # 2**31 - 1 tokens of 46080 bytes: 90 TiB, more than any machine has. The check comes
    # before the warning on a context beyond the trained one, so the error is the one line.
    proc = run_cli("generate", "--model", smollm2, "--ctx", 2**31 - 1, "--prompt", "hi")
    assert_user_error(proc, "context of 2147483647 tokens", "available", "--ctx")


# ------------------------------------------------------------------ qinfer info --model
def _cache_rows(out):
    """{format: (marked, bytes per token, whole-context text)} of `qinfer info --model`'s table."""
    rows = {}
    for line in out.splitlines():
        if "B/token" not in line:
            continue
        head, tail = line.split("B/token")
        words = head.split()
        marked = words[0] == "*"
        rows[words[1] if marked else words[0]] = (marked, int(words[-1]), tail.strip())
    return rows


@needs_smollm2
def test_info_model_prints_bytes_per_token(smollm2):
    proc = run_cli("info", "--model", smollm2)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "Kernel parameters" in proc.stdout                   # the CPU part is still there, first
    assert proc.stdout.index("Kernel parameters") < proc.stdout.index("Shape:")
    assert (f"{LAYERS} layers, 9 heads, {KV_HEADS} KV heads, head dim {HEAD_DIM}, "
            f"trained context {TRAINED} tokens") in proc.stdout
    rows = _cache_rows(proc.stdout)
    assert set(rows) >= {"f32", "f16"}
    for fmt in ("f32", "f16"):
        marked, bytes_per_token, full = rows[fmt]
        assert marked == (fmt == "f32")                          # the default format
        assert bytes_per_token == per_token(fmt)
        assert full.startswith(f"{per_token(fmt) * TRAINED / 2**20:.1f} MiB")


@needs_smollm2
def test_info_model_ctx_and_format(smollm2):
    proc = run_cli("info", "--model", smollm2, "--ctx", 1000, "--kv-cache", "f16")
    assert proc.returncode == 0, proc.stderr
    rows = _cache_rows(proc.stdout)
    assert rows["f16"] == (True, per_token("f16"), f"{per_token('f16') * 1000 / 2**20:.1f} MiB")
    assert rows["f32"][:2] == (False, per_token("f32"))
    kvquant = run_cli("info", "--model", smollm2, "--kv-cache", "kvquant4")   # no calibration needed to size it
    assert kvquant.returncode == 0, kvquant.stderr
    assert _cache_rows(kvquant.stdout)["kvquant4"][0] is True
    assert_user_error(run_cli("info", "--model", smollm2, "--kv-cache", "kivi4", "--kv-residual", "33"),
                      "multiple of the group")


# ------------------------------------------------------------------ memory follows use
RSS_SCRIPT = textwrap.dedent("""
    import json, sys, warnings
    import qinfer

    def rss():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

    warnings.simplefilter("ignore")               # a context beyond the trained one
    before = rss()
    engine = qinfer.Engine(sys.argv[1], ctx=int(sys.argv[2]), kv_cache="f32", threads=1)
    loaded = rss()
    engine.generate("The capital of France is", max_new_tokens=8)
    print(json.dumps(dict(before=before, loaded=loaded, generated=rss(), pos=engine.pos)))
""")


@needs_smollm2
def test_resident_memory_follows_use(smollm2):
    if not Path("/proc/self/status").exists():
        pytest.skip("no /proc/self/status (VmRSS) on this system")
    if Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "2":
        pytest.skip("strict overcommit: the whole cache is committed at allocation")
    ctx = 65536
    full = per_token("f32") * ctx                                # 2.8 GiB
    available = memory.available_bytes()
    if available is not None and available < full:
        pytest.skip(f"{full} bytes for the full cache are more than the {available} available")
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, smollm2, str(ctx)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["pos"] > 0
    # Weights, buffers and the few tokens held: about 160 MiB, against a 2.8 GiB cache.
    assert r["generated"] - r["before"] < 0.25 * full, (r, full)
