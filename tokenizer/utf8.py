"""Turning token bytes into text, one-shot or a piece at a time, the same way.

Tokens are byte strings that need not end on a character boundary (byte
fallback and byte-level BPE split emoji and CJK across tokens), so text is
made from the joined bytes. Two policies for bytes that are not valid UTF-8,
each matching the library whose output we must reproduce:

- "per_byte": one U+FFFD for every bad byte, as sentencepiece decodes its
  byte pieces (and as the `tokenizers` ByteFallback decoder does).
- "replace": one U+FFFD per maximal bad subsequence, Python's "replace",
  which is what Rust's String::from_utf8_lossy (the `tokenizers` ByteLevel
  decoder) does too.

Python's incremental UTF-8 decoder reports the same error ranges as the
one-shot decoder, so an IncrementalDecoder fed the same bytes produces the
same text as decode_bytes: only the moment it is produced differs.
"""
import codecs

# surrogateescape turns each undecodable byte into one lone surrogate in
# U+DC80..U+DCFF, which valid UTF-8 can never produce; mapping those to
# U+FFFD gives the per-byte policy without registering a global handler.
_ESCAPED_TO_REPLACEMENT = {cp: "\ufffd" for cp in range(0xDC80, 0xDD00)}


def _python_errors(policy):
    if policy == "per_byte":
        return "surrogateescape"
    if policy == "replace":
        return "replace"
    raise ValueError(f"unknown UTF-8 error policy {policy!r}")


def _finish(text, policy):
    if policy == "per_byte":
        return text.translate(_ESCAPED_TO_REPLACEMENT)
    return text


def decode_bytes(data: bytes, policy: str) -> str:
    return _finish(data.decode("utf-8", _python_errors(policy)), policy)


class Utf8Stream:
    """Bytes in, complete characters out; an unfinished character is held back."""

    def __init__(self, policy: str):
        self._policy = policy
        self._decoder = codecs.getincrementaldecoder("utf-8")(_python_errors(policy))

    def feed(self, data: bytes) -> str:
        return _finish(self._decoder.decode(data), self._policy)

    def flush(self) -> str:
        """Text of held-back bytes (U+FFFD for a character that never completed);
        the stream is then empty and can go on."""
        text = _finish(self._decoder.decode(b"", final=True), self._policy)
        self._decoder.reset()
        return text
