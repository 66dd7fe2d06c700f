"""Incremental detokenization for generation: text as soon as it is complete."""
from .utf8 import Utf8Stream


class IncrementalDecoder:
    """Feed token ids one at a time; get back only newly completed text.

    Made by Tokenizer.decoder(prefix). Concatenating every push() and the
    final flush() equals Tokenizer.decode() of all the ids pushed (after the
    prefix's text, when there is a prefix): both go through the tokenizer's
    _token_bytes with the same start-of-sequence flag, and through the same
    UTF-8 policy (see utf8.py). push() never returns half a character: bytes
    are held until the character completes, so a valid stream never shows
    U+FFFD.
    """

    def __init__(self, tokenizer, prefix=()):
        self._tokenizer = tokenizer
        self._utf8 = Utf8Stream(tokenizer._utf8_policy)
        # True until a token that produces output (even empty) has been seen:
        # SentencePiece drops the leading space of that first piece only.
        self._at_start = True
        # The prompt's text is not wanted, only the state it leaves (start
        # flag, bytes of a character it did not finish).
        for token_id in prefix:
            self.push(token_id)

    def push(self, token_id: int) -> str:
        data = self._tokenizer._token_bytes(token_id, self._at_start)
        if data is None:            # control token: no text, start unchanged
            if self._tokenizer._control_ends_bytes:
                return self._utf8.flush()
            return ""
        self._at_start = False
        return self._utf8.feed(data)

    def flush(self) -> str:
        """Text of any bytes still held back (U+FFFD for an incomplete character).

        Pushing after flush() carries on the same sequence (no leading-space
        strip again), with a clean byte buffer.
        """
        return self._utf8.flush()
