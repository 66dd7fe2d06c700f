"""`qinfer sweep` and qinfer.sweep: grids of configurations as Ray tasks.

* Grid files: [[grid]] lists multiply out, [[config]] tables add one configuration,
  relative paths are the file's; an unknown method, option or setting, or a file
  that is not TOML: one clear error (the CLI: one line), nothing written.
* A sweep of a tiny model (4 configurations, a calibrated one among them) on a local
  Ray instance gives the serial path's perplexities bit for bit, and the rows say
  which node measured them.
* Faults: a task whose worker is killed is retried and the table is whole; a failing
  configuration is a failed row with its reason while the rest finish; a second run
  takes the finished rows from the cache (and tries the failed one again).
* Files reach a node that lacks them through Ray's object store (shipping.py).
* An unreachable --address: one line, nothing written. Nothing but qinfer.sweep imports ray.
"""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_reference as ref  # noqa: E402
from helpers import needs_tokenizer, needs_wikitext, run_cli  # noqa: E402
from test_imports import MODULES, _fresh, _under, imported_names  # noqa: E402

from qinfer import QinferError  # noqa: E402
from qinfer.sweep import Config, GridError, Sweep, load_grid, run_sweep  # noqa: E402
from qinfer.sweep.shipping import share  # noqa: E402

ray = pytest.importorskip("ray")

CONFIGS = [Config.make("float"), Config.make("rtn", 4, 32), Config.make("rtn", 8, -1), Config.make("gptq", 4, 32)]


def write_grid(path, text):
    path.write_text(text)
    return path


def test_grid_file_multiplies_out(tmp_path):
    data = tmp_path / "text.raw"
    data.write_text("some text\n")
    grid = write_grid(tmp_path / "grid.toml", """
[sweep]
data = "text.raw"
windows = 2
threads = 1

[[grid]]
method = ["rtn", "gptq"]
bits = [4, 3]
group_size = 32

[[config]]
method = "float"

[[config]]
method = "spqr"
bits = 3
outlier_threshold = 0.5
""")
    sweep = load_grid(grid)
    assert sweep.data == str(data) and (sweep.windows, sweep.threads, sweep.seqlen) == (2, 1, 2048)
    assert [c.name for c in sweep.configs] == ["rtn 4-bit g32", "rtn 3-bit g32", "gptq 4-bit g32", "gptq 3-bit g32",
                                               "float32", "spqr 3-bit outlier_threshold=0.5"]
    assert sweep.configs[-1].quantize_options() == {"outlier_threshold": 0.5}
    assert [c.calibrated() for c in sweep.configs] == [False, False, True, True, False, True]
    assert len({c.digest() for c in sweep.configs}) == 6


@pytest.mark.parametrize("text, words", [
    ('[[grid]]\nmethod = ["rtn", "awq"]\n', "unknown method 'awq'"),
    ('[[config]]\nmethod = "rtn"\nbitz = 4\n', "'bitz' is not a setting"),
    ('[[config]]\nbits = 4\n', "needs a method"),
    ('[sweep]\nwindow = 4\n[[config]]\nmethod = "rtn"\n', "[sweep] has no setting 'window'"),
    ('[sweep]\nthreads = "2"\n[[config]]\nmethod = "rtn"\n', "threads must be an integer"),
    ('[[config]]\nmethod = "float"\nbits = 4\n', "float model takes no bits"),
    ('[[config]]\nmethod = "rtn"\n[[config]]\nmethod = "rtn"\n', "named twice"),
    ('[[config]\nmethod = "rtn"\n', "not a TOML grid file"),
])
def test_bad_grid_files_are_refused(tmp_path, text, words):
    (tmp_path / "text.raw").write_text("x\n")
    head = "" if text.startswith("[sweep]") else '[sweep]\ndata = "text.raw"\n'
    if text.startswith("[sweep]"):
        text = text.replace("[sweep]\n", '[sweep]\ndata = "text.raw"\n', 1)
    grid = write_grid(tmp_path / "grid.toml", head + text)
    with pytest.raises(GridError, match=words.replace("[", r"\[").replace("]", r"\]")):
        load_grid(grid)
    out = tmp_path / "out.md"
    proc = run_cli("sweep", str(grid), "--serial", "--cache", str(tmp_path / "cache"), "--out", str(out))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and words in lines[0], proc.stderr
    assert not out.exists() and not (tmp_path / "cache").exists()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, write_tiny):
    directory, _, _ = write_tiny("sweep_tiny", seed=3)
    return directory


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance for this module's sweeps (run_sweep joins it and leaves it running)."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def tiny_sweep(tiny, configs=CONFIGS):
    return Sweep(list(configs), data=str(ref.WIKITEXT), model=str(tiny), windows=2, seqlen=128, nsamples=4,
                 threads=1, decode_tokens=4)


def quiet(_):
    pass


@needs_tokenizer
@needs_wikitext
def test_ray_sweep_equals_the_serial_path(tiny, tmp_path, local_ray):
    serial = run_sweep(tiny_sweep(tiny), tmp_path / "serial", serial=True, log=quiet)
    on_ray = run_sweep(tiny_sweep(tiny), tmp_path / "ray", log=quiet)
    assert serial.failed == on_ray.failed == 0 and serial.ran == on_ray.ran == 4
    for a, b in zip(serial.rows, on_ray.rows):
        assert a["name"] == b["name"]
        assert (a["ppl"], a["nll"], a["tokens"], a["bpw"]) == (b["ppl"], b["nll"], b["tokens"], b["bpw"]), a["name"]
        assert "/" in b["node"] and "/" not in a["node"]          # host/ray-node-id on Ray
    base = serial.rows[0]["ppl"]
    assert len({r["ppl"] for r in serial.rows}) == 4 and all(np.isfinite(r["ppl"]) for r in serial.rows)
    assert serial.rows[2]["ppl"] == pytest.approx(base, rel=0.01)       # 8-bit per row: close to float
    assert serial.calibration and serial.disjoint


@needs_tokenizer
@needs_wikitext
def test_killed_task_is_retried_failures_reported_and_cache_reused(tiny, tmp_path, local_ray):
    marker = str(tmp_path / "killed-once")

    def dies_once(config, spec, node):
        import os
        from qinfer.sweep.runner import execute
        if config.bits == 8 and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)                                   # the worker process dies mid-task
        return execute(config, spec, node)

    configs = CONFIGS[:3] + [Config.make("bcq", 3, 24)]           # BCQ takes no group of 24
    cache = tmp_path / "cache"
    first = run_sweep(tiny_sweep(tiny, configs), cache, max_retries=2, task=dies_once, log=quiet)
    assert os.path.exists(marker)
    assert [r["status"] for r in first.rows] == ["ok", "ok", "ok", "failed"]
    assert first.rows[3]["reason"].startswith("UnsupportedError") and "24" in first.rows[3]["reason"]
    stored = json.loads((cache / "sweep-results.json").read_text())
    assert len(stored) == 3                                          # failed rows are not cached
    second = run_sweep(tiny_sweep(tiny, configs), cache, log=quiet)
    assert (second.cached, second.ran, second.failed) == (3, 1, 1)
    assert [r["ppl"] for r in second.rows[:3]] == [r["ppl"] for r in first.rows[:3]]


@needs_tokenizer
def test_files_reach_a_node_that_lacks_them(tmp_path, local_ray):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"a": 1}')
    (model / "sub").mkdir()
    (model / "sub" / "w.bin").write_bytes(bytes(range(256)) * 10)
    shared = share(model, 1 << 20, ray.put)
    assert shared.local() == str(model)                              # there: used in place
    moved = tmp_path / "elsewhere"
    model.rename(moved)                                              # now this "node" lacks it
    copy = Path(shared.local())
    assert copy != model and (copy / "sub" / "w.bin").read_bytes() == (moved / "sub" / "w.bin").read_bytes()
    assert (copy / "config.json").read_text() == '{"a": 1}'
    big = share(moved, 100, ray.put)                                 # over the limit: not shipped
    assert big.ref is None
    moved.rename(tmp_path / "gone")
    with pytest.raises(QinferError, match="every node shares"):
        big.local()


@needs_tokenizer
@needs_wikitext
def test_unreachable_address_is_one_line(tiny, tmp_path):
    grid = write_grid(tmp_path / "grid.toml", f"""
[sweep]
data = "{ref.WIKITEXT}"
model = "{tiny}"
[[config]]
method = "rtn"
""")
    out = tmp_path / "out.md"
    proc = run_cli("sweep", str(grid), "--address", "127.0.0.1:9", "--cache", str(tmp_path / "cache"),
                   "--out", str(out))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "cannot reach a Ray cluster at 127.0.0.1:9" in lines[0], \
        proc.stderr
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_only_the_sweep_imports_ray():
    for name in MODULES:
        if not _under(name, "qinfer.sweep"):
            assert not any(_under(i, "ray") for i in imported_names(name)), f"{name} imports ray"
    out = _fresh("import sys, qinfer, qinfer.sweep, qinfer.cli, qinfer.quant\nprint('ray' in sys.modules)\n")
    assert out.strip() == "False"
