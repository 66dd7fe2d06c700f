"""The KV cache's reuse across turns: a prompt that starts with the tokens the cache holds
prefills only the rest, and gives what a fresh prefill of the whole prompt gives."""
import numpy as np
import pytest

import llama_reference as ref
import qinfer


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    if not ref.tokenizer_available():
        pytest.skip(f"the LLaMA 2 tokenizer is not at {ref.LLAMA2_TOKENIZER} (shared/ data absent)")
    d = tmp_path_factory.mktemp("tiny_reuse")
    weights, config = ref.write_tiny_llama(d, tied=False, seed=7)
    return qinfer.Engine(d, threads=1), weights, config


def test_cached_prefix_is_not_prefilled_again_and_changes_nothing(engine):
    e, weights, config = engine
    first = [1, 17, 33, 250, 9, 61, 402]
    second = first + [88, 5, 301, 42]
    e.reset()
    e.prefill(first)
    assert e.cached_ids == first and e.pos == len(first)
    assert e.reusable_prefix(second) == len(first)
    list(e.stream_ids(second, max_new_tokens=1, reuse_cache=True))
    assert e.last_stats.cached_tokens == len(first), "the cached turn is kept"
    assert e.cached_ids[:len(second)] == second
    # what the cache holds now gives the reference's logits for the next position
    got = e.decode_step(3)
    assert e.cached_ids[-1] == 3
    want = ref.forward(weights, config, e.cached_ids)[-1]
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()


def test_a_prompt_that_departs_from_the_cache_keeps_only_the_shared_part(engine):
    e, weights, config = engine
    e.reset()
    e.prefill([1, 10, 20, 30, 40])
    assert e.reusable_prefix([1, 10, 20, 99, 40, 50]) == 3
    assert e.reusable_prefix([1, 10, 20, 30, 40]) == 3, "the last two prompt tokens always run"
    list(e.stream_ids([1, 10, 20, 99, 40, 50], max_new_tokens=1, reuse_cache=True))
    assert e.last_stats.cached_tokens == 3
    got = e.decode_step(7)
    want = ref.forward(weights, config, e.cached_ids)[-1]
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()


def test_without_reuse_or_after_reset_everything_is_prefilled(engine):
    e, _, _ = engine
    ids = [1, 5, 6, 7, 8]
    e.reset()
    e.prefill(ids[:3])
    list(e.stream_ids(ids, max_new_tokens=1))
    assert e.last_stats.cached_tokens == 0, "generate and stream start afresh unless asked"
    e.reset()
    assert e.cached_ids == [] and e.reusable_prefix(ids) == 0


def test_chat_turns_reuse_the_conversation(engine):
    e, _, _ = engine
    if e.chat_template is None:
        e.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                           "{% if add_generation_prompt %}<assistant>{% endif %}")
    e.reset()
    messages = [{"role": "user", "content": "hello there"}]
    reply = e.chat(messages, max_new_tokens=4)
    first_prompt = e.last_stats.prompt_tokens
    messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "and again"}]
    e.chat(messages, max_new_tokens=4)
    assert e.last_stats.cached_tokens >= first_prompt - 2, "the first turn's prompt comes from the cache"
    e.chat(messages, max_new_tokens=4, reuse_cache=False)
    assert e.last_stats.cached_tokens == 0


def test_a_prompt_found_in_the_cache_gives_the_logits_of_a_fresh_prefill(engine):
    d = engine[0].model_path
    e = qinfer.Engine(d, threads=1, quantize=4, group_size=32)     # the kernels of quantized layers
    ids = [1, 44, 45, 46, 47, 48, 49, 50]
    e.reset()
    fresh = e.prefill(ids).copy()
    e.reset()
    e.prefill(ids[:6] + [3, 3])                 # a cache holding the prompt's first 6 tokens
    kept = e.reusable_prefix(ids)
    assert kept == 6
    e.pos, e.cached_ids = kept, e.cached_ids[:kept]
    assert np.array_equal(e.prefill(ids[kept:]), fresh), "bit for bit: reuse changes no output"
