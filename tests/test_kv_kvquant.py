"""The kvquant4/3/2 KV cache formats (pyx/kv_cache.c, pyx/attention.c) against a numpy
reference written here from the scheme of qinfer/kv_calibration.py's docstring: keys
before RoPE per channel against calibrated ranges, values per token against their own,
each layer's non-uniform levels, outliers in float16 (the largest beyond a key channel's
range, up to the slots a position has; a value vector's largest), the sink (position 0)
in float16, RoPE applied to the dequantized keys. Attention runs alone
(Transformer.attend) on given queries, pre-RoPE keys and values, so the reference
quantizes the very float32 numbers the C side does."""
import numpy as np
import pytest

import llama_reference as ref
import qinfer
from helpers import assert_user_error, run_cli
from qinfer import kv_calibration
from qinfer.errors import QinferError
from test_kv_coded import SHAPES, attend, f16, qkv

ATOL = 3e-5


def levels_for(bits, seed):
    """Sorted levels in [-1, 1], unevenly spaced (as k-means gives)."""
    x = np.sort(np.random.default_rng(seed).uniform(-0.9, 0.85, 1 << bits)).astype(np.float32)
    x[0], x[-1] = -0.95, 0.9
    return x


def write_calibration(path, model_dir, config, seed=0):
    """A calibration file for the model at model_dir, from numbers made up here."""
    rng = np.random.default_rng(seed)
    L, H, D = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    cal = kv_calibration.Calibration(
        key_center=rng.normal(0, 0.5, (L, H, D)).astype(np.float32),
        key_half_range=np.exp(rng.normal(0, 0.7, (L, H, D))).astype(np.float32),
        key_levels={b: np.stack([levels_for(b, 10 * b + l) for l in range(L)]) for b in (2, 3, 4)},
        value_levels={b: np.stack([levels_for(b, 100 + 10 * b + l) for l in range(L)]) for b in (2, 3, 4)},
        tokens=1000, fingerprint=kv_calibration.fingerprint(config, model_dir), calib="made up")
    kv_calibration.save(cal, path)
    return cal


@pytest.fixture(scope="module")
def models(write_tiny, tmp_path_factory):
    """{shape: (model dir, calibration file, Calibration)}"""
    out = {}
    for shape, cfg in SHAPES.items():
        d, _, _ = write_tiny(f"kvq_{shape}", seed=5, max_position_embeddings=1024, **cfg)
        config = qinfer.Engine(d, threads=1, ctx=64).config
        path = tmp_path_factory.mktemp(f"kvqcal_{shape}") / "cal.safetensors"
        out[shape] = (d, path, write_calibration(path, d, config))
    return out


def engine(models, shape, name, **options):
    d, path, _ = models[shape]
    return qinfer.Engine(d, threads=1, ctx=512, kv_cache=name, kv_calibration=path, **options)


# ---------------------------------------------------------------- reference

def nearest(x, levels):
    """Index of the nearest level (the lower one when midway)."""
    return np.argmin(np.abs(x[..., None] - levels), axis=-1)


def rope(x, position, inv_freq):
    """Rotate-half RoPE of x [hd] at `position` (float64)."""
    half = len(x) // 2
    angle = position * inv_freq.astype(np.float64)
    c, s = np.cos(angle), np.sin(angle)
    a, b = x[:half].astype(np.float64), x[half:].astype(np.float64)
    return np.concatenate([a * c - b * s, b * c + a * s])


def dequantized_keys(k, center, half_range, levels, inv_freq):
    """k [n, hd] pre-RoPE -> the keys attention reads [n, hd], after RoPE."""
    n, hd = k.shape
    slots = max(2, hd // 32)
    xn = (k - center) / half_range                                   # float32, as stored
    codes = nearest(np.clip(xn, -1, 1), levels)
    deq = (center + half_range * levels[codes]).astype(np.float64)
    for p in range(n):
        beyond = np.flatnonzero(np.abs(xn[p]) > 1)
        keep = beyond[np.argsort(-np.abs(xn[p, beyond]), kind="stable")][:slots]
        deq[p, keep] = f16(k[p, keep])
    out = np.stack([rope(deq[p], p, inv_freq) for p in range(n)])
    out[0] = f16(rope(k[0], 0, inv_freq))                            # the sink
    return out


def dequantized_values(v, levels):
    n, hd = v.shape
    n_out = (hd + 99) // 100
    deq = np.empty((n, hd))
    for p in range(n):
        out = np.argsort(-np.abs(v[p]), kind="stable")[:n_out]
        inl = np.delete(v[p], out)
        mid, radius = f16((inl.max() + inl.min()) / np.float32(2)), f16((inl.max() - inl.min()) / np.float32(2))
        xn = np.clip((v[p] - mid) / radius, -1, 1) if radius > 0 else np.zeros(hd, np.float32)
        deq[p] = mid + radius * levels[nearest(xn, levels)]
        deq[p, out] = f16(v[p, out])
    deq[0] = f16(v[0])
    return deq


def reference(q, k, v, cal, bits, heads, kv_heads, inv_freq, layer=0, residual=128):
    """Attention through the cache: a query at p reads positions p + 1 - residual.. whole
    (float16, keys rotated after), the older ones dequantized."""
    n = q.shape[0]
    hd = q.shape[1] // heads
    out = np.zeros((n, heads * hd))
    for j in range(kv_heads):
        cols = slice(j * hd, (j + 1) * hd)
        keys = dequantized_keys(k[:, cols], cal.key_center[layer, j], cal.key_half_range[layer, j],
                                cal.key_levels[bits][layer], inv_freq)
        values = dequantized_values(v[:, cols], cal.value_levels[bits][layer])
        whole_keys = np.stack([rope(f16(k[p, cols]), p, inv_freq) for p in range(n)])   # held before RoPE
        whole_values = f16(v[:, cols]).astype(np.float64)
        for h in range(j * (heads // kv_heads), (j + 1) * (heads // kv_heads)):
            for p in range(n):
                first = max(0, p + 1 - residual) if residual else p + 1
                kp = np.concatenate([keys[:first], whole_keys[first:p + 1]])
                vp = np.concatenate([values[:first], whole_values[first:p + 1]])
                s = kp @ q[p, h * hd:(h + 1) * hd].astype(np.float64) / np.sqrt(hd)
                s = np.exp(s - s.max())
                out[p, h * hd:(h + 1) * hd] = (s / s.sum()) @ vp
    return out


def inputs(e, n, seed):
    """Queries, pre-RoPE keys with channels of very different sizes and offsets (outliers
    beyond the made-up calibrated ranges among them), values."""
    cfg = e.config
    q, k, v = qkv(n, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, seed=seed)
    return q, k, v


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["kvquant4", "kvquant3", "kvquant2"])
@pytest.mark.parametrize("residual", [128, 0, 45])
def test_attention_matches_the_reference(models, shape, name, residual):
    e = engine(models, shape, name, kv_residual=residual)
    cfg = e.config
    q, k, v = inputs(e, 200, seed=0)
    got = attend(e.model.transformer, q, k, v, chunks=[1, 37, 128, 5, 1])
    bits = int(name[-1])
    inv_freq = ref.rope_inv_freq(cfg.head_dim, cfg.rope_theta)
    want = reference(q, k, v, models[shape][2], bits, cfg.num_attention_heads, cfg.num_key_value_heads, inv_freq,
                     residual=residual)
    err = np.abs(got - want).max()
    assert err <= ATOL, err


def test_the_window_reads_the_newest_tokens_whole(models):
    """With a window the output is the windowed reference's, and clearly not the
    window-less one's (and the other way round): the window is really read."""
    cfg_e = engine(models, "gqa", "kvquant2")
    cfg = cfg_e.config
    q, k, v = inputs(cfg_e, 160, seed=3)
    inv_freq = ref.rope_inv_freq(cfg.head_dim, cfg.rope_theta)
    args = (q, k, v, models["gqa"][2], 2, cfg.num_attention_heads, cfg.num_key_value_heads, inv_freq)
    with_window, without = reference(*args, residual=64), reference(*args, residual=0)
    got = attend(engine(models, "gqa", "kvquant2", kv_residual=64).model.transformer, q, k, v, chunks=[128, 32])
    assert np.abs(got - with_window).max() <= ATOL
    assert np.abs(got - without).max() > 100 * ATOL


@pytest.mark.parametrize("name", ["kvquant4", "kvquant2"])
def test_the_keys_are_rotated_after_they_are_read(models, name):
    """The same keys fed as if already rotated (a reference that skips RoPE on the cache)
    are clearly off: the cache really holds them before RoPE."""
    e = engine(models, "gqa", name)
    cfg = e.config
    q, k, v = inputs(e, 100, seed=1)
    got = attend(e.model.transformer, q, k, v, chunks=[100])
    zero = np.zeros_like(ref.rope_inv_freq(cfg.head_dim, cfg.rope_theta))
    unrotated = reference(q, k, v, models["gqa"][2], int(name[-1]), cfg.num_attention_heads,
                          cfg.num_key_value_heads, zero)
    assert np.abs(got - unrotated).max() > 100 * ATOL


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["kvquant4", "kvquant3", "kvquant2"])
@pytest.mark.parametrize("residual", [128, 0, 45])
def test_chunked_prefill_equals_decoding_bit_for_bit_on_any_threads(models, shape, name, residual):
    e = engine(models, shape, name, kv_residual=residual)
    q, k, v = inputs(e, 150, seed=2)
    prefill = attend(e.model.transformer, q, k, v, chunks=[128])
    steps = attend(engine(models, shape, name, kv_residual=residual).model.transformer, q, k, v, chunks=[1])
    two = attend(engine(models, shape, name, kv_residual=residual).model.transformer, q, k, v, chunks=[33, 1],
                 threads=2)
    assert np.array_equal(prefill, steps)
    assert np.array_equal(prefill, two)


@pytest.mark.parametrize("name", ["kvquant4", "kvquant2"])
def test_the_whole_model_prefills_as_it_decodes(models, name):
    ids = [1] + np.random.default_rng(7).integers(3, 32000, size=199).tolist()
    a = engine(models, "gqa", name)
    whole = a.logits(ids)
    b = engine(models, "gqa", name)
    b.prefill(ids[:1])
    steps = np.stack([b.decode_step(t) for t in ids[1:]])
    diff = np.abs(steps - whole[1:])
    assert diff.mean() < 2e-3 and diff.max() < 0.5, (diff.max(), diff.mean())


def test_bytes_per_token(models):
    e = engine(models, "gqa", "kvquant3")
    cfg = e.config
    hd = cfg.head_dim                                       # 64: 2 key outlier slots, 1 value outlier
    per_head = 2 * (3 * hd // 8) + 2 * 4 + (4 + 4 * 1)      # codes; key slots; center, half-range, outlier
    assert e.model.transformer.kv_bytes_per_token == cfg.num_hidden_layers * cfg.num_key_value_heads * per_head
    assert e.model.kv_spec.bytes_per_token(cfg) == e.model.transformer.kv_bytes_per_token


def test_a_missing_calibration_is_a_clear_error(models, tmp_path):
    d, _, _ = models["gqa"]
    with pytest.raises(QinferError, match="no such file.*calibrate-kv"):
        qinfer.Engine(d, threads=1, ctx=64, kv_cache="kvquant3")      # none beside the model
    with pytest.raises(QinferError, match="no such file"):
        qinfer.Engine(d, threads=1, ctx=64, kv_cache="kvquant3", kv_calibration=tmp_path / "none")
    with pytest.raises(QinferError, match="applies to the kvquant formats"):
        qinfer.Engine(d, threads=1, ctx=64, kv_cache="q8", kv_calibration=models["gqa"][1])


def test_another_models_calibration_is_refused(models):
    d, _, _ = models["gqa"]
    other = models["mha128"][1]
    with pytest.raises(QinferError, match="calibration file"):
        qinfer.Engine(d, threads=1, ctx=64, kv_cache="kvquant3", kv_calibration=other)


def test_the_cli_takes_the_calibration(models):
    d, path, _ = models["gqa"]
    proc = run_cli("bench", "--model", d, "-p", "40", "-n", "4", "-r", "1", "-t", "1", "--ctx", "128",
                   "--kv-cache", "kvquant2", "--kv-calibration", path)
    assert proc.returncode == 0, proc.stderr
    assert "KV cache: kvquant2 (window 128)" in proc.stdout
    proc = run_cli("bench", "--model", d, "-p", "40", "-n", "4", "-r", "1", "-t", "1", "--ctx", "128",
                   "--kv-cache", "kvquant3", "--kv-calibration", path, "--kv-residual", "0")
    assert proc.returncode == 0, proc.stderr
    assert "KV cache: kvquant3 (no window)" in proc.stdout
    assert_user_error(run_cli("generate", "--model", d, "--prompt", "hi", "--kv-cache", "kvquant4"),
                      "calibrate-kv")


@pytest.mark.parametrize("option, message", [
    (["--kv-residual", "-1"], "must be a non-negative number of tokens"),
    (["--kv-group", "64"], "group applies to the kivi formats, not kvquant3"),
])
def test_bad_window_settings_are_one_clear_line(models, option, message):
    d, path, _ = models["gqa"]
    assert_user_error(run_cli("generate", "--model", d, "--prompt", "hi", "--kv-cache", "kvquant3",
                              "--kv-calibration", path, *option), message)


@pytest.mark.skipif(not qinfer.kernels.has_float_avx512(), reason="the CPU has no AVX-512")
@pytest.mark.parametrize("name", ["kvquant4", "kvquant3", "kvquant2"])
def test_avx2_and_avx512_lookups_agree_bit_for_bit(models, name):
    """kvquant's loops built for AVX-512's registers (pyx/attention.c) give AVX2's sums."""
    from qinfer import _forward
    e = engine(models, "gqa", name)
    q, k, v = inputs(e, 120, seed=6)
    previous = _forward.set_kv_avx512(True)
    try:
        wide = attend(e.model.transformer, q, k, v, chunks=[100, 1])
        _forward.set_kv_avx512(False)
        narrow = attend(engine(models, "gqa", name).model.transformer, q, k, v, chunks=[100, 1])
    finally:
        _forward.set_kv_avx512(previous)
    assert np.array_equal(wide, narrow)


@pytest.mark.parametrize("name", ["kvquant4", "kvquant3", "kvquant2"])
def test_portable_and_avx2_lookups_agree_bit_for_bit(models, name):
    """kvquant's codes become floats by table lookups, AVX2's permutes where the CPU has
    them, else one lane at a time (pyx/attention.c): exact both ways, so the same sums."""
    from qinfer import _forward
    e = engine(models, "gqa", name)
    q, k, v = inputs(e, 120, seed=4)
    fast = attend(e.model.transformer, q, k, v, chunks=[100, 1])
    previous = _forward.set_kv_hardware_halves(False)
    try:
        portable = attend(engine(models, "gqa", name).model.transformer, q, k, v, chunks=[100, 1])
    finally:
        _forward.set_kv_hardware_halves(previous)
    assert np.array_equal(fast, portable)


@pytest.mark.parametrize("name", ["kvquant3", "kvquant2"])
def test_the_teams_store_and_read_as_the_per_call_path(models, name):
    """As test_kv_coded.py's: the decode and rows teams store kvquant's codes, outliers and
    window by (row, KV head) over the threads, and give the per-call logits bit for bit."""
    from test_kv_coded import assert_teams_match_per_call

    d, path, _ = models["gqa"]
    assert_teams_match_per_call(d, name, seed=13, kv_calibration=path)
