"""One generation, step by step: sampling, end-of-sequence and stop strings, text pieces, stats.

The caller owns the KV cache and runs the model; a Generation decides, from
each step's logits, which token comes next and what text that adds:

    run = Generation(tokenizer, config, ids, max_new_tokens, ...)
    logits = <prefill ids>;  run.prefilled()
    while True:
        text, token = run.advance(logits, room=<the cache holds one more token>)
        <emit text>
        if token is None: break
        logits = <decode token>
    <emit run.finish()>

Engine.stream_ids runs one this way; the server runs many, one step each in turn.
"""
import time
from dataclasses import dataclass, field

import numpy as np

from ._sampling import Sampler

STOP_REASONS = {                     # GenerationStats.stop_reason -> words (the CLI's stats line)
    "eos": "end of sequence",        # the model produced an end-of-sequence or end-of-turn token
    "stop": "stop string",           # the text reached one of the stop strings
    "length": "max tokens",          # max_new_tokens were generated
    "context": "context full",       # the KV cache (ctx) holds no more tokens
}


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0           # of the prompt's, found in the KV cache (not prefilled again)
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    # seconds from the start of generation to the first sampled token (the prefill and one
    # sampling step); None when no token was sampled (max_new_tokens=0)
    first_token_seconds: float = None
    stop_reason: str = ""            # "eos", "stop", "length", "context" (STOP_REASONS)
    token_ids: list = field(default_factory=list)

    @property
    def stop_text(self):
        """Why generation stopped, in words: "end of sequence", "stop string", "max tokens", "context full"."""
        return STOP_REASONS.get(self.stop_reason, self.stop_reason)

    @property
    def prefill_tokens_per_second(self):
        prefilled = self.prompt_tokens - self.cached_tokens
        return prefilled / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self):
        # the first generated token comes from the prefill's logits: decode steps = generated - 1
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds and steps else 0.0


class StopFilter:
    """Holds back text that may be the start of a stop string."""

    def __init__(self, stop):
        self.stop = [s for s in (stop or []) if s]
        self.pending = ""

    def feed(self, text):
        """Returns (text safe to emit, stopped)."""
        self.pending += text
        for s in self.stop:
            at = self.pending.find(s)
            if at >= 0:
                out, self.pending = self.pending[:at], ""
                return out, True
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self):
        out, self.pending = self.pending, ""
        return out


def shared_prefix(cached, ids):
    """How many of the prompt `ids`' first tokens a KV cache holding `cached` (positions
    0..) can keep, at most len(ids) - 2: the last prompt token must run to give logits,
    and with one more it runs as a prefill of 2+ rows, whose quantized layers' results do
    not depend on the row count (a single row runs the decode kernels, which round
    differently), so a quantized model given a prompt found in the cache returns the very
    logits of a fresh prefill. Engine.reusable_prefix and the server's slots use it."""
    n = 0
    for a, b in zip(cached, ids[:len(ids) - 2]):
        if a != b:
            break
        n += 1
    return n


class Generation:
    """The decisions of one generation after the prompt `ids` (see the module docstring).
    Arguments as Engine.stream_ids'; cached: how many prompt tokens the cache held already."""

    def __init__(self, tokenizer, config, ids, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, seed=None,
                 stop=None, repetition_penalty=1.0, cached=0, ignore_eos=False):
        self.stats = GenerationStats(prompt_tokens=len(ids), cached_tokens=cached, stop_reason="length")
        self.max_new_tokens = max_new_tokens
        self.sampler = Sampler(config.vocab_size, temperature, top_k, top_p, repetition_penalty, seed)
        self.penalize = repetition_penalty != 1.0
        self.eos = set(tokenizer.eos_ids) | set(config.eos_token_ids or ())
        # ignore_eos: the end-of-sequence tokens are never sampled (their logits -inf), so the
        # generation runs to max_new_tokens, a stop string or a full context (benchmarks' loads)
        banned = sorted(t for t in self.eos if 0 <= t < config.vocab_size)
        self.banned = np.array(banned, dtype=np.int64) if ignore_eos and banned else None
        self.seen = dict.fromkeys(ids)
        self.decoder = tokenizer.decoder(prefix=ids)
        self.stop_filter = StopFilter(stop)
        self.done = max_new_tokens == 0
        self.start = self.decode_start = time.perf_counter()

    def prefilled(self):
        """The prompt is in the cache: the prefill's time ends, the decoding's begins."""
        self.decode_start = time.perf_counter()
        self.stats.prefill_seconds = self.decode_start - self.start

    def advance(self, logits, room=True):
        """The next token from `logits` [vocab]: (text it completes, the token to feed the
        model next, or None when the generation ends here). room: whether the KV cache
        holds one more token."""
        stats = self.stats
        if self.done:
            return "", None
        penalized = np.fromiter(self.seen, dtype=np.int32) if self.penalize else None
        if self.banned is not None:
            logits[self.banned] = -np.inf
        token = self.sampler(logits, penalized)
        if stats.first_token_seconds is None:
            stats.first_token_seconds = time.perf_counter() - self.start
        if token in self.eos:
            stats.stop_reason = "eos"
            return self._end("")
        stats.token_ids.append(token)
        stats.generated_tokens += 1
        self.seen[token] = None
        text, stopped = self.stop_filter.feed(self.decoder.push(token))
        if stopped:
            stats.stop_reason = "stop"
            return self._end(text)
        if stats.generated_tokens == self.max_new_tokens:
            return self._end(text)
        if not room:
            stats.stop_reason = "context"
            return self._end(text)
        return text, token

    def _end(self, text):
        self.done = True
        return text, None

    def finish(self):
        """The text still held back (an incomplete character, a possible stop string's start)."""
        stats = self.stats
        stats.decode_seconds = time.perf_counter() - self.decode_start
        if stats.stop_reason == "stop":
            return ""
        text, stopped = self.stop_filter.feed(self.decoder.flush())
        text += "" if stopped else self.stop_filter.flush()
        if stopped:
            stats.stop_reason = "stop"
        return text
