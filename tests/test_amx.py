"""Tests for the float qgemm on AMX tiles (pyx/amx_gemm.h): 16 activation rows
or more, on a CPU with AMX-BF16 whose OS grants the tile state.

What the kernel claims, checked against numpy:

* the codes go to bf16 and x to three bf16 limbs without losing a bit, so each row's
  result is x @ W^T to float32's summation error (max rel <= 1e-5 here, the FMA
  kernels' own tolerance is 1e-4) for every bitwidth, group size and act order;
* each column's sums do not depend on which thread runs it: 1 and 2 threads agree bit
  for bit;
* fewer than 16 rows, and groups under 128 rows (where scaling the tile sums per group
  costs what the tiles save), keep the FMA kernel: bit for bit the same with AMX on or off.
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
from helpers import pack_gptq  # noqa: E402  (GPTQ's packing loop, every bitwidth)

F32 = np.float32
pytestmark = pytest.mark.skipif(not kernels.has_float_amx(), reason="no AMX tiles on this CPU/OS/build")


def make_layer(rng, out_f, in_f, bits, group_size, act_order=False):
    codes = rng.integers(0, 2 ** bits, size=(in_f, out_f))
    G = 1 if group_size == -1 else in_f // group_size
    scales = rng.uniform(0.001, 0.02, size=(G, out_f)).astype(F32)
    zeros = rng.uniform(0, 2 ** bits - 1, size=(G, out_f)).astype(F32)
    g_idx = None
    if act_order:
        g_idx = rng.permutation(np.repeat(np.arange(G), group_size)).astype(np.int32)
    layer = qinfer.QuantizedLinear.from_packed(pack_gptq(codes, bits), scales, zeros, bits, group_size, g_idx=g_idx)
    rows_group = (np.arange(in_f) // (in_f if group_size == -1 else group_size)) if g_idx is None else g_idx
    w = (codes - zeros[rows_group]) * scales[rows_group].astype(np.float64)     # [in, out], float64
    return layer, w


def check(y, X, w, what, tol=1e-5):
    ref = X.astype(np.float64) @ w
    size = np.sqrt((X.astype(np.float64) ** 2) @ (w ** 2))     # each output's natural size
    err = np.abs(y - ref).max() / max(np.abs(ref).max(), size.max())
    assert y.dtype == F32 and err <= tol, f"{what}: max rel error {err:.3g}"


CASES = [(bits, g, a) for bits in (2, 3, 4, 5, 6, 8) for g in (128, -1) for a in (False, True)
         if not (a and g == -1)]


@pytest.mark.parametrize("bits,group_size,act_order", CASES)
def test_amx_qgemm_matches_numpy(bits, group_size, act_order):
    rng = np.random.default_rng([bits, group_size + 1, act_order, 16])
    layer, w = make_layer(rng, 80, 1536, bits, group_size, act_order)
    assert kernels.float_amx()
    for n in (16, 37, 64, 100):
        X = rng.standard_normal((n, 1536)).astype(F32)
        X[:, 7] *= 300.0                            # an outlier column: the low limbs matter
        X[1] = 0.0
        X[2] *= F32(1e-20)                          # tiny rows: still relative precision
        y = layer(X, threads=2)
        check(y, X, w, f"b={bits} g={group_size} act_order={act_order} n={n}")
        check(y[2:3] * F32(1e20), X[2:3] * F32(1e20), w, "tiny row")
        assert np.all(y[1] == 0.0)
        assert np.array_equal(y, layer(X, threads=1)), "1 vs 2 threads"


@pytest.mark.parametrize("bits", (2, 3, 4, 5, 6, 8))
def test_amx_and_fma_kernels_agree(bits):
    rng = np.random.default_rng([bits, 99])
    layer, w = make_layer(rng, 4096 // 8, 4096, bits, 128)
    X = rng.standard_normal((64, 4096)).astype(F32)
    with kernels.use_float_amx(True):
        amx = layer(X)
    with kernels.use_float_amx(False):
        fma = layer(X)
    assert not np.array_equal(amx, fma)            # two kernels ran
    check(amx, X, w, "amx")
    check(fma, X, w, "fma", tol=1e-4)


def test_few_rows_and_short_groups_keep_fma():
    rng = np.random.default_rng(7)
    for n, group_size in ((15, 128), (1, 128), (64, 16), (64, 32), (64, 64)):
        layer, w = make_layer(rng, 48, 256, 4, group_size)
        X = rng.standard_normal((n, 256)).astype(F32)
        with kernels.use_float_amx(False):
            fma = layer(X)
        with kernels.use_float_amx(True):
            assert np.array_equal(layer(X), fma), f"n={n} g={group_size}"


def test_switch_and_environment():
    assert kernels.has_float_amx()
    with kernels.use_float_amx(False):
        assert not kernels.float_amx()
    assert kernels.float_amx()
    code = "from qinfer import kernels; print(kernels.float_amx())"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, QINFER_AMX="0"),
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
