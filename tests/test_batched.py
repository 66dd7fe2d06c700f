"""Several sequences in one KV cache, and a decode step of all of them at once (Model.forward_rows):
each row gives its own sequence's logits, whatever the other rows are."""
import numpy as np
import pytest

import llama_reference as ref
import qinfer
from qinfer.errors import QinferError


@pytest.fixture(scope="module", params=["float", "int4"])
def tiny(request, tmp_path_factory):
    if not ref.tokenizer_available():
        pytest.skip(f"the LLaMA 2 tokenizer is not at {ref.LLAMA2_TOKENIZER} (shared/ data absent)")
    d = tmp_path_factory.mktemp("tiny_batched")
    weights, config = ref.write_tiny_llama(d, tied=False, seed=11)
    quantize = dict(quantize=4, group_size=32) if request.param == "int4" else {}
    engine = qinfer.Engine(d, threads=2, **quantize)
    if quantize:                        # the reference runs the weights the engine holds
        weights = ref.quantized_reference_weights(weights, 4, 32)
    return engine, weights, config, bool(quantize)


PROMPTS = [[1, 5, 9, 300, 41], [1, 77], [1, 2000, 3, 4, 5, 6, 7, 8, 9, 10, 11], [1, 15, 16]]


def _filled(model, cache):
    """Each prompt into its own sequence of `cache`."""
    for seq, ids in enumerate(PROMPTS):
        model.forward(ids, 0, cache=cache, seq=seq)


def test_a_batched_step_gives_each_sequence_its_own_logits(tiny):
    engine, weights, config, _ = tiny
    model = engine.model
    cache = model.new_cache(64, seqs=len(PROMPTS))
    _filled(model, cache)
    nxt = [7, 8, 9, 10]
    got = model.forward_rows(nxt, range(len(PROMPTS)), [len(p) for p in PROMPTS], cache)
    for seq, ids in enumerate(PROMPTS):
        want = ref.forward(weights, config, ids + [nxt[seq]])[-1]
        assert np.abs(got[seq] - want).max() <= 2e-3 * np.abs(want).max(), f"sequence {seq}"
        # the same sequence alone in the model's own cache
        alone = model.forward(ids + [nxt[seq]], 0)
        assert np.abs(got[seq] - alone).max() <= 1e-4 * np.abs(alone).max(), f"sequence {seq}"


def test_rows_do_not_depend_on_the_other_rows(tiny):
    engine, _, _, quantized = tiny
    model = engine.model
    cache = model.new_cache(64, seqs=len(PROMPTS))
    _filled(model, cache)
    pos = [len(p) for p in PROMPTS]
    all_four = model.forward_rows([7, 8, 9, 10], [0, 1, 2, 3], pos, cache)
    # the same step again (it rewrites the same cache entries), for two of them in another order
    two = model.forward_rows([10, 8], [3, 1], [pos[3], pos[1]], cache)
    # into a caller's array: the same logits, written there
    out = np.full((2, model.config.vocab_size), np.nan, dtype=np.float32)
    again = model.forward_rows([10, 8], [3, 1], [pos[3], pos[1]], cache, out=out)
    assert again is out and np.array_equal(out, two)
    if quantized:     # the qgemm's sums per row do not depend on the row count
        assert np.array_equal(two[0], all_four[3]) and np.array_equal(two[1], all_four[1]), \
            "a row's logits are the same bit for bit in a batch of 2 or 4"
    else:             # the float matmul blocks its rows: the same up to rounding
        for a, b in ((two[0], all_four[3]), (two[1], all_four[1])):
            assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


def test_sequences_stay_apart_over_several_steps(tiny):
    engine, _, _, quantized = tiny
    model = engine.model
    cache = model.new_cache(64, seqs=2)
    a, b = [1, 40, 41, 42], [1, 900, 901]
    model.forward(a, 0, cache=cache, seq=0)
    model.forward(b, 0, cache=cache, seq=1)
    ta, tb = [50, 51, 52], [60, 61, 62]
    for i in range(3):
        rows = model.forward_rows([ta[i], tb[i]], [0, 1], [len(a) + i, len(b) + i], cache)
    alone_a = model.forward(a + ta, 0)
    alone_b = model.forward(b + tb, 0)
    assert np.abs(rows[0] - alone_a).max() <= 1e-4 * np.abs(alone_a).max()
    assert np.abs(rows[1] - alone_b).max() <= 1e-4 * np.abs(alone_b).max()


def test_bad_rows_are_refused(tiny):
    engine, _, _, quantized = tiny
    model = engine.model
    cache = model.new_cache(16, seqs=2)
    with pytest.raises(QinferError):
        model.forward_rows([1, 2], [0], [0, 0], cache)                  # lengths differ
    with pytest.raises(QinferError):
        model.forward_rows([1], [0], [16], cache)                       # past the context
    with pytest.raises(ValueError):
        model.forward_rows([1, 2], [0, 0], [0, 1], cache)               # one sequence twice
    with pytest.raises(ValueError):
        model.forward_rows([1], [2], [0], cache)                        # no such sequence
    with pytest.raises(QinferError):
        model.new_cache(16, seqs=0)
    vocab = model.config.vocab_size
    for out in (np.empty((1, vocab), np.float32), np.empty((2, vocab), np.float64),
                np.empty((vocab, 2), np.float32).T):
        with pytest.raises(QinferError, match="out must be"):
            model.forward_rows([1, 2], [0, 1], [0, 0], cache, out=out)


@pytest.mark.parametrize("bits", [4, 8])
def test_an_int8_batched_step_runs_as_one_team_with_the_per_call_numbers(tmp_path, bits):
    """With int8 activations on the AVX2 path a batched step runs as one thread team
    (forward.c, rows_team): its logits are those of a parallel region per kernel call and
    of one thread, bit for bit (three threads on two cores: uneven shares), and each row
    is its sequence decoded alone, up to attention's blocking."""
    if not ref.tokenizer_available():
        pytest.skip(f"the LLaMA 2 tokenizer is not at {ref.LLAMA2_TOKENIZER} (shared/ data absent)")
    ref.write_tiny_llama(tmp_path, tied=False, seed=11)
    engine = qinfer.Engine(tmp_path, threads=2, quantize=bits, group_size=32, activations="int8")
    model = engine.model
    cache = model.new_cache(64, seqs=len(PROMPTS))
    tr = cache.transformer
    assert tr.rows_team_ready == tr.team_ready == (qinfer.kernels.active_path() == "avx2")
    assert not qinfer.Engine(tmp_path, threads=2, quantize=bits, group_size=32).model.transformer.rows_team_ready

    def step(threads, team):
        tr.decode_team = team
        _filled(model, cache)
        return model.forward_rows([7, 8, 9, 10], range(len(PROMPTS)), [len(p) for p in PROMPTS], cache,
                                  threads=threads)

    single = step(1, True)
    for threads in (2, 3):
        team, per_call = step(threads, True), step(threads, False)
        assert np.array_equal(team, per_call) and np.array_equal(team, single)
    # the team's threads claim tiles (their own share, then the others' leftovers:
    # pyx/team.h, team_claim) or keep fixed shares: the same numbers either way
    from qinfer import _forward
    saved = _forward.tile_claims_on()
    try:
        _forward.set_tile_claims(False)
        fixed = [step(threads, True) for threads in (2, 3)]
    finally:
        _forward.set_tile_claims(saved)
    assert all(np.array_equal(f, single) for f in fixed)
    for seq, ids in enumerate(PROMPTS):
        alone = model.forward(ids + [[7, 8, 9, 10][seq]], 0)
        assert np.abs(single[seq] - alone).max() <= 1e-4 * np.abs(alone).max(), f"sequence {seq}"
