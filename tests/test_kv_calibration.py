"""KVQuant calibration (qinfer/kv_calibration.py, `qinfer calibrate-kv`) against references
written here: a float64 forward pass giving each layer's k_proj input, numpy percentiles
of the pre-RoPE keys, the value normalization, and a plain Lloyd's iteration; then the
file: round trip, refusals, the command line."""
import dataclasses
import math

import numpy as np
import pytest

import llama_reference as ref
import qinfer
from helpers import assert_user_error, run_cli
from qinfer import kv_calibration as kvc
from qinfer.errors import QinferError
from qinfer.quant.checkpoint import write_safetensors

BOS = 1
SEQUENCES, SEQLEN = 8, 64
# engine (float32) vs. the float64 reference, on keys of magnitude ~1..10 (seen: 5e-7)
THRESHOLD_TOL = 1e-5
# a calibrated level vs. the mean of the reference's values nearest to it (seen: 5e-8; against
# samples that counted position 0 the levels miss by 8e-4)
FIXED_POINT_TOL = 1e-5


# ------------------------------------------------------------------ the model and its reference
@pytest.fixture(scope="module")
def tiny(write_tiny):
    """A tiny model (4 heads, 2 KV heads, head_dim 16) whose BOS embedding points along layer
    0's first k_proj row: BOS's key in that channel is an outlier ~8 standard deviations out,
    so statistics that counted position 0 would show it."""
    d, weights, config = write_tiny("kvcal", seed=3)
    wk, gain = weights["model.layers.0.self_attn.k_proj.weight"], weights["model.layers.0.input_layernorm.weight"]
    weights["model.embed_tokens.weight"][BOS] = (wk[0] / gain).astype(np.float32)
    ref.save_safetensors(weights, d / "model.safetensors")
    return d, weights, config


@pytest.fixture(scope="module")
def sequences():
    rng = np.random.default_rng(7)
    return np.concatenate([np.full((SEQUENCES, 1), BOS), rng.integers(3, 32000, size=(SEQUENCES, SEQLEN - 1))],
                          axis=1).astype(np.int32)


@pytest.fixture(scope="module")
def engine(tiny):
    return qinfer.Engine(tiny[0], threads=1)


@pytest.fixture(scope="module")
def calibration(engine, sequences):
    return kvc.calibrate(engine, sequences, progress=False, calib="random ids", weighting="none")


def layer_inputs(weights, config, ids):
    """float64 [layers, n, dim]: the input of each layer's k_proj/v_proj (the hidden state after
    the input RMSNorm), by a plain float64 forward pass (the HF LLaMA definition)."""
    W = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    d, nh, nkv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    hd, eps, n = d // nh, config["rms_norm_eps"], len(ids)
    inv_freq = ref.rope_inv_freq(hd, config["rope_theta"])
    positions = np.arange(n, dtype=np.float64)
    mask = np.triu(np.full((n, n), -np.inf), k=1)
    x = W["model.embed_tokens.weight"][ids]
    out = []
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = ref.rms_norm(x, W[p + "input_layernorm.weight"], eps)
        out.append(h)
        q = ref.apply_rope((h @ W[p + "self_attn.q_proj.weight"].T).reshape(n, nh, hd), positions, inv_freq)
        k = ref.apply_rope((h @ W[p + "self_attn.k_proj.weight"].T).reshape(n, nkv, hd), positions, inv_freq)
        v = (h @ W[p + "self_attn.v_proj.weight"].T).reshape(n, nkv, hd)
        att = np.empty((n, nh, hd))
        for head in range(nh):
            kv = head // (nh // nkv)
            s = q[:, head] @ k[:, kv].T / math.sqrt(hd) + mask
            s = np.exp(s - s.max(axis=-1, keepdims=True))
            att[:, head] = (s / s.sum(axis=-1, keepdims=True)) @ v[:, kv]
        x = x + att.reshape(n, -1) @ W[p + "self_attn.o_proj.weight"].T
        h = ref.rms_norm(x, W[p + "post_attention_layernorm.weight"], eps)
        x = x + (ref.silu(h @ W[p + "mlp.gate_proj.weight"].T) * (h @ W[p + "mlp.up_proj.weight"].T)) \
            @ W[p + "mlp.down_proj.weight"].T
    return np.stack(out)


def reference_kv(weights, config, sequences):
    """Per layer: pre-RoPE keys and values [sequences, seqlen, kv_heads, head_dim] in float64."""
    nkv, hd = config["num_key_value_heads"], config["hidden_size"] // config["num_attention_heads"]
    xs = np.stack([layer_inputs(weights, config, ids) for ids in sequences], axis=1)   # [L, S, T, dim]
    out = []
    for i, x in enumerate(xs):
        p = f"model.layers.{i}.self_attn."
        k = x @ weights[p + "k_proj.weight"].astype(np.float64).T
        v = x @ weights[p + "v_proj.weight"].astype(np.float64).T
        out.append((k.reshape(*k.shape[:2], nkv, hd), v.reshape(*v.shape[:2], nkv, hd)))
    return out


@pytest.fixture(scope="module")
def reference(tiny, sequences):
    _, weights, config = tiny
    return reference_kv(weights, config, sequences)


@pytest.fixture(scope="module")
def config_of(tiny):
    _, _, c = tiny
    return c["num_hidden_layers"], c["num_key_value_heads"], c["hidden_size"] // c["num_attention_heads"]


def ref_thresholds(keys):
    """center, half_range [kv_heads, head_dim] from the 0.5th/99.5th percentiles per channel."""
    flat = keys.reshape(-1, *keys.shape[-2:])
    lo, hi = np.percentile(flat, 0.5, axis=0), np.percentile(flat, 99.5, axis=0)
    return (hi + lo) / 2, (hi - lo) / 2


def ref_key_sample(keys):
    center, half = ref_thresholds(keys[:, 1:])
    x = (keys[:, 1:].reshape(-1, *keys.shape[-2:]) - center) / half
    return x[np.abs(x) <= 1]


def ref_value_sample(values):
    """Per vector of head_dim values: the ceil(1%) largest |x| dropped, the rest mapped by their
    own min/max onto [-1, 1]; all vectors' inliers pooled."""
    hd = values.shape[-1]
    n_out = math.ceil(0.01 * hd)
    out = []
    for vec in values[:, 1:].reshape(-1, hd):
        rest = vec[np.argsort(-np.abs(vec))[n_out:]]
        lo, hi = rest.min(), rest.max()
        out.append((rest - (hi + lo) / 2) / ((hi - lo) / 2))
    return np.concatenate(out)


def lloyd_means(x, levels):
    """Brute force: the mean of the values whose nearest level each level is (NaN if none)."""
    nearest = np.argmin(np.abs(x[:, None] - np.asarray(levels, dtype=np.float64)[None, :]), axis=1)
    return np.array([x[nearest == j].mean() if (nearest == j).any() else np.nan for j in range(len(levels))])


# ------------------------------------------------------------------ (a) key thresholds
def test_key_thresholds_are_the_percentiles_of_pre_rope_keys_without_position_0(calibration, reference, config_of):
    for layer, (keys, _) in enumerate(reference):
        center, half = ref_thresholds(keys[:, 1:])
        np.testing.assert_allclose(calibration.key_center[layer], center, rtol=THRESHOLD_TOL, atol=THRESHOLD_TOL)
        np.testing.assert_allclose(calibration.key_half_range[layer], half, rtol=THRESHOLD_TOL,
                                   atol=THRESHOLD_TOL)
    # position 0 (BOS, planted ~8 sigma out in layer 0's channel 0) would have moved the range
    _, with_sink = ref_thresholds(reference[0][0])
    assert with_sink[0, 0] - calibration.key_half_range[0, 0, 0] > 0.5
    assert calibration.tokens == SEQUENCES * (SEQLEN - 1)
    assert (calibration.layers, calibration.kv_heads, calibration.head_dim) == config_of


def test_a_quantized_on_load_model_is_calibrated_on_its_quantized_weights(tiny, sequences):
    """Keys at run time come from the weights the model runs: here round to nearest at 4 bits."""
    d, weights, config = tiny
    engine = qinfer.Engine(d, threads=1, quantize=4, group_size=32)
    got = kvc.calibrate(engine, sequences[:4], bits=(3,), progress=False)
    quantized = ref.quantized_reference_weights(weights, 4, 32)
    keys = [k for k, _ in reference_kv(quantized, config, sequences[:4])]
    for layer, k in enumerate(keys):
        center, half = ref_thresholds(k[:, 1:])
        np.testing.assert_allclose(got.key_center[layer], center, rtol=THRESHOLD_TOL, atol=THRESHOLD_TOL)
        np.testing.assert_allclose(got.key_half_range[layer], half, rtol=THRESHOLD_TOL, atol=THRESHOLD_TOL)
    float_keys = [k for k, _ in reference_kv(weights, config, sequences[:4])]
    assert np.abs(got.key_half_range[1] - ref_thresholds(float_keys[1][:, 1:])[1]).max() > 10 * THRESHOLD_TOL
    assert got.bits == (3,)


def test_a_model_gives_what_its_engine_gives(engine, sequences, calibration):
    from qinfer.model import Model
    model = Model(engine.source, ctx=SEQLEN, threads=1)
    again = kvc.calibrate(model, sequences, progress=False, calib="random ids", weighting="none")
    np.testing.assert_allclose(again.key_center, calibration.key_center, rtol=0, atol=1e-6)
    for b in kvc.BITS:
        np.testing.assert_allclose(again.value_levels[b], calibration.value_levels[b], rtol=0, atol=1e-6)
    assert again.fingerprint == calibration.fingerprint


# ------------------------------------------------------------------ (b) levels
@pytest.mark.parametrize("n_levels", [4, 8, 16])
def test_fit_levels_is_a_fixed_point_of_lloyds_iteration(n_levels):
    rng = np.random.default_rng(n_levels)
    x = np.clip(np.concatenate([rng.laplace(0, 0.3, 4000), rng.uniform(-1, 1, 1000)]), -1, 1)
    levels = kvc.fit_levels(x, n_levels)
    assert levels.dtype == np.float32 and levels.shape == (n_levels,)
    assert np.all(np.diff(levels) > 0) and levels.min() >= -1 and levels.max() <= 1
    np.testing.assert_allclose(levels, lloyd_means(x, levels), rtol=0, atol=1e-6)
    # and it improved on where it started (the quantiles) and on evenly spaced levels
    sse = lambda lv: np.sum(np.min((x[:, None] - np.asarray(lv, dtype=np.float64)) ** 2, axis=1))
    start = np.quantile(x, (np.arange(n_levels) + 0.5) / n_levels)
    assert sse(levels) <= sse(start) + 1e-9 and sse(levels) < sse(np.linspace(-1, 1, n_levels))


def test_fit_levels_matches_a_plain_lloyd_loop():
    rng = np.random.default_rng(1)
    x = np.clip(rng.normal(0.1, 0.4, 3000), -1, 1)
    levels = np.quantile(x, (np.arange(8) + 0.5) / 8)
    for _ in range(1000):
        new = lloyd_means(x, levels)
        if np.array_equal(new, levels):
            break
        levels = new
    np.testing.assert_allclose(kvc.fit_levels(x, 8), levels, rtol=0, atol=1e-6)


def test_separated_clusters_get_their_means_and_masses_at_the_ends_do_not_stick_levels():
    rng = np.random.default_rng(2)
    centers = np.array([-0.8, -0.1, 0.3, 0.9])
    x = np.concatenate([c + rng.uniform(-0.02, 0.02, 500) for c in centers])
    np.testing.assert_allclose(kvc.fit_levels(x, 4), [x[i * 500:(i + 1) * 500].mean() for i in range(4)],
                               atol=1e-6)
    # 30% of the values at each of -1 and +1 (as values' own min and max are): quantile starts
    # put several levels on the same value; each must still end up owning values
    x = np.concatenate([np.full(3000, -1.0), np.full(3000, 1.0), rng.uniform(-1, 1, 4000)])
    levels = kvc.fit_levels(x, 16)
    assert len(np.unique(levels)) == 16
    np.testing.assert_allclose(levels, lloyd_means(x, levels), atol=1e-6)


def test_calibrated_levels_are_fixed_points_on_the_reference_samples(calibration, reference):
    for layer, (keys, values) in enumerate(reference):
        for kind, sample, fitted in (("key", ref_key_sample(keys), calibration.key_levels),
                                     ("value", ref_value_sample(values), calibration.value_levels)):
            assert len(sample) < kvc.MAX_SAMPLES          # all of them: no subsample to differ by
            for b in kvc.BITS:
                levels = fitted[b][layer]
                assert levels.shape == (2 ** b,) and np.all(np.diff(levels) > 0)
                assert levels.min() >= -1 and levels.max() <= 1
                err = np.max(np.abs(levels - lloyd_means(sample, levels)))
                assert err < FIXED_POINT_TOL, (kind, layer, b, err)


def weighted_lloyd_means(x, wt, levels):
    """Brute force: the weighted mean of the values whose nearest level each level is."""
    nearest = np.argmin(np.abs(x[:, None] - np.asarray(levels, dtype=np.float64)[None, :]), axis=1)
    return np.array([np.sum(wt[nearest == j] * x[nearest == j]) / np.sum(wt[nearest == j])
                     for j in range(len(levels))])


def test_fisher_levels_are_weighted_fixed_points(engine, sequences, reference):
    """With weighting="fisher" each level is the mean of its values weighted by their squared
    loss gradients (qinfer/kv_fisher.py, held against finite differences in test_kv_fisher.py),
    each sample value paired with its own position's and channel's weight; and the levels differ
    from the unweighted ones."""
    from qinfer.kv_fisher import key_value_fisher, model_weights

    got = kvc.calibrate(engine, sequences, progress=False, weighting="fisher")
    plain = kvc.calibrate(engine, sequences, progress=False, weighting="none")
    weights = model_weights(engine.model, engine.source)
    fisher = [key_value_fisher(weights, ids) for ids in sequences]          # per sequence: (fk, fv)
    for layer, (keys, values) in enumerate(reference):
        hd = keys.shape[-1]
        fk = np.stack([f[0][layer] for f in fisher])[:, 1:].reshape(-1, *keys.shape[-2:])
        fv = np.stack([f[1][layer] for f in fisher])[:, 1:].reshape(-1, hd)
        center, half = ref_thresholds(keys[:, 1:])
        x = (keys[:, 1:].reshape(-1, *keys.shape[-2:]) - center) / half
        key_x, key_w = x[np.abs(x) <= 1], fk[np.abs(x) <= 1]
        value_x, value_w = [], []
        n_out = math.ceil(0.01 * hd)
        for vec, wv in zip(values[:, 1:].reshape(-1, hd), fv):
            keep = np.argsort(-np.abs(vec))[n_out:]
            lo, hi = vec[keep].min(), vec[keep].max()
            value_x.append((vec[keep] - (hi + lo) / 2) / ((hi - lo) / 2))
            value_w.append(wv[keep])
        for kind, (sample, wt, fitted) in (("key", (key_x, key_w, got.key_levels)),
                                           ("value", (np.concatenate(value_x), np.concatenate(value_w),
                                                      got.value_levels))):
            for b in kvc.BITS:
                levels = fitted[b][layer]
                err = np.max(np.abs(levels - weighted_lloyd_means(sample, wt.astype(np.float64), levels)))
                assert err < 1e-4, (kind, layer, b, err)
        assert np.abs(got.key_levels[3][layer] - plain.key_levels[3][layer]).max() > 1e-3
    assert got.extra["weighting"] == "fisher" and plain.extra["weighting"] == "none"


def test_value_outliers_are_one_percent_rounded_up():
    assert [kvc.value_outlier_count(d) for d in (16, 64, 100, 101, 128, 700)] == [1, 1, 1, 2, 2, 7]


# ------------------------------------------------------------------ (c) the file
def test_save_and_load_round_trip_bit_for_bit(calibration, tiny, engine, tmp_path):
    path = tmp_path / "cal.safetensors"
    assert kvc.save(calibration, path) == str(path)
    back = kvc.load(path, engine.config, model_path=tiny[0])
    for name in ("key_center", "key_half_range"):
        assert np.array_equal(getattr(back, name), getattr(calibration, name))
    for b in kvc.BITS:
        assert np.array_equal(back.key_levels[b], calibration.key_levels[b])
        assert np.array_equal(back.value_levels[b], calibration.value_levels[b])
    assert (back.tokens, back.fingerprint, back.calib) == (calibration.tokens, calibration.fingerprint,
                                                          "random ids")
    assert [p.name for p in tmp_path.iterdir()] == ["cal.safetensors"]      # no temporary file left


def test_the_file_is_plain_safetensors(calibration, tmp_path):
    safetensors = pytest.importorskip("safetensors")
    path = tmp_path / "cal.safetensors"
    kvc.save(calibration, path)
    with safetensors.safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
        names = set(f.keys())
        assert f.get_tensor("key_levels.3").shape == (2, 8)
    assert names == {"key_center", "key_half_range"} | {f"{k}_levels.{b}" for k in ("key", "value")
                                                       for b in (2, 3, 4)}
    assert {k: meta[k] for k in ("format", "version", "layers", "kv_heads", "head_dim", "bits",
                                 "outlier_fraction", "tokens")} == {
        "format": "qinfer-kv-calibration", "version": "1", "layers": "2", "kv_heads": "2", "head_dim": "16",
        "bits": "2,3,4", "outlier_fraction": "0.01", "tokens": str(SEQUENCES * (SEQLEN - 1))}


def test_default_path_is_beside_the_model(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    assert kvc.default_path(gguf) == f"{gguf}.kvquant.safetensors"
    assert kvc.default_path(tmp_path) == str(tmp_path / "kvquant.safetensors")


# ------------------------------------------------------------------ (d) refusals
@pytest.fixture
def saved(calibration, tmp_path):
    path = tmp_path / "cal.safetensors"
    kvc.save(calibration, path)
    return path


def refused(path, config, *words, model_path=None):
    with pytest.raises(QinferError) as info:
        kvc.load(path, config, model_path=model_path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    for w in words:
        assert w in message, (w, message)
    return message


@pytest.mark.parametrize("change, words", [
    (dict(num_hidden_layers=3), ("2 layers", "this model has 3")),
    (dict(head_dim=32), ("head_dim of 16", "32")),
    (dict(num_key_value_heads=4), ("2 KV heads", "this model has 4")),
])
def test_load_refuses_a_file_for_another_shape(saved, engine, change, words):
    refused(saved, dataclasses.replace(engine.config, **change), *words)


def test_load_refuses_a_file_for_other_weights(saved, engine, write_tiny):
    other, _, _ = write_tiny("kvcal-other", seed=4)      # the same shape, other weights
    refused(saved, engine.config, "another model", str(other), model_path=other)


def test_load_refuses_a_missing_file(engine, tmp_path):
    refused(tmp_path / "absent.safetensors", engine.config, "no such file")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_load_refuses_a_damaged_file(saved, engine, damage):
    data = saved.read_bytes()
    saved.write_bytes({"truncated": data[:len(data) - 100], "garbage": b"\x07" * 64, "empty": b""}[damage])
    refused(saved, engine.config, "calibration file")


def test_load_refuses_a_file_missing_a_bit_width(calibration, engine, tmp_path):
    path = tmp_path / "cal.safetensors"
    without = dataclasses.replace(calibration, key_levels={b: calibration.key_levels[b] for b in (2, 4)},
                                  value_levels={b: calibration.value_levels[b] for b in (2, 4)})
    kvc.save(without, path)
    refused(path, engine.config, "no 3-bit levels")


def test_load_refuses_another_format(calibration, engine, tmp_path):
    path = tmp_path / "other.safetensors"
    write_safetensors(path, {"key_center": calibration.key_center}, {"format": "something-else", "version": "1"})
    refused(path, engine.config, "not a qinfer KV calibration file", "something-else")
    write_safetensors(path, {"key_center": calibration.key_center}, {"format": kvc.FORMAT, "version": "9"})
    refused(path, engine.config, "version '9'")


@pytest.mark.parametrize("name, spoil, words", [
    ("key_half_range", lambda a: a.__setitem__((0, 0, 0), 0.0), ("key_half_range", "<= 0")),
    ("key_center", lambda a: a.__setitem__((1, 1, 3), np.nan), ("key_center", "not finite")),
    ("value_levels", lambda a: a.__setitem__((0, 0), 0.5), ("value_levels.2", "sorted")),
    ("key_levels", lambda a: a.__setitem__((1, -1), 1.5), ("key_levels.2", "[-1, 1]")),
])
def test_load_refuses_bad_arrays(calibration, engine, tmp_path, name, spoil, words):
    c = dataclasses.replace(calibration, key_center=calibration.key_center.copy(),
                            key_half_range=calibration.key_half_range.copy(),
                            key_levels={b: a.copy() for b, a in calibration.key_levels.items()},
                            value_levels={b: a.copy() for b, a in calibration.value_levels.items()})
    target = getattr(c, name)
    spoil(target[2] if isinstance(target, dict) else target)
    path = tmp_path / "cal.safetensors"
    kvc.save(c, path)
    refused(path, engine.config, *words)


# ------------------------------------------------------------------ (e) the command line
@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    words = "the cat sat on a mat while rain fell over old stone bridges and quiet rivers".split()
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(" ".join(rng.choice(words, 3000)) + "\n")
    return path


def test_calibration_sequences_start_with_bos_when_the_model_expects_it(engine, text_file):
    windows = kvc.calibration_sequences(text_file, engine.tokenizer, 3, 20, seed=1)
    assert windows.shape == (3, 20) and windows.dtype == np.int32
    assert (windows[:, 0] == BOS).all() and (windows[:, 1:] != BOS).all()
    assert np.array_equal(windows, kvc.calibration_sequences(text_file, engine.tokenizer, 3, 20, seed=1))


def test_a_text_too_short_for_a_window_names_the_seqlen_asked_for(engine):
    with pytest.raises(QinferError, match="fewer than one window of --seqlen 64"):
        kvc.text_sequences("a few words", engine.tokenizer, 2, 64)


def test_cli_writes_the_file_beside_the_model_atomically(tiny, engine, text_file):
    d = tiny[0]
    before = set(p.name for p in d.iterdir())
    proc = run_cli("calibrate-kv", "--model", d, "--calib", text_file, "--sequences", 2, "--seqlen", 32,
                   "--threads", 1)
    assert proc.returncode == 0, proc.stderr
    out = d / "kvquant.safetensors"
    last = proc.stdout.strip().splitlines()[-1]
    assert str(out) in last and "62 calibration tokens" in last and "calib.txt" in last, last
    assert set(p.name for p in d.iterdir()) == before | {"kvquant.safetensors"}   # nothing else left
    back = kvc.load(out, engine.config, model_path=d)
    assert back.tokens == 62 and back.extra == {"sequences": "2", "seqlen": "32", "seed": "0",
                                                "weighting": "fisher"}
    out.unlink()


def test_cli_writes_out_where_asked(tiny, text_file, tmp_path):
    out = tmp_path / "cal.safetensors"
    proc = run_cli("calibrate-kv", "--model", tiny[0], "--calib", text_file, "--out", out, "--sequences", 1,
                   "--seqlen", 16, "--threads", 1)
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["cal.safetensors"]
    assert f"wrote {out}" in proc.stdout


def test_cli_bad_calib_path_is_one_line(tiny, tmp_path):
    missing = tmp_path / "nope.txt"
    proc = run_cli("calibrate-kv", "--model", tiny[0], "--calib", missing, "--out", tmp_path / "x.safetensors",
                   "--seqlen", 32)
    assert_user_error(proc, "calibration file", str(missing), "no such file")
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_out_in_a_missing_directory_is_one_line(tiny, text_file, tmp_path):
    proc = run_cli("calibrate-kv", "--model", tiny[0], "--calib", text_file, "--out", tmp_path / "no" / "x",
                   "--seqlen", 32)
    assert_user_error(proc, "cannot write", "not a writable directory")
