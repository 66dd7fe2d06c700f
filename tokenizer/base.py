"""The interface every qinfer tokenizer implements, and what they share.

A subclass supplies the text->ids direction (_encode_text) and, for the
other direction, the bytes each token stands for (_token_bytes); decode()
and the incremental decoder are both built on _token_bytes so they cannot
disagree.
"""
from abc import ABC, abstractmethod
from typing import FrozenSet, Iterable, List, Optional

from .errors import TokenizerError
from .streaming import IncrementalDecoder
from .utf8 import decode_bytes

# Pieces that end a turn or a text in LLaMA-family chat models. A model's
# metadata names one EOS id, but a chat model stops on its end-of-turn token
# (<|im_end|>, <|eot_id|>...), which is often a different id.
END_OF_GENERATION_PIECES = (
    "</s>", "<|endoftext|>", "<|end_of_text|>", "<|im_end|>", "<|eot_id|>",
    "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|END_OF_TURN_TOKEN|>", "<EOT>",
)


class Tokenizer(ABC):
    """Text <-> token ids for one model.

    Attributes every implementation sets (read them through the properties):
    bos_id, eos_id (None when the vocabulary has none), eos_ids (ids that end
    generation), special_ids (control tokens: decode() drops them),
    add_bos_default (whether the model expects BOS before a prompt).
    """

    _utf8_policy = "replace"     # see utf8.py; SentencePiece-style sets "per_byte"
    # Whether a control token cuts a run of bytes in two (sentencepiece
    # decodes the bytes on each side separately; `tokenizers` drops skipped
    # tokens first, so bytes on both sides join).
    _control_ends_bytes = False

    def __init__(self, *, bos_id, eos_id, eos_ids, special_ids, add_bos_default):
        self._bos_id = bos_id
        self._eos_id = eos_id
        self._eos_ids = frozenset(eos_ids)
        self._special_ids = frozenset(special_ids)
        self._add_bos_default = bool(add_bos_default)

    # -- what subclasses provide -------------------------------------------
    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids (the largest id + 1)."""

    @abstractmethod
    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary string of an id (e.g. "▁Hello", "ĠParis", "<0x0A>")."""

    @abstractmethod
    def piece_to_id(self, piece: str) -> Optional[int]:
        """The id of a vocabulary string, or None if it is not in the vocabulary."""

    @abstractmethod
    def _encode_text(self, text: str) -> List[int]:
        """Ids for text, without BOS."""

    @abstractmethod
    def _token_bytes(self, token_id: int, at_start: bool) -> Optional[bytes]:
        """Bytes one token contributes to the decoded text.

        at_start: no earlier token of the sequence produced output. Returns
        None for a token that produces nothing and leaves at_start as it was
        (control tokens). The id is already range-checked.
        """

    # -- shared behaviour --------------------------------------------------
    @property
    def bos_id(self) -> Optional[int]:
        return self._bos_id

    @property
    def eos_id(self) -> Optional[int]:
        return self._eos_id

    @property
    def eos_ids(self) -> FrozenSet[int]:
        return self._eos_ids

    @property
    def special_ids(self) -> FrozenSet[int]:
        return self._special_ids

    @property
    def add_bos_default(self) -> bool:
        return self._add_bos_default

    def encode(self, text: str, add_bos: bool = False) -> List[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"encode() takes a str, got {type(text).__name__}")
        check_unicode(text)
        ids = self._encode_text(text)
        if add_bos:
            if self._bos_id is None:
                raise TokenizerError("add_bos=True but this tokenizer has no BOS token")
            ids = [self._bos_id] + ids
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids; control tokens (special_ids) produce no text."""
        texts = []
        parts = []
        at_start = True
        for token_id in ids:
            data = self._token_bytes(self._check_id(token_id), at_start)
            if data is not None:
                parts.append(data)
                at_start = False
            elif self._control_ends_bytes and parts:
                texts.append(decode_bytes(b"".join(parts), self._utf8_policy))
                parts = []
        texts.append(decode_bytes(b"".join(parts), self._utf8_policy))
        return "".join(texts)

    def decoder(self, prefix: Iterable[int] = ()) -> IncrementalDecoder:
        """A fresh incremental decoder for one generated sequence.

        prefix: ids already in the sequence (the prompt) whose text is not
        wanted; they set the decoder's state, so the first generated piece
        keeps its leading space and decode(prefix + generated) ==
        decode(prefix) + the decoder's output.
        """
        return _CheckedDecoder(self, prefix)

    def _check_id(self, token_id) -> int:
        try:
            i = int(token_id)
        except (TypeError, ValueError):
            raise TokenizerError(f"token id must be an int, got {token_id!r}") from None
        if i != token_id or not 0 <= i < self.vocab_size:
            raise TokenizerError(f"token id {token_id!r} is outside the vocabulary (0..{self.vocab_size - 1})")
        return i

    def __repr__(self):
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self._bos_id}, "
                f"eos_ids={sorted(self._eos_ids)})")


class _CheckedDecoder(IncrementalDecoder):
    def push(self, token_id: int) -> str:
        return super().push(self._tokenizer._check_id(token_id))


def end_of_generation_ids(eos_id, piece_to_id, is_special, extra=()):
    """eos_id, extra ids, and any control token named like an end-of-turn token."""
    ids = {i for i in (eos_id, *extra) if i is not None}
    for piece in END_OF_GENERATION_PIECES:
        i = piece_to_id(piece)
        if i is not None and is_special(i):
            ids.add(i)
    return ids


def check_unicode(text: str, what: str = "text") -> None:
    """Reject a str that cannot be encoded as UTF-8 (a lone surrogate, e.g. from
    undecodable command-line bytes or a chat template's escape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TokenizerError(f"the {what} is not valid Unicode: lone surrogate "
                             f"U+{ord(text[e.start]):04X} at character {e.start}") from None
