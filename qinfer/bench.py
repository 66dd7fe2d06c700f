"""Prefill and decode speed in the manner of llama.cpp's llama-bench.

    results = qinfer.bench.bench(engine, n_prompt=512, n_gen=128, threads=[1, 2], repetitions=3)
    for r in results:
        r.test, r.threads, r.seconds, r.avg_ts, r.stddev_ts

Two tests per thread count, each from an empty KV cache:

* ``pp{p}``: one prefill of p tokens (fed to the forward pass in its chunks);
* ``tg{n}``: n tokens decoded one at a time, each a forward call of one token.

The token ids are random (uniform over the vocabulary, from a seeded
generator), so the text plays no part, as in llama-bench. Each test runs once
untimed first (the whole prompt for pp, one token for tg, as llama-bench's
warm-up), then `repetitions` timed runs. Tokens/s is reported like
llama-bench's avg_ts / stddev_ts: the mean and the sample standard deviation
of n_tokens / seconds over the runs; ``seconds`` keeps each run's time.
``format_table`` prints them as llama-bench does (`qinfer bench`: qinfer/cli/bench.py).

The weights are summarized as loaded (``weight_summary``): a quantized
linear layer counts its packed codes plus a scale and zero per group and
output as the layer holds them (float16 when exact, else float32), a float
tensor four bytes per element. The peak resident memory
of the process (``ru_maxrss``) covers the load and every test.
"""
import math
import os
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .checks import whole
from .errors import QinferError

DEFAULT_PROMPT = 512
DEFAULT_GEN = 128
DEFAULT_REPETITIONS = 3
MAX_THREADS = 4096        # far above any machine; keeps a typo from starting a million OpenMP threads


class BenchError(QinferError):
    """Bad benchmark settings: token counts, repetitions, a thread list."""


# ----------------------------------------------------------------- options
def parse_threads(spec):
    """A thread list: "1,2,4", an int, or a sequence of ints -> list of ints >= 1."""
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",")]
        if not spec.strip() or any(not p for p in parts):
            raise BenchError(f"thread list {spec!r}: expected positive integers separated by commas, e.g. 1,2")
        values = []
        for p in parts:
            try:
                values.append(int(p))
            except ValueError:
                raise BenchError(f"thread list {spec!r}: {p!r} is not an integer "
                                 f"(expected positive integers separated by commas, e.g. 1,2)") from None
    elif isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        values = [int(spec)]
    else:
        try:
            values = list(spec)
        except TypeError:
            raise BenchError(f"threads must be a list of positive integers, got {spec!r}") from None
        if not values or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in values):
            raise BenchError(f"threads must be a list of positive integers, got {spec!r}")
        values = [int(v) for v in values]
    for v in values:
        if not 1 <= v <= MAX_THREADS:
            raise BenchError(f"thread count {v} is out of range (1 to {MAX_THREADS})")
    return values


def check_counts(n_prompt, n_gen, repetitions, ctx=None, ctx_what="the context"):
    """(n_prompt, n_gen, repetitions) checked: counts >= 0 (0 skips a test, not both), r >= 1,
    and n_prompt + n_gen <= ctx when ctx is given (as llama-bench sizes its context)."""
    n_prompt = whole("the prompt length (-p)", n_prompt, 0, BenchError)
    n_gen = whole("the generated tokens (-n)", n_gen, 0, BenchError)
    repetitions = whole("repetitions (-r)", repetitions, 1, BenchError)
    if n_prompt == 0 and n_gen == 0:
        raise BenchError("nothing to run: -p and -n are both 0 (0 skips a test; give at least one a length)")
    if ctx is not None and n_prompt + n_gen > ctx:
        raise BenchError(f"-p {n_prompt} plus -n {n_gen} is {n_prompt + n_gen} tokens, more than "
                         f"{ctx_what} of {ctx}")
    return n_prompt, n_gen, repetitions


# ------------------------------------------------------------------ weights
@dataclass
class WeightSummary:
    nbytes: int            # every weight as loaded
    decode_bytes: int      # the weights one decoded token reads: all but the embedding table (one row of it)
    bits: str              # the blocks' linear maps: "4", "4/8" when mixed, "f32" when float
    group: str             # "32", "128", "col" (full column), "float", or "mixed"
    lm_head: str           # e.g. "8-bit g32", "f32", "f32 (tied)"
    n_params: int


def _quantized_bytes(out_f, in_f, bits, group, scale_bytes=4, shared_zero=False):
    """Codes + a scale per group and column + a zero per group and column (or one per column
    when every group has the same zero), float32 (4) or float16 (2)."""
    groups = 1 if group == -1 else in_f // group
    return out_f * in_f * bits // 8 + scale_bytes * (groups + (1 if shared_zero else groups)) * out_f


def _group_text(group):
    return "col" if group == -1 else str(group)


def weight_summary(engine):
    """What the engine's model holds, decided as qinfer/model.py decides it: a packed tensor runs
    packed (unless the model dequantizes), a float linear map is quantized on load when asked
    (the LM head at model.LM_HEAD_BITS), the embedding and a float LM head are as the model holds
    them (float16 when the checkpoint stores them so), everything else is float32."""
    from .model import LM_HEAD_BITS, LINEAR_NAMES
    from .readers.source import BcqTensor, PackedTensor, SpqrTensor
    from .readers.validate import expected_shapes

    model, source, cfg = engine.model, engine.source, engine.config
    shapes = expected_shapes(cfg)

    def linear(name, load_bits):
        """(bytes, bits or None for float, group) of a linear map as the model runs it."""
        out_f, in_f = shapes[name]
        t = source.tensors[name]
        if isinstance(t, PackedTensor) and not model.dequantize:
            held = model.scale_bytes[name]          # as the model built it: no second conversion
            shared = model.shared_zero[name]
            return _quantized_bytes(out_f, in_f, t.bits, t.group_size, held, shared), t.bits, t.group_size
        if isinstance(t, (SpqrTensor, BcqTensor)) and not model.dequantize:
            return model.held_bytes[name], t.bits, t.group_size      # as held (codes/planes and their statistics)
        if load_bits:      # quantize on load: float16 scales (model.quantize_on_load)
            return _quantized_bytes(out_f, in_f, load_bits, model.group_size, 2), load_bits, model.group_size
        return 4 * out_f * in_f, None, None

    total = decode = 0
    kinds = set()
    for name, shape in shapes.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            continue
        if any(name.endswith(f".{hf}.weight") for hf in LINEAR_NAMES.values()):
            nbytes, bits, group = linear(name, model.quantize)
            kinds.add((bits, group))
        else:
            nbytes = 4 * math.prod(shape)          # norms
        total += nbytes
        decode += nbytes
    vocab, hidden = shapes["model.embed_tokens.weight"]
    embedding = model.embedding_nbytes          # as held: packed, or float16 as a float16 checkpoint stores it
    head_name = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    head_bytes, head_bits, head_group = linear(head_name, LM_HEAD_BITS if model.quantize else None)
    if head_bits is None:
        head_bytes = model.float_lm_head.nbytes
        float_text = f"f{8 * model.float_lm_head.dtype.itemsize}"
    if cfg.tie_word_embeddings and (head_bits is None or model.embedding_packed):
        # a tied head is the embedding table itself (float, or one packed layer): held once,
        # read whole per token
        total += embedding
        decode += embedding
        head = f"{float_text if head_bits is None else f'{head_bits}-bit g{_group_text(head_group)}'} (tied)"
    else:
        total += embedding + head_bytes
        decode += embedding // vocab + head_bytes
        head = float_text if head_bits is None else f"{head_bits}-bit g{_group_text(head_group)}"
    bits = sorted(kinds, key=lambda k: (k[0] is None, k[0] or 0))
    bits_text = "/".join(dict.fromkeys("f32" if b is None else str(b) for b, _ in bits))
    groups = {g for _, g in kinds}
    if groups == {None}:
        group_text = "float"
    elif len(groups) == 1:
        group_text = _group_text(groups.pop())
    else:
        group_text = "mixed"
    n_params = sum(math.prod(s) for s in shapes.values())
    return WeightSummary(nbytes=total, decode_bytes=decode, bits=bits_text, group=group_text, lm_head=head,
                         n_params=n_params)


# --------------------------------------------------------------------- runs
@dataclass
class BenchResult:
    model: str                 # file or directory name
    model_path: str
    size_bytes: int            # WeightSummary.nbytes
    decode_bytes: int
    n_params: int
    bits: str
    group: str
    lm_head: str
    kernels: str               # "avx2" or "scalar"
    threads: int
    test: str                  # "pp512", "tg128"
    n_prompt: int
    n_gen: int
    seconds: list = field(default_factory=list)     # one per timed run

    @property
    def n_tokens(self):
        return self.n_prompt + self.n_gen

    @property
    def samples_ts(self):
        return [self.n_tokens / s for s in self.seconds]

    @property
    def avg_ts(self):
        return statistics.fmean(self.samples_ts)

    @property
    def stddev_ts(self):
        ts = self.samples_ts
        return statistics.stdev(ts) if len(ts) > 1 else 0.0

    def to_dict(self):
        d = asdict(self)
        d.update(n_tokens=self.n_tokens, repetitions=len(self.seconds), samples_ts=self.samples_ts,
                 avg_ts=self.avg_ts, stddev_ts=self.stddev_ts)
        return d


def _run_pp(engine, ids, threads):
    engine.reset()
    t0 = time.perf_counter()
    engine.prefill(ids, threads=threads)
    return time.perf_counter() - t0


def _run_tg(engine, ids, threads):
    engine.reset()
    t0 = time.perf_counter()
    for token in ids:
        engine.decode_step(token, threads=threads)
    return time.perf_counter() - t0


def bench(engine, n_prompt=DEFAULT_PROMPT, n_gen=DEFAULT_GEN, threads=None, repetitions=DEFAULT_REPETITIONS,
          seed=0, warmup=True):
    """Run pp{n_prompt} and tg{n_gen} (a count of 0 skips that test) at each thread count;
    returns one BenchResult per (threads, test), thread counts in the order given."""
    from . import kernels

    threads = parse_threads(threads if threads is not None else engine.model.threads)
    n_prompt, n_gen, repetitions = check_counts(n_prompt, n_gen, repetitions, engine.ctx,
                                                "the engine's context (KV cache)")
    seed = whole("seed", seed, 0, BenchError)
    summary = weight_summary(engine)
    rng = np.random.default_rng(seed)
    vocab = engine.config.vocab_size

    def ids(n):
        return rng.integers(0, vocab, size=n).tolist()

    base = dict(model=os.path.basename(os.path.normpath(engine.model_path)), model_path=engine.model_path,
                size_bytes=summary.nbytes, decode_bytes=summary.decode_bytes, n_params=summary.n_params,
                bits=summary.bits, group=summary.group, lm_head=summary.lm_head, kernels=kernels.active_path())
    tests = []
    if n_prompt:
        tests.append((f"pp{n_prompt}", _run_pp, n_prompt, dict(n_prompt=n_prompt, n_gen=0), n_prompt))
    if n_gen:
        tests.append((f"tg{n_gen}", _run_tg, n_gen, dict(n_prompt=0, n_gen=n_gen), 1))
    results = []
    for t in threads:
        for name, run, n, counts, warm in tests:
            if warmup:
                run(engine, ids(warm), t)
            result = BenchResult(threads=t, test=name, **base, **counts)
            for _ in range(repetitions):
                result.seconds.append(run(engine, ids(n), t))
            results.append(result)
    engine.reset()
    return results


def peak_rss_kib():
    """The process's peak resident set size so far, in KiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss // 1024 if sys.platform == "darwin" else rss


# ------------------------------------------------------------------- output
def format_table(results, rss_kib=None, kv=None):
    """A llama-bench style markdown table, then the peak memory line; kv: (format, bytes
    per token, ctx) of the KV cache, for a line of its own."""
    header = ["model", "size", "params", "bits", "group", "lm head", "threads", "test", "t/s"]
    align = ["<", ">", ">", ">", ">", ">", ">", ">", ">"]
    rows = [[r.model, f"{r.size_bytes / 2**20:.2f} MiB", f"{r.n_params / 1e6:.2f} M", r.bits, r.group,
             r.lm_head, str(r.threads), r.test, f"{r.avg_ts:.2f} ± {r.stddev_ts:.2f}"] for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]

    def line(cells):
        return "| " + " | ".join(f"{c:{a}{w}}" for c, a, w in zip(cells, align, widths)) + " |"

    rule = "| " + " | ".join(("-" * (w - 1) + ":") if a == ">" else "-" * w for a, w in zip(align, widths)) + " |"
    out = [line(header), rule] + [line(row) for row in rows]
    if rss_kib is not None:
        out.append("")
        out.append(f"peak resident memory: {rss_kib / 1024:.1f} MiB (ru_maxrss of the process: load and all tests)")
    if kv is not None:
        name, per_token, ctx = kv
        out.append(f"KV cache: {name}, {per_token} bytes per token ({per_token * ctx / 2**20:.1f} MiB for "
                   f"the context of {ctx})")
    return "\n".join(out)
