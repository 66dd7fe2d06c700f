"""The coded KV cache formats (q8, kivi4, kivi2; pyx/kv_cache.c, pyx/kv_kernels.h.tp)
against a numpy reference written here: its own quantizers, by the rules of
qinfer/kv_cache.py's docstring, and attention in float64 where each query reads the
cache as it stood when its token was decoded (KIVI's float16 window: the newest values,
and the key groups that end inside it).

Attention runs alone (Transformer.attend) on queries, keys and values given here, so the
reference quantizes the very float32 numbers the C side does: its codes are the same,
and what is left is the order of float32 sums."""
import numpy as np
import pytest

import qinfer
from qinfer.errors import UnsupportedError
from helpers import assert_user_error, run_cli

ATOL = 3e-5      # float32 sums vs. float64, outputs of size ~1


def f16(x):
    return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)


# ---------------------------------------------------------------- quantizers

def q8_dequantize(x):
    """x [..., n] (n a multiple of 32): int8 codes with a float16 scale per 32 values."""
    g = x.reshape(*x.shape[:-1], -1, 32).astype(np.float32)
    d = np.max(np.abs(g), axis=-1, keepdims=True) / np.float32(127)
    codes = np.where(d > 0, np.rint(g / np.where(d > 0, d, 1)), 0)
    return (codes * f16(d)).reshape(x.shape)


def kivi_dequantize(x, bits, axis):
    """Groups along `axis` of x (float16 values as float32): min/max asymmetric codes, with
    the codes rounded against the float16 scale and minimum they are read with."""
    top = np.float32(2 ** bits - 1)
    lo, hi = x.min(axis=axis, keepdims=True), x.max(axis=axis, keepdims=True)
    scale, minimum = f16((hi - lo) / top), f16(lo)
    codes = np.where(scale > 0, np.clip(np.rint((x - minimum) / np.where(scale > 0, scale, 1)), 0, top), 0)
    return codes.astype(np.float32) * scale + minimum


def views(name, k, v, residual=128, group=32):
    """read(p) -> (keys, values) [p + 1, hd] a query at position p reads, for one KV head's
    k, v [n, hd]."""
    n, hd = k.shape
    if name == "q8":
        kq, vq = q8_dequantize(k), q8_dequantize(v)
        return lambda p: (kq[:p + 1], vq[:p + 1])
    bits = {"kivi4": 4, "kivi2": 2}[name]
    k16, v16 = f16(k), f16(v)
    vq = kivi_dequantize(v16.reshape(n, hd // group, group), bits, axis=-1).reshape(n, hd)
    kq = k16.copy()
    for g0 in range(0, n - n % group, group):      # whole groups of positions, per channel
        kq[g0:g0 + group] = kivi_dequantize(k16[g0:g0 + group], bits, axis=0)

    def read(p):
        start = max(0, p + 1 - residual)
        key_start = start // group * group
        keys = np.concatenate([kq[:key_start], k16[key_start:p + 1]])
        values = np.concatenate([vq[:start], v16[start:p + 1]])
        return keys, values
    return read


def reference_attention(name, q, k, v, heads, kv_heads, **settings):
    """float64 causal GQA attention of q [n, heads*hd] over k, v [n, kv_heads*hd]."""
    n = q.shape[0]
    hd = q.shape[1] // heads
    out = np.zeros((n, heads * hd))
    reads = [views(name, k[:, j * hd:(j + 1) * hd], v[:, j * hd:(j + 1) * hd], **settings)
             for j in range(kv_heads)]
    for h in range(heads):
        read = reads[h // (heads // kv_heads)]
        for p in range(n):
            keys, values = read(p)
            s = keys.astype(np.float64) @ q[p, h * hd:(h + 1) * hd].astype(np.float64) / np.sqrt(hd)
            s = np.exp(s - s.max())
            out[p, h * hd:(h + 1) * hd] = (s / s.sum()) @ values
    return out


# ---------------------------------------------------------------- fixtures

SHAPES = {  # (hidden, heads, KV heads): head_dim 64 with groups of 3 heads (like SmolLM2), 128 without GQA
    "gqa": dict(hidden_size=384, num_attention_heads=6, num_key_value_heads=2),
    "mha128": dict(hidden_size=256, num_attention_heads=2, num_key_value_heads=2),
}


@pytest.fixture(scope="module")
def models(write_tiny):
    return {shape: write_tiny(f"kvc_{shape}", seed=4, max_position_embeddings=1024, **cfg)[0]
            for shape, cfg in SHAPES.items()}


def qkv(n, heads, kv_heads, hd, seed=0):
    """Random queries, keys and values; keys with channels of very different sizes (the
    outlier channels that make KIVI quantize keys per channel)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n, heads * hd)).astype(np.float32)
    channel = np.exp(rng.standard_normal(kv_heads * hd)).astype(np.float32)
    k = (rng.standard_normal((n, kv_heads * hd)) * channel + 0.5 * channel).astype(np.float32)
    v = rng.standard_normal((n, kv_heads * hd)).astype(np.float32)
    return q, k, v


def attend(transformer, q, k, v, chunks, threads=1):
    """Feed the tokens in calls of the given sizes (cycled), as prefill chunks or decode steps."""
    out, pos, i = [], 0, 0
    while pos < len(q):
        n = min(chunks[i % len(chunks)], len(q) - pos)
        out.append(transformer.attend(0, pos, q[pos:pos + n], k[pos:pos + n], v[pos:pos + n], threads))
        pos, i = pos + n, i + 1
    return np.concatenate(out)


def engine(path, name, ctx=512, **settings):
    return qinfer.Engine(path, threads=1, ctx=ctx, kv_cache=name, **settings)


CASES = [("q8", {}), ("kivi4", {}), ("kivi2", {}), ("kivi4", dict(kv_residual=64, kv_group=64)),
         ("kivi2", dict(kv_residual=0, kv_group=32))]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name, settings", CASES)
def test_attention_matches_the_reference_across_every_boundary(models, shape, name, settings):
    """400 positions: past the window (R), through many groups, with calls of 1 to 128
    tokens that start and end anywhere in a block."""
    e = engine(models[shape], name, **settings)
    if settings.get("kv_group", 32) > e.config.head_dim:
        pytest.skip("group wider than the head")
    cfg = e.config
    heads, kv_heads, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q, k, v = qkv(400, heads, kv_heads, hd)
    got = attend(e.model.transformer, q, k, v, chunks=[1, 37, 128, 5, 64, 1, 1, 100])
    ref = dict(residual=settings.get("kv_residual", 128), group=settings.get("kv_group", 32)) \
        if name.startswith("kivi") else {}
    want = reference_attention(name, q, k, v, heads, kv_heads, **ref)
    err = np.abs(got - want).max()
    assert err <= ATOL, err


@pytest.mark.parametrize("name, settings", CASES)
def test_the_codes_are_really_used(models, name, settings):
    """The same attention against the reference with the codes' rounding left out (float16
    keys and values, or float32 for q8) is clearly further off than the tolerance: what
    the tests above compare is the quantized cache."""
    e = engine(models["gqa"], name, **settings)
    cfg = e.config
    heads, kv_heads, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q, k, v = qkv(300, heads, kv_heads, hd, seed=2)
    got = attend(e.model.transformer, q, k, v, chunks=[128])
    unrounded = reference_attention("kivi4", q, k, v, heads, kv_heads, residual=10**6)
    assert np.abs(got - unrounded).max() > 100 * ATOL


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name, settings", CASES)
def test_chunked_prefill_equals_decoding_bit_for_bit_on_any_threads(models, shape, name, settings):
    path = models[shape]
    whole = engine(path, name, **settings)
    cfg = whole.config
    q, k, v = qkv(330, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, seed=1)
    prefill = attend(whole.model.transformer, q, k, v, chunks=[128])
    steps = attend(engine(path, name, **settings).model.transformer, q, k, v, chunks=[1])
    two_threads = attend(engine(path, name, **settings).model.transformer, q, k, v, chunks=[77, 1, 32], threads=2)
    assert np.array_equal(prefill, steps)
    assert np.array_equal(prefill, two_threads)


@pytest.mark.parametrize("name", ["q8", "kivi4", "kivi2"])
def test_the_whole_model_prefills_as_it_decodes(models, name):
    """Through the model (projections, RoPE, every layer, the decode team): a 300-token
    prefill, fed in the windowed formats' chunks of 128, against decoding token by token.
    Not bit for bit: a prefill's projections (matrix kernels) and a step's (vector
    kernels) differ in the last bits, which now and then moves a key or value to the
    neighbouring code (attention alone is bit for bit, above)."""
    path = models["gqa"]
    ids = [1] + np.random.default_rng(7).integers(3, 32000, size=299).tolist()
    a = engine(path, name)
    whole = a.logits(ids)
    b = engine(path, name)
    b.prefill(ids[:1])
    steps = np.stack([b.decode_step(t) for t in ids[1:]])
    diff = np.abs(steps - whole[1:])
    # measured: mean 1e-4 (f16), 3e-4 (q8), 6e-4 (kivi2) for logits of mean size 1.6;
    # a misplaced chunk or group gives differences of the logits' own size
    assert diff.mean() < 2e-3 and diff.max() < 0.5, (diff.max(), diff.mean())


def test_bytes_per_token(models):
    """Each format's bytes per token, computed here from its layout."""
    e = engine(models["gqa"], "f32")
    cfg = e.config
    values = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim
    want = {"q8": values * (1 + 2 / 32), "kivi4": values * (0.5 + 4 / 32), "kivi2": values * (0.25 + 4 / 32)}
    for name, size in want.items():
        got = engine(models["gqa"], name)
        assert got.model.transformer.kv_bytes_per_token == size
        assert got.model.kv_spec.bytes_per_token(cfg) == size
    wide = engine(models["gqa"], "kivi4", kv_group=64, kv_residual=128)
    assert wide.model.transformer.kv_bytes_per_token == values * (0.5 + 4 / 64)


@pytest.mark.parametrize("settings, message", [
    (dict(kv_residual=100), "multiple of the group"),
    (dict(kv_residual=-32), "multiple of the group"),
    (dict(kv_group=48), "not one of 32, 64, 128"),
    (dict(kv_group=128), "does not divide the model's head size 64"),
])
def test_bad_kivi_settings_are_refused(models, settings, message):
    with pytest.raises(UnsupportedError, match=message):
        engine(models["gqa"], "kivi4", **settings)


def test_settings_of_kivi_alone(models):
    with pytest.raises(UnsupportedError, match="applies to the kivi and kvquant formats, not q8"):
        engine(models["gqa"], "q8", kv_residual=64)
    with pytest.raises(UnsupportedError, match="group applies to the kivi formats, not q8"):
        engine(models["gqa"], "q8", kv_group=64)


def test_the_cli_takes_the_kivi_settings(models):
    path = models["gqa"]
    proc = run_cli("bench", "--model", path, "-p", "40", "-n", "4", "-r", "1", "-t", "1",
                   "--kv-cache", "kivi2", "--kv-residual", "64", "--kv-group", "64", "--ctx", "128")
    assert proc.returncode == 0, proc.stderr
    assert "KV cache: kivi2 (window 64, group 64)" in proc.stdout
    assert_user_error(run_cli("generate", "--model", path, "--prompt", "hi", "--kv-cache", "kivi4",
                              "--kv-residual", "40"), "multiple of the group")


needs_avx512 = pytest.mark.skipif(not qinfer.kernels.has_float_avx512(),
                                  reason="the CPU has no AVX-512: only the AVX2 build of the loops runs")


@needs_avx512
@pytest.mark.parametrize("name", ["f32", "f16", "q8", "kivi4", "kivi2"])
def test_avx2_and_avx512_builds_agree_bit_for_bit(models, name):
    """Attention's loops are built again for AVX-512 (pyx/attention.c): the same source and
    vector width with 32 registers, so the same multiply-adds in the same order, through
    a prefill's widened tiles and a decode step's codes alike."""
    from qinfer import _forward
    cfg = engine(models["gqa"], "f32").config
    q, k, v = qkv(300, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, seed=5)
    previous = _forward.set_kv_avx512(True)
    try:
        wide = attend(engine(models["gqa"], name).model.transformer, q, k, v, chunks=[100, 1])
        _forward.set_kv_avx512(False)
        narrow = attend(engine(models["gqa"], name).model.transformer, q, k, v, chunks=[100, 1])
    finally:
        _forward.set_kv_avx512(previous)
    assert np.array_equal(wide, narrow)


@pytest.mark.parametrize("name", ["q8", "kivi4", "kivi2"])
def test_portable_and_avx2_loops_agree(models, name):
    """The coded loops are built twice (pyx/attention.c): portable C, and with AVX2's byte
    widening and F16C's conversions; the CPU picks. Same sums in the same order; the
    compiler fuses a different choice of multiplies and adds, hence a float32 rounding."""
    from qinfer import _forward
    cfg = engine(models["gqa"], "f32").config
    q, k, v = qkv(300, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, seed=3)
    fast = attend(engine(models["gqa"], name).model.transformer, q, k, v, chunks=[100, 1])
    previous = _forward.set_kv_hardware_halves(False)
    try:
        portable = attend(engine(models["gqa"], name).model.transformer, q, k, v, chunks=[100, 1])
    finally:
        _forward.set_kv_hardware_halves(previous)
    np.testing.assert_allclose(fast, portable, rtol=0, atol=2e-6)


@pytest.mark.parametrize("name", ["q8", "kivi4", "kivi2"])
def test_batched_steps_of_several_sequences_read_their_own_coded_caches(models, name):
    """A server's slots (Model.new_cache, forward_rows): each sequence's step equals that
    sequence decoded alone, past the window and a group boundary."""
    path = models["gqa"]
    ids = [1] + np.random.default_rng(9).integers(3, 32000, size=299).tolist()
    model = engine(path, name).model
    cache = model.new_cache(400, seqs=2)
    starts = [ids[:160], ids[100:271]]          # 160 and 171 tokens: past R = 128
    for seq, prompt in enumerate(starts):
        model.forward(prompt, 0, cache=cache, seq=seq)
    nxt = [ids[280], ids[281]]
    got = model.forward_rows(nxt, [0, 1], [len(starts[0]), len(starts[1])], cache)
    for seq in range(2):
        alone = engine(path, name)
        alone.prefill(starts[seq])
        want = alone.decode_step(nxt[seq])
        np.testing.assert_allclose(got[seq], want, rtol=0, atol=2e-4)


def test_the_default_is_q8_where_the_heads_take_it(models, write_tiny, monkeypatch):
    """Chosen by measurement (docs/perplexity.md): the most compact format within 0.1% of
    f32's perplexity; f16 for heads that are not a multiple of 32 (q8's scale groups)."""
    monkeypatch.delenv("QINFER_KV_CACHE", raising=False)
    assert qinfer.Engine(models["gqa"], threads=1, ctx=64).model.kv_cache == "q8"
    d, _, _ = write_tiny("kv_default_small", seed=1)                 # head_dim 16
    assert qinfer.Engine(d, threads=1, ctx=64).model.kv_cache == "f16"
    monkeypatch.setenv("QINFER_KV_CACHE", "kivi4")
    assert qinfer.Engine(models["gqa"], threads=1, ctx=64).model.kv_cache == "kivi4"


def team_and_per_call(e, ids, cache_seqs=2):
    """(decode steps, batched steps) of engine e, each with the team and per call: in a team
    the cache stores go by (row, KV head) over the threads (forward.c, cache_and_attend)."""
    out = {}
    for team in (True, False):
        e.model.transformer.decode_team = team
        e.reset()
        e.prefill(ids[:5])
        decoded = np.stack([e.decode_step(t) for t in ids[5:75]])     # past group ends at 32 and 64
        cache = e.model.new_cache(256, seqs=cache_seqs)
        cache.transformer.decode_team = team
        starts = [ids[:20], ids[30:47]]
        for seq, prompt in enumerate(starts):
            e.model.forward(prompt, 0, cache=cache, seq=seq)
        rows = []
        for i in range(50):                                             # 20.. and 17..: past 32 and 64
            rows.append(e.model.forward_rows([ids[100 + i], ids[200 + i]], [0, 1],
                                             [len(starts[0]) + i, len(starts[1]) + i], cache))
        out[team] = (decoded, np.stack(rows))
    return out


def assert_teams_match_per_call(path, name, seed, **settings):
    """The model at path, 4-bit with int8 activations on 2 threads and KV cache `name`: its
    teams' decode and batched steps equal the per-call path's bit for bit."""
    e = qinfer.Engine(path, threads=2, ctx=512, kv_cache=name, quantize=4, group_size=32, activations="int8",
                      **settings)
    if qinfer.kernels.active_path() != "avx2":
        pytest.skip("the teams run on the AVX2 path")
    assert e.model.transformer.team_ready and e.model.transformer.rows_team_ready
    ids = [1] + np.random.default_rng(seed).integers(3, 32000, size=299).tolist()
    got = team_and_per_call(e, ids)
    for a, b in zip(got[True], got[False]):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("name", ["q8", "kivi2"])
def test_the_teams_store_and_read_as_the_per_call_path(models, name):
    """Decode steps (decode team) and batched steps (rows team) of a quantized model with int8
    activations give the per-call path's logits bit for bit, across KIVI's group closings."""
    assert_teams_match_per_call(models["gqa"], name, seed=12)
