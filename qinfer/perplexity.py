"""Perplexity of a model on a text, with the protocol of GPTQ and QIGen.

    result = qinfer.perplexity(engine, text, seqlen=2048)
    result.ppl, result.nll, result.tokens, result.windows, result.seconds

The protocol:

* the data file's rows (its lines, line ends stripped) are joined with
  "\\n\\n" -- GPTQ's ``"\\n\\n".join(testdata["text"])`` over the Hugging Face
  rows of WikiText-2, which are the lines of wiki.test.raw (``load_text``);
* the text is tokenized once, as the engine's tokenizer encodes a prompt: a
  BOS token at the very start when the model's tokenizer adds one (as
  ``tokenizer(text)`` does in GPTQ), none between windows;
* the tokens are cut into non-overlapping windows of ``seqlen`` tokens (the
  incomplete tail is dropped; ``max_chunks`` keeps only the first windows);
* each window runs from an empty KV cache in one prefill, and every position
  but the last predicts the next token: seqlen - 1 scored tokens a window;
* ppl = exp(mean negative log-likelihood over all scored tokens).

The log-softmax is taken block by block of rows (float32 exponentials of
``logit - max``, summed in float64), so a window never holds more than one
prefill chunk of logits.
"""
import math
import os
import sys
import time
import types
from dataclasses import asdict, dataclass, field

import numpy as np

from .checks import whole
from .errors import QinferError
from .textfile import read_utf8

WIKITEXT2 = "wikitext2"                 # --data wikitext2: the Hugging Face datasets loader
NLL_ROWS = 128                          # logits rows per log-softmax block


class DataError(QinferError):
    """A data file that cannot be used: missing, unreadable, empty or too short."""


@dataclass
class PerplexityResult:
    ppl: float                 # exp(nll)
    nll: float                 # mean negative log-likelihood per scored token, in nats
    tokens: int                # scored tokens: windows * (seqlen - 1)
    windows: int
    seconds: float             # the forward passes and the scoring (not the tokenization)
    seqlen: int
    text_tokens: int = 0       # tokens of the whole text (BOS included)
    window_nll: list = field(default_factory=list)   # summed NLL of each window, in order

    @property
    def tokens_per_second(self):
        return self.windows * self.seqlen / self.seconds if self.seconds else 0.0

    def to_dict(self):
        d = asdict(self)
        d.pop("window_nll")
        return d


# ------------------------------------------------------------------- data
def read_rows(path):
    """The lines of a UTF-8 text file, line ends (LF or CRLF) stripped."""
    text = read_utf8(path, "data file", DataError)
    if not text.strip():
        raise DataError(f"data file {path} is empty")
    rows = text.split("\n")
    if rows[-1] == "":
        rows.pop()                      # the file's final line end
    return [r[:-1] if r.endswith("\r") else r for r in rows]


def load_wikitext2():
    """The rows of WikiText-2's test split (wikitext-2-raw-v1) from the Hugging Face datasets package."""
    try:
        import datasets
        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
    except Exception as e:      # ImportError, no network, no cache, a changed hub API ...
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"cannot load WikiText-2 with the Hugging Face datasets package ({why}); "
                        f"pass the path of a text file instead, e.g. --data wikitext-2-raw/wiki.test.raw") \
            from None
    return list(rows)


def load_text(data):
    """The text to score: `data` is a file path, or "wikitext2" for the Hugging Face test split.

    The rows (a file's lines, or the dataset's rows) are joined with "\\n\\n" as GPTQ does.
    """
    rows = load_wikitext2() if os.fspath(data) == WIKITEXT2 else read_rows(data)
    return "\n\n".join(rows)


def tokenize(engine, text):
    """Token ids of the whole text, as a prompt is encoded (BOS first when the tokenizer adds one)."""
    if not isinstance(text, str):
        raise QinferError("text must be a string")
    return engine.tokenizer.encode(text, add_bos=engine.tokenizer.add_bos_default)


# ---------------------------------------------------------------- scoring
def check_options(seqlen, max_chunks):
    """seqlen >= 2 and max_chunks None or >= 1, else a QinferError."""
    seqlen = whole("seqlen", seqlen, 2)
    if max_chunks is not None:
        max_chunks = whole("max_chunks", max_chunks, 1)
    return seqlen, max_chunks


def check_seqlen(engine, seqlen):
    model_ctx = engine.config.max_position_embeddings
    if model_ctx and seqlen > model_ctx:
        raise QinferError(f"seqlen {seqlen} is longer than the model's context ({model_ctx} tokens)")
    if seqlen > engine.ctx:
        raise QinferError(f"seqlen {seqlen} is longer than the engine's context ({engine.ctx} tokens; "
                          f"raise --ctx)")


def split_windows(tokens, seqlen, max_chunks=None):
    """int32 [n, seqlen]: consecutive non-overlapping windows; the incomplete tail is dropped."""
    tokens = np.asarray(tokens, dtype=np.int32)
    n = len(tokens) // seqlen
    if n == 0:
        raise DataError(f"the text has {len(tokens)} tokens, fewer than one window of seqlen {seqlen} "
                        f"(use a longer text or a smaller --seqlen)")
    if max_chunks is not None:
        n = min(n, max_chunks)
    return tokens[:n * seqlen].reshape(n, seqlen)


def nll_rows(logits, targets):
    """float64 [n]: -log softmax(logits[i])[targets[i]] for float32 logits [n, vocab]."""
    out = np.empty(len(targets), dtype=np.float64)
    scratch = np.empty((min(NLL_ROWS, len(targets)), logits.shape[1]), dtype=np.float32)
    for start in range(0, len(targets), NLL_ROWS):
        block = logits[start:start + NLL_ROWS]
        t = targets[start:start + NLL_ROWS]
        top = block.max(axis=1)
        shifted = scratch[:len(t)]
        np.subtract(block, top[:, None], out=shifted)
        total = np.exp(shifted, out=shifted).sum(axis=1, dtype=np.float64)
        picked = block[np.arange(len(t)), t].astype(np.float64)
        out[start:start + len(t)] = np.log(total) + top.astype(np.float64) - picked
    return out


def window_nll(engine, window, first=0, threads=None, logits_buffer=None):
    """Summed NLL of window[first + 1:], each token predicted from the ones before it in the
    window, which runs from an empty KV cache in one prefill (fed in the engine's chunks).
    logits_buffer: float32 [chunk, vocab] for the chunks' logits, reused across windows."""
    window = np.ascontiguousarray(window, dtype=np.int32)
    n = len(window)
    if not 0 <= first < n - 1:
        raise QinferError(f"a window of {n} tokens has nothing to score from position {first}")
    model = engine.model
    chunk = model.transformer.max_tokens
    if logits_buffer is None:
        logits_buffer = np.empty((chunk, engine.config.vocab_size), dtype=np.float32)
    engine.reset()
    total = 0.0
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        # positions start..stop-1 predict tokens start+1..stop; positions first..n-2 are scored
        lo, hi = max(first, start), min(stop, n - 1)
        logits = model.forward(window[start:stop], start, all_logits=lo < hi, threads=threads,
                               out=logits_buffer[:stop - start] if lo < hi else None)
        engine.pos = stop
        if lo < hi:
            total += float(nll_rows(logits[lo - start:hi - start], window[lo + 1:hi + 1]).sum())
    return total


class _Bar:
    """Windows done, running ppl and tokens/s on stderr (a tqdm bar, qinfer/progress.py)."""

    def __init__(self, total, enabled, file=None):
        from .progress import bar

        self.bar = bar(total, "perplexity", "window", enabled, file, leave=False)

    def update(self, ppl, tokens_per_second):
        self.bar.set_postfix_str(f"ppl {ppl:.4f}, {tokens_per_second:.0f} tokens/s", refresh=False)
        self.bar.update(1)

    def close(self):
        self.bar.close()


def evaluate_windows(engine, windows, first=0, threads=None, progress=None):
    """Score token windows [n, seqlen], each from an empty KV cache.

    Positions first..seqlen-2 of each window predict its tokens first+1..seqlen-1
    (first=0: every token but the first, GPTQ's protocol). Returns
    (summed NLL per window as a list, scored tokens per window, seconds).
    """
    windows = np.asarray(windows, dtype=np.int32)
    if windows.ndim != 2 or len(windows) == 0:
        raise QinferError("windows must be a non-empty 2-D array [n, seqlen] of token ids")
    seqlen = windows.shape[1]
    per_window = seqlen - 1 - first
    check_seqlen(engine, seqlen)
    sums = []
    bar = _Bar(len(windows), progress)
    logits = np.empty((engine.model.transformer.max_tokens, engine.config.vocab_size), dtype=np.float32)
    t0 = time.perf_counter()
    try:
        for w in windows:
            sums.append(window_nll(engine, w, first, threads, logits))
            elapsed = time.perf_counter() - t0
            bar.update(math.exp(sum(sums) / (per_window * len(sums))),
                       len(sums) * seqlen / elapsed if elapsed else 0.0)
    finally:
        bar.close()
        engine.reset()
    return sums, per_window, time.perf_counter() - t0


def perplexity(engine, text, seqlen=2048, max_chunks=None, progress=None, threads=None):
    """Perplexity of `engine`'s model on `text` (GPTQ's protocol; see the module's docstring).

    text: the string to score (``load_text(path)`` joins a file's rows as GPTQ does).
    seqlen: tokens per window; max_chunks: score only the first windows.
    progress: a bar on stderr (None: when stderr is a terminal). threads: for the forward passes.
    Returns a PerplexityResult.
    """
    seqlen, max_chunks = check_options(seqlen, max_chunks)
    check_seqlen(engine, seqlen)
    tokens = tokenize(engine, text)
    windows = split_windows(tokens, seqlen, max_chunks)
    sums, per_window, seconds = evaluate_windows(engine, windows, 0, threads, progress)
    count = per_window * len(sums)
    nll = math.fsum(sums) / count
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=count, windows=len(sums), seconds=seconds,
                            seqlen=seqlen, text_tokens=len(tokens), window_nll=sums)


class _CallableModule(types.ModuleType):
    """`qinfer.perplexity(engine, text)` is the documented call, and `import qinfer.perplexity` (or
    `from qinfer.perplexity import load_text`) needs the module: the module is callable instead of
    the package rebinding its name to the function."""

    def __call__(self, *args, **kwargs):
        return perplexity(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
