"""The errors qinfer raises for problems a user can act on."""


class QinferError(Exception):
    """Base class: every user-facing problem qinfer detects."""


class ShapeError(QinferError, ValueError):
    """An array or layer shape the kernels cannot take."""


class UnsupportedError(QinferError, ValueError):
    """A setting outside what qinfer supports (bitwidth, group size, CPU path)."""


class FormatError(QinferError, ValueError):
    """A model path that cannot be read as a model: missing, malformed, truncated or inconsistent."""
