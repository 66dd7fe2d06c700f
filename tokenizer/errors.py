"""The one error the tokenizer package raises for problems a user can act on."""
from qinfer.errors import QinferError


class TokenizerError(QinferError):
    """A tokenizer file or metadata qinfer cannot use, or a bad call (e.g. an id out of range)."""
