"""The KV cache's formats (qinfer/kv_cache.py, pyx/attention.c): f32 and f16 against the
float64 reference of tests/llama_reference.py, whose attention reads keys and values
rounded the way the format stores them (numpy's own float16 rounding, not qinfer's)."""
import numpy as np
import pytest

import llama_reference as ref
import qinfer
from qinfer import kv_cache
from helpers import assert_user_error, run_cli
from qinfer.errors import UnsupportedError

LOGIT_TOL = 1e-3          # engine (float32) vs. the float64 reference, as tests/test_engine.py


def to_f16(a):
    return a.astype(np.float16).astype(np.float64)


@pytest.fixture(scope="module")
def tiny(write_tiny):
    return write_tiny("kv", seed=11)


@pytest.fixture(scope="module")
def ids():
    # 70 tokens: three key blocks of 32 positions, the last one partial
    return [1] + np.random.default_rng(5).integers(3, 32000, size=69).tolist()


def max_err(a, b):
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def test_f16_cache_matches_a_reference_that_rounds_keys_and_values(tiny, ids):
    d, weights, config = tiny
    exact, rounded = ref.forward(weights, config, ids), ref.forward(weights, config, ids, kv_round=to_f16)
    f16 = qinfer.Engine(d, threads=1, kv_cache="f16").logits(ids)
    f32 = qinfer.Engine(d, threads=1).logits(ids)
    assert max_err(f32, exact) <= LOGIT_TOL
    assert max_err(f16, rounded) <= LOGIT_TOL
    # the rounding is there to see: f16 is ~3x closer to the reference that rounds (what is
    # left is keys whose float32 and float64 values round to neighbouring halves) than to
    # the exact one, and f32 is ~500x closer to the exact one than f16 is
    assert max_err(f16, exact) > 2 * max_err(f16, rounded)
    assert max_err(f16, exact) > 100 * max_err(f32, exact)


@pytest.mark.parametrize("name, tol", [("f32", 1e-4), ("f16", LOGIT_TOL)])
def test_decoding_token_by_token_equals_the_prefill_and_threads_do_not_matter(tiny, ids, name, tol):
    """A prefill reads its own keys and values back from the cache, as decoding does;
    the two paths' float32 keys differ in the last bits (other kernels), which now and
    then rounds a key to the neighbouring half: hence f16's looser tolerance."""
    d, _, _ = tiny
    one = qinfer.Engine(d, threads=1, kv_cache=name)
    two = qinfer.Engine(d, threads=2, kv_cache=name)
    whole = one.logits(ids)
    one.reset()
    one.prefill(ids[:1])
    steps = np.stack([one.decode_step(t) for t in ids[1:]])
    assert np.array_equal(two.logits(ids), whole)
    np.testing.assert_allclose(steps, whole[1:], rtol=0, atol=tol)


def test_f16_halves_the_bytes_per_token(tiny):
    d, _, config = tiny
    sizes = {name: qinfer.Engine(d, threads=1, kv_cache=name).model.transformer.kv_bytes_per_token
             for name in ("f32", "f16")}
    cfg = qinfer.Engine(d, threads=1).config
    per_value = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim
    assert sizes == {"f32": 4 * per_value, "f16": 2 * per_value}
    assert kv_cache.bytes_per_token(cfg, "f16") == sizes["f16"]


def test_batched_steps_read_the_f16_cache_too(tiny, ids):
    """A server's slots (Model.new_cache, forward_rows) hold the engine's format."""
    d, weights, config = tiny
    model = qinfer.Engine(d, threads=1, kv_cache="f16").model
    cache = model.new_cache(64, seqs=2)
    starts = [ids[:20], ids[30:45]]
    for seq, prompt in enumerate(starts):
        model.forward(prompt, 0, cache=cache, seq=seq)
    nxt = [ids[50], ids[51]]
    got = model.forward_rows(nxt, [0, 1], [len(starts[0]), len(starts[1])], cache)
    for seq in range(2):
        want = ref.forward(weights, config, starts[seq] + [nxt[seq]], kv_round=to_f16)[-1]
        assert max_err(got[seq], want) <= LOGIT_TOL


@pytest.mark.parametrize("name", ["F16", "fp16", "", 16])
def test_unknown_formats_are_refused(tiny, name):
    d, _, _ = tiny
    with pytest.raises(UnsupportedError, match="unknown KV cache format"):
        qinfer.Engine(d, threads=1, kv_cache=name)


def test_the_cli_takes_the_format_and_names_what_is_missing(tiny):
    d, _, _ = tiny
    proc = run_cli("bench", "--model", d, "-p", "8", "-n", "4", "-r", "1", "-t", "1", "--kv-cache", "f16")
    assert proc.returncode == 0, proc.stderr
    per_token = qinfer.Engine(d, threads=1, kv_cache="f16").model.transformer.kv_bytes_per_token
    assert f"KV cache: f16, {per_token} bytes per token" in proc.stdout
    assert_user_error(run_cli("generate", "--model", d, "--prompt", "hi", "--kv-cache", "kvquant4"),
                      "kvquant4", "head size")
    bad = run_cli("perplexity", "--model", d, "--kv-cache", "f8")
    assert bad.returncode == 2 and "invalid choice: 'f8'" in bad.stderr and "Traceback" not in bad.stderr


def test_f16c_and_portable_half_conversions_agree_bit_for_bit(tiny, ids):
    """Attention over a float16 cache converts with F16C where the CPU has it, else with
    integer operations (pyx/attention.c, half8_to_float): both exact, so the logits are
    the same whichever runs (here both run where the CPU has F16C)."""
    from qinfer import _forward
    d, _, _ = tiny
    engine = qinfer.Engine(d, threads=2, kv_cache="f16")
    hardware = engine.logits(ids)
    previous = _forward.set_kv_hardware_halves(False)
    try:
        engine.reset()
        portable = engine.logits(ids)
        engine.reset()
        engine.prefill(ids[:40])
        steps = np.stack([engine.decode_step(t) for t in ids[40:]])
    finally:
        _forward.set_kv_hardware_halves(previous)
    assert np.array_equal(portable, hardware)
    engine.reset()
    engine.prefill(ids[:40])
    assert np.array_equal(np.stack([engine.decode_step(t) for t in ids[40:]]), steps)


def test_half_conversion_is_exact_for_every_half():
    """The portable conversion's rule, in numpy, against numpy's own: every one of the 65536
    halves (subnormals, infinities, NaNs) becomes the float numpy makes of it."""
    h = np.arange(1 << 16, dtype=np.uint32)
    magnitude = ((h & 0x7FFF) << 13).view(np.float32) * np.float32(2.0 ** 112)
    bits = magnitude.view(np.uint32) | np.where(magnitude >= 65536.0, 0xFF << 23, 0).astype(np.uint32) \
        | ((h & 0x8000) << 16)
    want = h.astype(np.uint16).view(np.float16).astype(np.float32)
    got = bits.view(np.float32)
    same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
    assert same.all(), np.flatnonzero(~same)[:5]


def test_f16_with_a_head_dim_that_is_not_a_multiple_of_8(write_tiny, ids):
    """Prefill tiles widen a block of halves at a time (attention_tile), whose tail is
    then shorter than a vector: head_dim 10."""
    d, weights, config = write_tiny("kv_odd", seed=3, hidden_size=40, num_attention_heads=4,
                                    num_key_value_heads=2)
    got = qinfer.Engine(d, threads=2, kv_cache="f16").logits(ids)
    want = ref.forward(weights, config, ids, kv_round=to_f16)
    assert max_err(got, want) <= LOGIT_TOL
