"""The lookup-table kernels as a kernel choice for packed 2-, 3- and 4-bit layers
(kernels.set_lut / QINFER_LUT, model.py, tuning/lut_choice.py).

* "on": every block's packed 2/3/4-bit layer (stacked ones too) runs as a LutLinear of the
  same weights; the LM head and 8-bit layers stay dense; the logits stay within the int8
  tables' rounding of the dense model's.
* "auto": float activations never use them; with int8 activations each shape is measured
  once (here the measurement is replaced by made-up timings), chosen only when at least
  MARGIN faster, saved, and read back by the next process instead of measuring again;
  a failed measurement means the dense kernels and one line; tuning off means no measuring.
* "off" and bad values.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import qinfer
from qinfer import kernels
from qinfer.errors import UnsupportedError
from qinfer.linear import QuantizedLinear
from qinfer.lut_linear import LutLinear
from qinfer.tuning import lut_choice, table
from qinfer.tuning.space import LayerShape

PROMPT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def tiny(write_tiny):
    return write_tiny("lut_choice", tied=False, seed=4)


def engine(tiny, mode, activations=None, bits=4, group=32):
    with kernels.use_lut(mode):
        return qinfer.Engine(tiny[0], threads=1, quantize=bits, group_size=group, activations=activations)


def layers(e):
    return e.model.quantized_layers()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_on_runs_every_block_layer_on_the_tables(tiny, bits):
    dense, lut = engine(tiny, "off", bits=bits), engine(tiny, "on", bits=bits)
    assert not any(isinstance(layer, LutLinear) for layer in layers(dense))
    on = [layer for layer in layers(lut) if isinstance(layer, LutLinear)]
    # two blocks, each q/k/v and gate/up stacked: 4 maps a block; the LM head (8-bit) stays dense
    assert len(on) == 2 * 4 and all(layer.kind == "uniform" and layer.bits == bits for layer in on)
    assert [layer.bits for layer in layers(lut) if isinstance(layer, QuantizedLinear)] == [8]
    # the same weights: each LutLinear dequantizes to a dense layer of the same model
    dense_w = sorted(np.round(layer.dequantize(), 5).tobytes() for layer in layers(dense) if layer.bits == bits)
    lut_w = sorted(np.round(layer.dequantize(), 5).tobytes() for layer in on)
    assert dense_w == lut_w
    ids = dense.tokenizer.encode(PROMPT, add_bos=True)
    want, got = dense.logits(ids), lut.logits(ids)
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.8
    # decode (the team entry points) and prefill agree on the next token
    first = lut.generate(PROMPT, max_new_tokens=1)
    assert first.strip() == lut.tokenizer.decode([int(got[-1].argmax())]).strip()


def test_auto_keeps_float_activations_dense(tiny, monkeypatch):
    monkeypatch.setattr(table, "enabled", lambda: True)
    monkeypatch.setattr(lut_choice, "measure", lambda *a: pytest.fail("float activations measured the tables"))
    assert not any(isinstance(layer, LutLinear) for layer in layers(engine(tiny, "auto")))


@pytest.mark.skipif(not kernels.cpu_has_avx2(), reason="the choice is made on the AVX2 path")
def test_auto_measures_each_shape_once_and_keeps_the_choice(tiny, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(table, "enabled", lambda: True)
    monkeypatch.setattr(lut_choice, "_memo", {})
    timed = []

    def made_up(shape, threads, activations):
        timed.append(shape)
        # the stacked q/k/v wins clearly, gate/up only by less than the margin, the rest lose
        if shape.out_features == 128:           # q (64) + k (32) + v (32)
            return 2.0e-6, 1.0e-6
        if shape.out_features == 320:           # gate + up
            return 1.05e-6, 1.0e-6
        return 1.0e-6, 2.0e-6

    monkeypatch.setattr(lut_choice, "measure", made_up)
    e = engine(tiny, "auto", activations="int8")
    chosen = {(l.out_features, l.in_features) for l in layers(e) if isinstance(l, LutLinear)}
    assert chosen == {(128, 64)}
    assert len(timed) == len(set(timed)) == 4          # qkv, o, gate/up, down: once each
    assert "timing the lookup-table kernels" in capsys.readouterr().err
    stored = json.loads(open(lut_choice._path()).read())["shapes"]
    assert sorted(v["lut"] for v in stored.values()) == [False, False, False, True]

    # another process reads the choices instead of measuring
    monkeypatch.setattr(lut_choice, "_memo", {})
    monkeypatch.setattr(lut_choice, "measure", lambda *a: pytest.fail("measured again"))
    again = engine(tiny, "auto", activations="int8")
    assert {(l.out_features, l.in_features) for l in layers(again) if isinstance(l, LutLinear)} == chosen


@pytest.mark.skipif(not kernels.cpu_has_avx2(), reason="the choice is made on the AVX2 path")
def test_a_failed_measurement_means_the_dense_kernels(tiny, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(table, "enabled", lambda: True)
    monkeypatch.setattr(lut_choice, "_memo", {})

    def broken(*a):
        raise MemoryError("no room")

    monkeypatch.setattr(lut_choice, "measure", broken)
    e = engine(tiny, "auto", activations="int8")
    assert not any(isinstance(layer, LutLinear) for layer in layers(e))
    err = capsys.readouterr().err
    assert "failed (MemoryError: no room); using the dense kernels" in err and "Traceback" not in err


def test_tuning_off_means_no_measuring(tiny, monkeypatch):
    monkeypatch.setattr(lut_choice, "_memo", {})
    monkeypatch.setattr(lut_choice, "measure", lambda *a: pytest.fail("measured with QINFER_TUNE=0"))
    assert not any(isinstance(layer, LutLinear) for layer in layers(engine(tiny, "auto", activations="int8")))


@pytest.mark.skipif(not kernels.cpu_has_avx2(), reason="timing runs the AVX2 path")
def test_the_measurement_times_both_kernels():
    dense, lut = lut_choice.measure(LayerShape(2, 256, 512, 64), 1, "int8")
    assert 0 < dense < 1 and 0 < lut < 1


def test_a_lut_layer_is_not_split(tiny):
    e = engine(tiny, "on")
    with pytest.raises(UnsupportedError, match="lookup-table kernels"):
        e.model.replace_linear(0, "wq", np.zeros((64, 64), np.float32))


def test_modes_are_checked():
    with pytest.raises(UnsupportedError, match="lookup-table"):
        kernels.set_lut("sometimes")
    env = dict(os.environ, QINFER_LUT="sometimes")
    proc = subprocess.run([sys.executable, "-c", "from qinfer import kernels; print(kernels.lut_mode())"],
                          capture_output=True, text=True, env=env)
    assert proc.stdout.strip() == "auto" and "QINFER_LUT='sometimes' ignored" in proc.stderr


def test_a_batched_step_on_the_tables_gives_each_sequence_its_logits(tiny):
    """A server's batched step (forward_rows) with the lookup-table layers: each row is
    its sequence decoded alone, and the threads' claims of the tiles (pyx/team.h) give
    the numbers of fixed shares, bit for bit."""
    from qinfer import _forward
    with kernels.use_lut("on"):
        model = qinfer.Engine(tiny[0], threads=2, quantize=4, group_size=32, activations="int8").model
    prompts = [[1, 5, 9, 13], [1, 7, 2], [1, 30, 31, 32, 33]]
    cache = model.new_cache(32, seqs=len(prompts))

    def step():
        for seq, ids in enumerate(prompts):
            model.forward(ids, 0, cache=cache, seq=seq)
        return model.forward_rows([40, 41, 42], range(len(prompts)), [len(p) for p in prompts], cache)

    got = step()
    for seq, ids in enumerate(prompts):
        alone = model.forward(ids + [40 + seq], 0)
        np.testing.assert_allclose(got[seq], alone, rtol=1e-4, atol=1e-4 * np.abs(alone).max())
    saved = _forward.tile_claims_on()
    try:
        _forward.set_tile_claims(False)
        fixed = step()
    finally:
        _forward.set_tile_claims(saved)
    assert np.array_equal(got, fixed)
