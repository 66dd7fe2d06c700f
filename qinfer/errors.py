"""The errors qinfer raises for problems a user can act on."""


class QinferError(Exception):
    """Base class: every user-facing problem qinfer detects."""


class ShapeError(QinferError, ValueError):
    """An array or layer shape the kernels cannot take."""


class UnsupportedError(QinferError, ValueError):
    """A setting outside what qinfer supports (bitwidth, group size, CPU path)."""


class FormatError(QinferError, ValueError):
    """A model path that cannot be read as a model: missing, malformed, truncated or inconsistent."""


# The tokenizer package (tokenizer/, installed as qinfer.tokenizer) imports nothing of qinfer, so its
# error base is its own. Every TokenizerError it raises is made an instance of this subclass, so that
# `except QinferError` catches tokenizer problems too (a bad tokenizer file, a lone surrogate in a
# prompt), as it does every other problem a user can act on.
from .tokenizer.errors import TokenizerError as _TokenizerBase  # noqa: E402


class TokenizerError(QinferError, _TokenizerBase):
    """A tokenizer file or metadata qinfer cannot use, or a bad call (e.g. an id out of range)."""


_TokenizerBase.raise_as(TokenizerError)
