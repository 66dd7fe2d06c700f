"""The one error the tokenizer package raises for problems a user can act on.

The package imports nothing of qinfer: it is its own base. A library that
embeds it and wants `except ItsOwnError` to catch tokenizer problems as well
(qinfer does: qinfer/errors.py) subclasses TokenizerError with its own base
and hands the subclass to raise_as(); from then on `raise TokenizerError(...)`
anywhere in the package makes an instance of that subclass, which both
`except TokenizerError` and the library's `except` catch.
"""


class TokenizerError(Exception):
    """A tokenizer file or metadata that cannot be used, or a bad call (e.g. an id out of range)."""

    _raised_as = None       # the embedding library's subclass, if any

    def __new__(cls, *args):
        if cls is TokenizerError and TokenizerError._raised_as is not None:
            cls = TokenizerError._raised_as
        return super().__new__(cls, *args)

    @staticmethod
    def raise_as(subclass):
        """Make every TokenizerError raised from now on an instance of `subclass`."""
        if not issubclass(subclass, TokenizerError):
            raise TypeError(f"{subclass!r} is not a subclass of TokenizerError")
        TokenizerError._raised_as = subclass
