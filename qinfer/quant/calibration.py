"""Calibration data for GPTQ: random windows of tokens from a text file.

As in the GPTQ paper's setup: the whole file is tokenized once (no BOS), and
`nsamples` windows of `seqlen` consecutive tokens start at offsets drawn
uniformly with a seeded generator (numpy's default_rng(seed)), so the same
file, tokenizer and seed give the same windows. Windows may overlap when the
text is short.
"""

import numpy as np

from ..errors import QinferError
from ..textfile import read_utf8


def read_text(path):
    return read_utf8(path, "calibration file")


def token_windows(tokens, nsamples, seqlen, seed, what="calibration text"):
    """int32 [nsamples, seqlen]: windows of `tokens` starting at seeded random offsets."""
    tokens = np.asarray(tokens, dtype=np.int32)
    if len(tokens) < seqlen:
        raise QinferError(f"{what} has {len(tokens)} tokens, fewer than one window of --seqlen {seqlen} "
                          f"(use a longer text or a smaller --seqlen)")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(tokens) - seqlen + 1, size=nsamples)
    return np.stack([tokens[s:s + seqlen] for s in starts])


def calibration_windows(path, tokenizer, nsamples, seqlen, seed):
    """Tokenize the file at `path` and draw the windows."""
    text = read_text(path)
    tokens = tokenizer.encode(text, add_bos=False)
    return token_windows(tokens, nsamples, seqlen, seed, what=f"calibration file {path}")
