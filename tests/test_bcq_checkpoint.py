"""The BCQ checkpoint: qinfer.quantize(method="bcq") / `qinfer quantize --method bcq` writes it,
readers/bcq.py reads it, the engine runs it on the lookup-table kernels (LutLinear layers).

* Round trip: every tensor's name, dtype and shape; the weights decoded by this file's own
  decoder (bits read from the format's description) equal to BcqResult.dequantize() with
  the alphas and offsets in float16; the loaded layers' weights the same.
* End to end: the engine's logits against the numpy reference forward pass
  (tests/llama_reference.py) of the decoded weights, within the tables' int8 rounding;
  the report's bits per weight; the command line (quantize, generate, perplexity).
* Errors: inconsistent planes, alphas or offsets, bad or unknown settings, bad command-line
  values: each one clear error (the CLI: one `qinfer: error:` line, exit 1), nothing written.
"""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_reference as ref  # noqa: E402
from helpers import (assert_user_error, edit_settings, edit_tensors, leftovers, needs_tokenizer, refused,  # noqa: E402
                     needs_wikitext, run_cli)

import qinfer  # noqa: E402
from qinfer import QinferError, UnsupportedError  # noqa: E402
from qinfer.errors import FormatError  # noqa: E402
from qinfer.lut_linear import LutLinear  # noqa: E402
from qinfer.model import LINEAR_NAMES, bcq_layer  # noqa: E402
from qinfer.perplexity import load_text  # noqa: E402
from qinfer.readers import open_model  # noqa: E402
from qinfer.readers.source import BcqTensor  # noqa: E402

PROMPT = "The quick brown fox jumps over the lazy dog"
BASE = "model.layers.1.mlp.down_proj"



def decode_bcq(planes, alphas, offsets, group):
    """float32 [out, in] from one layer's tensors: bit k % 8 of byte k // 8 of plane i's row is
    input k's sign (1: +1, 0: -1); w = sum_i alpha_i sign_i + offset of its group."""
    bits, out_f, nbytes = planes.shape
    w = np.zeros((out_f, nbytes * 8), dtype=np.float64)
    for i in range(bits):
        for k in range(nbytes * 8):
            sign = np.where((planes[i, :, k // 8] >> (k % 8)) & 1, 1.0, -1.0)
            w[:, k] += alphas[k // group, :, i].astype(np.float64) * sign
    for k in range(nbytes * 8):
        w[:, k] += offsets[k // group].astype(np.float64)
    return w.astype(np.float32)


def checkpoint_weights(directory):
    from safetensors.numpy import load_file

    qc = json.loads((Path(directory) / "config.json").read_text())["quantization_config"]
    stored = load_file(str(Path(directory) / "model.safetensors"))
    weights = {}
    for name, a in stored.items():
        if name.endswith(".weight"):
            weights[name] = a.astype(np.float32)
        elif name.endswith(".bcq_planes"):
            base = name[:-len(".bcq_planes")]
            in_f = a.shape[2] * 8
            group = in_f if qc["group_size"] == -1 else qc["group_size"]
            weights[base + ".weight"] = decode_bcq(a, stored[base + ".bcq_alphas"], stored[base + ".bcq_offsets"],
                                                   group)
    return weights


@pytest.fixture(scope="module")
def tiny_src(write_tiny):
    return write_tiny("bcq_src", tied=False, seed=9)


@pytest.fixture(scope="module")
def written(tiny_src, tmp_path_factory):
    out = tmp_path_factory.mktemp("bcq_written") / "ckpt"
    report = qinfer.quantize(tiny_src[0], out, method="bcq", bits=3, group_size=32, rounds=3, threads=1,
                             progress=False, float_dtype="float32")
    return out, report


# ------------------------------------------------------------------ round trip
@needs_tokenizer
def test_checkpoint_round_trips_and_runs(tiny_src, written):
    from safetensors.numpy import load_file

    out, report = written
    assert (report.method, report.bits, report.group_size, report.rounds) == ("bcq", 3, 32, 3)
    assert report.checkpoint_format == "qinfer_bcq"
    assert report.bits_per_weight == pytest.approx(3 + 16 * 4 / 32)     # planes + float16 alphas and offset
    assert 0 < report.weight_error < 0.2
    assert "bits per weight" in report.summary() and "refinement rounds" in report.summary()
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "qinfer_bcq", "bits": 3, "group_size": 32, "rounds": 3}
    stored = load_file(str(out / "model.safetensors"))
    cfg = tiny_src[2]
    loaded = open_model(out)
    assert loaded.format == "bcq"
    weights = checkpoint_weights(out)
    for i in range(cfg["num_hidden_layers"]):
        for hf_name in LINEAR_NAMES.values():
            base = f"model.layers.{i}.{hf_name}"
            out_f, in_f = loaded.tensors[base + ".weight"].shape
            assert stored[base + ".bcq_planes"].dtype == np.uint8
            assert stored[base + ".bcq_planes"].shape == (3, out_f, in_f // 8)
            assert (stored[base + ".bcq_alphas"].dtype, stored[base + ".bcq_alphas"].shape) == \
                (np.float16, (in_f // 32, out_f, 3))
            assert (stored[base + ".bcq_offsets"].dtype, stored[base + ".bcq_offsets"].shape) == \
                (np.float16, (in_f // 32, out_f))
            assert base + ".weight" not in stored
            t = loaded.tensors[base + ".weight"]
            assert isinstance(t, BcqTensor) and (t.bits, t.group_size) == (3, 32)
            np.testing.assert_allclose(bcq_layer(t).dequantize(), weights[base + ".weight"], rtol=1e-6, atol=1e-6)
            # a fit of the float weight, not something else of its shape
            w, src = weights[base + ".weight"], tiny_src[1][base + ".weight"]
            assert ((w - src) ** 2).sum() < 0.2 * (src ** 2).sum()

    engine = qinfer.Engine(out, threads=1)
    assert all(isinstance(layer, LutLinear) for layer in engine.model.quantized_layers())
    assert len(engine.model.quantized_layers()) == cfg["num_hidden_layers"] * len(LINEAR_NAMES)
    ids = engine.tokenizer.encode(PROMPT, add_bos=True)
    got = engine.logits(ids)
    want = ref.forward(weights, cfg, ids)
    # int8 tables: within a few percent of the logits' range, and the same top token almost everywhere
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.8
    floats = qinfer.Engine(out, threads=1, dequantize=True).logits(ids)
    np.testing.assert_allclose(floats, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # decoding (the decode team's entry points) picks the token the prefill's logits rank first
    first = engine.generate(PROMPT, max_new_tokens=1)
    assert first.strip() == engine.tokenizer.decode([int(got[-1].argmax())]).strip()


@needs_tokenizer
@needs_wikitext
def test_bcq_from_the_command_line(tiny_src, tmp_path):
    out = tmp_path / "cli"
    proc = run_cli("quantize", "--model", tiny_src[0], "--out", out, "--method", "bcq", "--bits", 2,
                   "--group-size", 16, "--rounds", 1, "--threads", 1)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "bits per weight" in proc.stderr and "wrote" in proc.stderr
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["rounds"]) == (2, 16, 1)
    proc = run_cli("generate", "--model", out, "--prompt", "Hello", "--max-new-tokens", 4, "--threads", 1)
    assert proc.returncode == 0, proc.stderr
    data = tmp_path / "data.txt"
    data.write_text(ref.WIKITEXT.read_text(encoding="utf-8")[30_000:40_000], encoding="utf-8")
    proc = run_cli("perplexity", "--model", out, "--data", data, "--seqlen", 48, "--max-chunks", 2,
                   "--threads", 1, "--json")
    assert proc.returncode == 0, proc.stderr
    api = qinfer.perplexity(qinfer.Engine(out, threads=1), load_text(data), seqlen=48, max_chunks=2,
                            progress=False)
    assert json.loads(proc.stdout)["ppl"] == pytest.approx(api.ppl, rel=1e-9)


@needs_tokenizer
def test_default_group_divides_every_layer(tiny_src, tmp_path):
    """Without --group-size: 128, or the largest of 64, 32, 16 dividing every layer's inputs."""
    cfg = tiny_src[2]
    widths = (cfg["hidden_size"], cfg["intermediate_size"])
    want = next(g for g in (128, 64, 32, 16) if all(n % g == 0 for n in widths))
    report = qinfer.quantize(tiny_src[0], tmp_path / "d", method="bcq", bits=2, rounds=0, threads=1,
                             progress=False)
    assert report.group_size == want


# ------------------------------------------------------------------ errors
def _nan_alpha(t):
    a = t[BASE + ".bcq_alphas"].copy()
    a[0, 0, 0] = np.nan
    t[BASE + ".bcq_alphas"] = a


BAD = {
    "a plane missing": (edit_tensors(lambda t: t.update({BASE + ".bcq_planes": t[BASE + ".bcq_planes"][:2]})),
                        FormatError, [f"{BASE}.bcq_planes", "has shape", "3-bit"]),
    "planes too short": (edit_tensors(lambda t: t.update({BASE + ".bcq_planes": t[BASE + ".bcq_planes"][:, :, :-1]})),
                         FormatError, [f"{BASE}.bcq_planes", "has shape"]),
    "planes dtype": (edit_tensors(lambda t: t.update({BASE + ".bcq_planes": t[BASE + ".bcq_planes"].astype(np.int32)})),
                     FormatError, [f"{BASE}.bcq_planes", "I32", "expected U8"]),
    "alphas for 2 planes": (edit_tensors(lambda t: t.update({BASE + ".bcq_alphas": t[BASE + ".bcq_alphas"][..., :2]})),
                            FormatError, [f"{BASE}.bcq_alphas", "has shape"]),
    "alpha NaN": (edit_tensors(_nan_alpha), FormatError, [f"{BASE}.bcq_alphas", "NaN"]),
    "offsets missing": (edit_tensors(lambda t: t.pop(BASE + ".bcq_offsets")), FormatError,
                        [f"{BASE}.bcq_offsets is missing"]),
    "unknown setting": (edit_settings(lambda q: q.update(sym=True)), UnsupportedError,
                        ["unknown BCQ setting 'sym'"]),
    "bits 5": (edit_settings(lambda q: q.update(bits=5)), UnsupportedError, ["bits 5"]),
    "group not a multiple of 16": (edit_settings(lambda q: q.update(group_size=24)), UnsupportedError,
                                   ["group_size 24", "multiple of 16"]),
    "no bits": (edit_settings(lambda q: q.pop("bits"), ("config.json", "quantize_config.json")),
                FormatError, ["no 'bits'"]),
    "files disagree": (edit_settings(lambda q: q.update(group_size=16), ("quantize_config.json",)), FormatError,
                       ["group_size is 32", "but 16"]),
}


@needs_tokenizer
@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoints_are_refused_by_name(written, tmp_path, case):
    edit, error, words = BAD[case]
    refused(written[0], tmp_path, edit, error, *words)


@needs_tokenizer
def test_a_bad_checkpoint_is_one_line_from_the_command_line(written, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(written[0], bad)
    BAD["a plane missing"][0](bad)
    assert_user_error(run_cli("generate", "--model", bad, "--prompt", "x", "--max-new-tokens", 1),
                      f"{BASE}.bcq_planes", "has shape")


@needs_tokenizer
@pytest.mark.parametrize("args,words", [
    (["--bits", "8"], ["2, 3 or 4", "--bits"]),
    (["--sym"], ["--sym", "not a BCQ option"]),
    (["--clip-search"], ["--clip-search", "not a BCQ option"]),
    (["--method", "gptq", "--rounds", "3"], ["--rounds", "BCQ setting"]),
], ids=["bits-8", "sym", "clip-search", "gptq-rounds"])
def test_bad_command_line_values(tiny_src, tmp_path, args, words):
    out = tmp_path / "out"
    proc = run_cli("quantize", "--model", tiny_src[0], "--out", out, "--method", "bcq", *args)
    assert_user_error(proc, *words)
    assert not out.exists() and leftovers(tmp_path) == []


@needs_tokenizer
@pytest.mark.parametrize("args,words", [
    (["--group-size", "24"], ["--group-size", "invalid choice"]),
    (["--rounds", "-1"], ["--rounds", "-1"]),
], ids=["group-24", "rounds-negative"])
def test_command_line_usage_mistakes(tiny_src, tmp_path, args, words):
    out = tmp_path / "out"
    proc = run_cli("quantize", "--model", tiny_src[0], "--out", out, "--method", "bcq", *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert not out.exists()


@needs_tokenizer
def test_a_group_that_does_not_divide_the_layers_is_refused(tiny_src, tmp_path):
    cfg = tiny_src[2]
    bad = next(g for g in (128, 64, 32) if cfg["intermediate_size"] % g or cfg["hidden_size"] % g)
    with pytest.raises(UnsupportedError, match=f"groups of {bad} do not divide"):
        qinfer.quantize(tiny_src[0], tmp_path / "x", method="bcq", group_size=bad, progress=False)
    assert not (tmp_path / "x").exists()


@needs_tokenizer
def test_a_bcq_checkpoint_is_not_quantized_again(written):
    out, _ = written
    with pytest.raises(QinferError, match="already a BCQ checkpoint"):
        qinfer.quantize(out, out.parent / "again", method="bcq", progress=False)
