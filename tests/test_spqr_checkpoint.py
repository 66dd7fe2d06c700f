"""The SpQR checkpoint: qinfer.quantize(method="spqr") / `qinfer quantize --method spqr` writes it,
readers/spqr.py reads it, the engine runs it (SpqrLinear layers).

* Round trip: SpQR results of a tiny random model written by save_spqr_checkpoint; every
  tensor's name, dtype and shape; the codes against the reference packer (helpers.pack_gptq);
  the weights decoded by this file's own decoder (bit planes and bit stream read from the
  format's description, not from qinfer's code) and by the loaded SpqrLinear equal to
  SpqrResult.dequantize(), the outliers bit for bit; with and without act-order.
* End to end: quantize with calibration, load with the Engine, logits against the numpy
  reference forward pass (tests/llama_reference.py) of the decoded weights; the report's
  bits per weight and outlier fraction; the command line (quantize, generate, perplexity).
* Errors: a broken outlier table, bad or unknown settings, wrong dtypes, a bad permutation,
  bad command-line values: each one clear error (the CLI: one `qinfer: error:` line, exit 1),
  nothing written.
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
                     needs_wikitext, pack_gptq, run_cli)

import qinfer  # noqa: E402
from qinfer import QinferError, UnsupportedError  # noqa: E402
from qinfer.engine import AlreadyQuantizedError  # noqa: E402
from qinfer.errors import FormatError  # noqa: E402
from qinfer.model import LINEAR_NAMES, Model, spqr_layer  # noqa: E402
from qinfer.perplexity import load_text  # noqa: E402
from qinfer.quant.spqr import spqr_quantize  # noqa: E402
from qinfer.quant.spqr_writer import save_spqr_checkpoint  # noqa: E402
from qinfer.quant.writer import float_weight  # noqa: E402
from qinfer.readers import open_model  # noqa: E402
from qinfer.readers.source import SpqrTensor  # noqa: E402
from qinfer.spqr_linear import SpqrLinear  # noqa: E402

PROMPT = "The quick brown fox jumps over the lazy dog"
PARTS = {"qweight": np.int32, "spqr_stats": np.uint16, "outlier_rows": np.int32, "outlier_cols": np.uint16,
         "outlier_vals": np.float16}



# ------------------------------------------------------------------ this file's decoder
def unpack_stream(qweight, bits):
    """int32 words [in*bits/32, out] -> codes [in, out]: the words of a column are one
    little-endian bit stream, code k at bits k*bits .. k*bits + bits - 1."""
    words = np.asarray(qweight).view(np.uint32).astype(np.uint64)
    stream = (words[:, None, :] >> np.arange(32, dtype=np.uint64)[None, :, None]) & np.uint64(1)
    stream = stream.reshape(-1, words.shape[1])                            # [in*bits, out]
    by_code = stream.reshape(-1, bits, words.shape[1])
    return (by_code << np.arange(bits, dtype=np.uint64)[None, :, None]).sum(axis=1)


def decode_spqr(t, bits, group_size, stat_bits):
    """The float32 weight [out, in] of one layer's checkpoint tensors {part: array}.

    Record (run r of 16 output rows, group g): entries 0..stat_bits-1 are the planes of the
    scale codes and the next `bits` the planes of the zero points (bit i of plane p: bit p of
    row 16r + i's value), then float16 s2 and z2. scale = s2 * (code - z2), weight =
    scale * (q - zero), group g = the columns perm[g*G:(g+1)*G] (in order without a perm),
    then each row's outliers added."""
    codes = unpack_stream(t["qweight"], bits).astype(np.float32)          # [in, out]
    n_in, n_out = codes.shape
    rec = t["spqr_stats"].astype(np.int64)
    w = np.zeros((n_out, n_in), dtype=np.float32)
    perm = t.get("perm")
    order = np.arange(n_in) if perm is None else perm
    for o in range(n_out):
        r, i = divmod(o, 16)
        for g in range(n_in // group_size):
            planes = (rec[r, g] >> i) & 1
            scale_code = sum(int(planes[p]) << p for p in range(stat_bits))
            zero = sum(int(planes[stat_bits + p]) << p for p in range(bits))
            s2, z2 = (np.float32(v) for v in rec[r, g, -2:].astype(np.uint16).view(np.float16))
            scale = s2 * (np.float32(scale_code) - z2)
            cols = order[g * group_size:(g + 1) * group_size]
            w[o, cols] = scale * (codes[cols, o] - np.float32(zero))
    rows = t["outlier_rows"]
    for o in range(n_out):
        for k in range(rows[o], rows[o + 1]):
            w[o, int(t["outlier_cols"][k])] += np.float32(t["outlier_vals"][k])
    return w


def checkpoint_weights(directory):
    """{HF weight name: float32 array} of an SpQR checkpoint, decoded by decode_spqr."""
    from safetensors.numpy import load_file

    qc = json.loads((Path(directory) / "config.json").read_text())["quantization_config"]
    stored = load_file(str(Path(directory) / "model.safetensors"))
    weights = {}
    for name, a in stored.items():
        if name.endswith(".weight"):
            weights[name] = a.astype(np.float32)
        elif name.endswith(".qweight"):
            base = name[:-len(".qweight")]
            parts = {part: stored[f"{base}.{part}"] for part in list(PARTS) + ["perm"] if f"{base}.{part}" in stored}
            weights[base + ".weight"] = decode_spqr(parts, qc["bits"], qc["group_size"], qc["stat_bits"])
    return weights


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny_src(write_tiny):
    return write_tiny("spqr_src", tied=False, seed=7)


@pytest.fixture(scope="module")
def short_calib(tmp_path_factory):
    if not ref.wikitext_available():
        pytest.skip(f"{ref.WIKITEXT} is absent")
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(ref.WIKITEXT.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    return p


def spqr_results(source, act_order, bits=3, group_size=16, threshold=0.2):
    """SpQR of every linear layer on Hessians of random inputs whose channels differ in scale."""
    rng = np.random.default_rng(5)
    results = {}
    for i in range(source.config.num_hidden_layers):
        for hf_name in LINEAR_NAMES.values():
            base = f"model.layers.{i}.{hf_name}"
            w = float_weight(source, base + ".weight")
            x = rng.normal(size=(256, w.shape[1])) * rng.random(w.shape[1])
            results[base] = spqr_quantize(w, 2 * x.T @ x / 256, bits, group_size, outlier_threshold=threshold,
                                          act_order=act_order)
    return results


META = dict(bits=3, group_size=16, stat_bits=3, outlier_threshold=0.2, float_dtype="float32")


@pytest.fixture(scope="module")
def written(tiny_src, tmp_path_factory):
    """(directory, results) of a plain SpQR checkpoint of the tiny model."""
    source = open_model(tiny_src[0])
    results = spqr_results(source, act_order=False)
    out = tmp_path_factory.mktemp("spqr_written") / "ckpt"
    save_spqr_checkpoint(out, source, results, META)
    return out, results


def in_memory_logits(source, results, ids):
    model = Model(source, ctx=64, threads=1, dequantize=True)
    for i in range(source.config.num_hidden_layers):
        for name, hf_name in LINEAR_NAMES.items():
            model.replace_linear(i, name, SpqrLinear.from_result(results[f"model.layers.{i}.{hf_name}"]))
    return model.forward(ids, 0, all_logits=True)


# ------------------------------------------------------------------ round trip
@needs_tokenizer
@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act-order"])
def test_checkpoint_round_trips(tiny_src, tmp_path, act_order):
    from safetensors.numpy import load_file

    source = open_model(tiny_src[0])
    results = spqr_results(source, act_order)
    assert sum(r.n_outliers for r in results.values()) > 0
    out = tmp_path / "ckpt"
    save_spqr_checkpoint(out, source, results, dict(META, act_order=act_order))

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "qinfer_spqr", "bits": 3, "group_size": 16, "stat_bits": 3, "stat_group": 16,
                  "outlier_threshold": 0.2, "act_order": act_order}
    settings = json.loads((out / "quantize_config.json").read_text())
    assert {k: settings[k] for k in qc} == qc and settings["qinfer"]["method"] == "spqr"

    stored = load_file(str(out / "model.safetensors"))
    for base, r in results.items():
        out_f, in_f = r.out_features, r.in_features
        shapes = {"qweight": (in_f * 3 // 32, out_f), "spqr_stats": (-(-out_f // 16), in_f // 16, 3 + 3 + 2),
                  "outlier_rows": (out_f + 1,), "outlier_cols": (r.n_outliers,), "outlier_vals": (r.n_outliers,)}
        for part, dtype in PARTS.items():
            a = stored[f"{base}.{part}"]
            assert (a.dtype, a.shape) == (np.dtype(dtype), shapes[part]), (base, part)
        assert (f"{base}.perm" in stored) == act_order
        assert f"{base}.weight" not in stored
        np.testing.assert_array_equal(stored[f"{base}.qweight"], pack_gptq(r.codes.T, 3))
        parts = {p: stored[f"{base}.{p}"] for p in list(PARTS) + ["perm"] if f"{base}.{p}" in stored}
        np.testing.assert_array_equal(decode_spqr(parts, 3, 16, 3), r.dequantize())

    loaded = open_model(out)
    assert loaded.format == "spqr"
    for base, r in results.items():
        t = loaded.tensors[base + ".weight"]
        assert isinstance(t, SpqrTensor) and (t.bits, t.group_size, t.stat_bits) == (3, 16, 3)
        np.testing.assert_array_equal(spqr_layer(t).dequantize(), r.dequantize())
        rows, cols, vals = spqr_layer(t).outliers
        np.testing.assert_array_equal(rows, r.outlier_rows)
        np.testing.assert_array_equal(cols, r.outlier_cols)
        np.testing.assert_array_equal(vals.view(np.uint16), r.outlier_values.view(np.uint16))
        if act_order:
            np.testing.assert_array_equal(t.perm, r.perm)

    # the engine runs the layers the quantizer made, bit for bit, and the weights they stand for
    engine = qinfer.Engine(out, threads=1)
    ids = engine.tokenizer.encode(PROMPT, add_bos=True)
    got = engine.logits(ids)
    np.testing.assert_array_equal(got, in_memory_logits(source, results, ids))
    want = ref.forward(checkpoint_weights(out), tiny_src[2], ids)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


# ------------------------------------------------------------------ end to end
@needs_tokenizer
@needs_wikitext
def test_quantize_spqr_and_run_it(tiny_src, short_calib, tmp_path):
    out = tmp_path / "spqr"
    report = qinfer.quantize(tiny_src[0], out, method="spqr", act_order=True, calib=short_calib, nsamples=4,
                             seqlen=64, threads=1, progress=False)
    assert (report.method, report.bits, report.group_size, report.stat_bits) == ("spqr", 3, 16, 3)
    assert report.checkpoint_format == "qinfer_spqr" and report.outlier_threshold == 0.2
    # 3 + 6/16 + 32/256 bits for codes and statistics (every layer's rows in whole runs of 16),
    # 32 bits an outlier
    assert report.bits_per_weight == pytest.approx(3.5 + 32 * report.outlier_fraction, rel=1e-9)
    assert 0 < report.outlier_fraction < 0.05
    assert set(report.errors) == {f"model.layers.{i}.{p}" for i in range(2) for p in LINEAR_NAMES.values()}
    summary = report.summary()
    assert "bits per weight" in summary and "outliers" in summary and "act-order" in summary
    settings = json.loads((out / "quantize_config.json").read_text())
    assert settings["qinfer"]["nsamples"] == 4 and settings["act_order"] is True

    engine = qinfer.Engine(out, threads=1)
    ids = engine.tokenizer.encode(PROMPT, add_bos=True)
    got = engine.logits(ids)
    want = ref.forward(checkpoint_weights(out), tiny_src[2], ids)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert all(isinstance(layer, SpqrLinear) for layer in engine.model.quantized_layers())
    assert len(engine.model.quantized_layers()) == 2 * len(LINEAR_NAMES)       # never stacked
    # dequantize=True runs the same weights as float32
    floats = qinfer.Engine(out, threads=1, dequantize=True).logits(ids)
    np.testing.assert_allclose(floats, got, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert leftovers(tmp_path) == []

    # no outliers: exactly the codes and statistics
    report = qinfer.quantize(tiny_src[0], tmp_path / "plain", method="spqr", calib=short_calib, nsamples=2,
                             seqlen=32, threads=1, outlier_threshold=float("inf"), progress=False)
    assert report.outlier_fraction == 0 and report.bits_per_weight == 3.5
    qc = json.loads((tmp_path / "plain" / "config.json").read_text())["quantization_config"]
    assert qc["outlier_threshold"] is None


@needs_tokenizer
@needs_wikitext
def test_spqr_from_the_command_line(tiny_src, short_calib, tmp_path):
    out = tmp_path / "cli"
    proc = run_cli("quantize", "--model", tiny_src[0], "--out", out, "--method", "spqr", "--bits", 4,
                   "--group-size", 32, "--stat-bits", 4, "--outlier-threshold", 0.5, "--act-order",
                   "--calib", short_calib, "--nsamples", 2, "--seqlen", 32, "--threads", 1)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "bits per weight" in proc.stderr and "outliers" in proc.stderr and "wrote" in proc.stderr
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["stat_bits"], qc["outlier_threshold"], qc["act_order"]) == \
        (4, 32, 4, 0.5, True)

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
def test_an_spqr_checkpoint_is_not_quantized_again(written):
    out, _ = written
    with pytest.raises(AlreadyQuantizedError, match="already quantized"):
        qinfer.Engine(out, quantize=4)
    with pytest.raises(QinferError, match="already an SpQR checkpoint"):
        qinfer.quantize(out, out.parent / "again", method="spqr", calib=__file__, progress=False)
    # with dequantize, its dequantized weights are quantized on load
    engine = qinfer.Engine(out, threads=1, dequantize=True, quantize=4, group_size=32)
    assert {(layer.bits, layer.group_size) for layer in engine.model.quantized_layers()} >= {(4, 32)}


# ------------------------------------------------------------------ errors
BASE = "model.layers.1.mlp.down_proj"


def _truncate_outliers(t):
    t[BASE + ".outlier_cols"] = t[BASE + ".outlier_cols"][:-1]
    t[BASE + ".outlier_vals"] = t[BASE + ".outlier_vals"][:-1]


def _rows_past_the_end(t):
    rows = t[BASE + ".outlier_rows"].copy()
    rows[-1] += 1
    t[BASE + ".outlier_rows"] = rows


def _repeat_a_column(t):
    rows, cols = t[BASE + ".outlier_rows"], t[BASE + ".outlier_cols"].copy()
    row = int(np.flatnonzero(np.diff(rows) >= 2)[0])         # a row with two outliers or more
    cols[rows[row] + 1] = cols[rows[row]]
    t[BASE + ".outlier_cols"] = cols


def _swap_perm(t):
    t[BASE + ".perm"] = np.zeros(160, dtype=np.int32)


BAD = {
    "truncated outlier table": (edit_tensors(_truncate_outliers), FormatError,
                                [f"{BASE}.outlier_rows", "row pointers end at"]),
    "rows not ending at n": (edit_tensors(_rows_past_the_end), FormatError,
                             [f"{BASE}.outlier_rows", "row pointers end at"]),
    "repeated outlier column": (edit_tensors(_repeat_a_column), FormatError,
                                [f"{BASE}.outlier_cols", "ascending"]),
    "stat_group 8": (edit_settings(lambda q: q.update(stat_group=8)), UnsupportedError,
                     ["stat_group 8", "runs of 16"]),
    "unknown setting": (edit_settings(lambda q: q.update(sym=True)), UnsupportedError,
                        ["unknown SpQR setting 'sym'"]),
    "bits 5": (edit_settings(lambda q: q.update(bits=5)), UnsupportedError, ["bits 5"]),
    "group not a multiple of 16": (edit_settings(lambda q: q.update(group_size=24)), UnsupportedError,
                                   ["group_size 24", "multiple of 16"]),
    "no stat_bits": (edit_settings(lambda q: q.pop("stat_bits"), ("config.json", "quantize_config.json")),
                     FormatError, ["no 'stat_bits'"]),
    "files disagree": (edit_settings(lambda q: q.update(stat_bits=4), ("quantize_config.json",)), FormatError,
                       ["stat_bits is 3", "but 4"]),
    "stats dtype": (edit_tensors(lambda t: t.update({BASE + ".spqr_stats": t[BASE + ".spqr_stats"].astype(np.int32)})),
                    FormatError, [f"{BASE}.spqr_stats", "I32", "expected U16"]),
    "stats shape": (edit_tensors(lambda t: t.update({BASE + ".spqr_stats": t[BASE + ".spqr_stats"][:, :-1]})),
                    FormatError, [f"{BASE}.spqr_stats", "has shape"]),
    "not a permutation": (edit_tensors(_swap_perm), FormatError, [f"{BASE}.perm", "not a permutation"]),
    "outliers missing": (edit_tensors(lambda t: t.pop(BASE + ".outlier_vals")), FormatError,
                         [f"{BASE}.outlier_vals is missing"]),
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
    BAD["truncated outlier table"][0](bad)
    assert_user_error(run_cli("generate", "--model", bad, "--prompt", "x", "--max-new-tokens", 1),
                      f"{BASE}.outlier_rows", "row pointers end at")


@needs_tokenizer
@pytest.mark.parametrize("args,words", [
    (["--outlier-threshold", "0"], ["outlier threshold", "> 0"]),
    (["--outlier-threshold", "-0.5"], ["outlier threshold"]),
    (["--outlier-threshold", "nan"], ["outlier threshold", "nan"]),
    (["--stat-bits", "1"], ["2 to 8", "--stat-bits"]),
    (["--stat-bits", "9"], ["2 to 8", "--stat-bits"]),
    (["--group-size", "-1"], ["group size", "multiple of 16"]),
    (["--bits", "8"], ["2, 3 or 4"]),
    (["--sym"], ["--sym", "not an SpQR option"]),
    (["--method", "gptq", "--stat-bits", "3"], ["--stat-bits", "SpQR settings"]),
    (["--method", "rtn", "--outlier-threshold", "0.2"], ["--outlier-threshold", "SpQR settings"]),
], ids=["threshold-0", "threshold-negative", "threshold-nan", "stat-bits-1", "stat-bits-9", "full-column",
        "bits-8", "sym", "gptq-stat-bits", "rtn-threshold"])
def test_bad_command_line_values(tiny_src, tmp_path, args, words):
    out = tmp_path / "out"
    calib = tmp_path / "calib.txt"
    calib.write_text("Calibration text. " * 200, encoding="utf-8")
    proc = run_cli("quantize", "--model", tiny_src[0], "--out", out, "--method", "spqr", "--calib", calib,
                   "--nsamples", 1, "--seqlen", 16, *args)
    assert_user_error(proc, *words)
    assert not out.exists() and leftovers(tmp_path) == []


@needs_tokenizer
def test_settings_from_quantize_config_alone(written, tmp_path):
    """Without a quantization_config in config.json, quantize_config.json says what the checkpoint is."""
    copy = tmp_path / "copy"
    shutil.copytree(written[0], copy)
    cfg = json.loads((copy / "config.json").read_text())
    del cfg["quantization_config"]
    (copy / "config.json").write_text(json.dumps(cfg))
    source = open_model(copy)
    assert source.format == "spqr"
    t = source.tensors[BASE + ".weight"]
    np.testing.assert_array_equal(spqr_layer(t).dequantize(), written[1][BASE].dequantize())


# ------------------------------------------------------------------ threads and batched steps
def spqr_engine(tiny_src, results, threads, activations):
    """The tiny model with its LM head quantized on load (so that every map has a team kernel)
    and its blocks' linear maps replaced by the SpQR layers."""
    engine = qinfer.Engine(tiny_src[0], threads=threads, quantize=4, group_size=32, activations=activations)
    for i in range(engine.config.num_hidden_layers):
        for name, hf_name in LINEAR_NAMES.items():
            engine.model.replace_linear(i, name, SpqrLinear.from_result(results[f"model.layers.{i}.{hf_name}"]))
    return engine


@pytest.mark.parametrize("activations", ["float", "int8"])
def test_threads_and_batched_steps_give_the_same_logits(tiny_src, written, activations):
    """Two threads run a decode step as one team (SpQR's team kernels: each thread its own
    tiles, chunk by chunk) and, with int8 activations, a batched step of several sequences
    through the rows' team kernel; a column's sums do not depend on the split, so every
    logit equals one thread's, and each batched row its sequence decoded alone."""
    from qinfer import kernels

    if not kernels.cpu_has_avx2():
        pytest.skip("the team kernels are the AVX2 path's")
    _, results = written
    one = spqr_engine(tiny_src, results, 1, activations)
    two = spqr_engine(tiny_src, results, 2, activations)
    transformer = two.model.transformer
    assert transformer.team_ready
    prompts = [[1, 5, 9, 300, 41], [1, 77], [1, 2000, 3, 4]]
    for ids in prompts:
        np.testing.assert_array_equal(two.model.forward(ids, 0), one.model.forward(ids, 0))
        np.testing.assert_array_equal(two.model.forward([7], len(ids)), one.model.forward([7], len(ids)))
    if activations == "int8" and transformer.rows_team_ready:
        cache = two.model.new_cache(32, seqs=len(prompts))
        for seq, ids in enumerate(prompts):
            two.model.forward(ids, 0, cache=cache, seq=seq)
        rows = two.model.forward_rows([7, 8, 9], range(len(prompts)), [len(p) for p in prompts], cache)
        for seq, ids in enumerate(prompts):
            one.model.forward(ids, 0)
            np.testing.assert_array_equal(rows[seq], one.model.forward([[7, 8, 9][seq]], len(ids)))
