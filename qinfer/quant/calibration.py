"""Calibration data for GPTQ: random windows of tokens from a text file.

As in the GPTQ paper's setup: the whole file is tokenized once (no BOS), and
`nsamples` windows of `seqlen` consecutive tokens start at offsets drawn
uniformly with a seeded generator (numpy's default_rng(seed)), so the same
file, tokenizer and seed give the same windows. Windows may overlap when the
text is short.
"""
import os

import numpy as np

from ..errors import QinferError

MAX_CALIB_BYTES = 1 << 30


def read_text(path):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise QinferError(f"calibration file {path}: no such file")
    try:
        size = os.path.getsize(path)
        if size > MAX_CALIB_BYTES:
            raise QinferError(f"calibration file {path}: {size} bytes is more than the "
                              f"{MAX_CALIB_BYTES >> 20} MiB qinfer reads")
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise QinferError(f"calibration file {path}: cannot read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise QinferError(f"calibration file {path}: not UTF-8 text (byte {e.start})") from None


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
