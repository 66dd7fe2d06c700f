"""Tokenizers backed by the Hugging Face `tokenizers` library (byte-level BPE and kin).

Encoding is the library's, special tokens included: it matches added tokens
written in the text before the model sees it. Decoding is ours, token by
token (see base.py), in one of two styles chosen from the decoder the
tokenizer declares:

- "byte_level": tokens are GPT-2 byte-level strings ("ĠParis" = b" Paris");
  invalid UTF-8 becomes one U+FFFD per bad sequence, like the library.
- "sentencepiece": LLaMA-2-style tokenizer.json (▁ for spaces, <0xNN> byte
  fallback, one leading space stripped from the text), one U+FFFD per bad byte.

Added tokens that are not special decode to their literal text (that is the
text they were matched from); special ones decode to nothing.
"""
from typing import Iterable, List, Optional

from . import byte_level
from .base import Tokenizer, end_of_generation_ids
from .errors import TokenizerError

STYLES = ("byte_level", "sentencepiece")
_SPACE = "\u2581"


class BPETokenizer(Tokenizer):
    def __init__(self, tokenizer, *, style: str = "byte_level", bos_id: Optional[int] = None,
                 eos_id: Optional[int] = None, extra_eos_ids: Iterable[int] = (),
                 add_bos_default: bool = False, strip_first_space: bool = False):
        if style not in STYLES:
            raise TokenizerError(f"unknown decoding style {style!r} (known: {', '.join(STYLES)})")
        self._tk = tokenizer
        self._style = style
        self._strip_first_space = strip_first_space
        if style == "sentencepiece":
            self._utf8_policy = "per_byte"
        self._n_vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        added = tokenizer.get_added_tokens_decoder()      # {id: AddedToken}
        self._n_vocab = max([self._n_vocab] + [i + 1 for i in added])
        special = {i for i, t in added.items() if t.special}
        self._bytes = self._build_byte_table(added)
        eos_ids = end_of_generation_ids(eos_id, self.piece_to_id, special.__contains__, extra_eos_ids)
        super().__init__(bos_id=bos_id, eos_id=eos_id, eos_ids=eos_ids,
                         special_ids=special, add_bos_default=add_bos_default)

    def _build_byte_table(self, added):
        # None: special (no text). Built once: decoding then is a list lookup.
        table: List[Optional[bytes]] = []
        for i in range(self._n_vocab):
            token = added.get(i)
            if token is not None:
                table.append(None if token.special else token.content.encode("utf-8"))
                continue
            piece = self._tk.id_to_token(i)
            if piece is None:           # a hole in the ids: nothing to show
                table.append(b"")
            elif self._style == "byte_level":
                table.append(byte_level.piece_to_bytes(piece))
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                table.append(bytes([int(piece[3:5], 16)]))
            else:
                table.append(piece.replace(_SPACE, " ").encode("utf-8"))
        return table

    @property
    def style(self) -> str:
        """"byte_level" or "sentencepiece": how token strings map to bytes."""
        return self._style

    @property
    def backend(self):
        """The tokenizers.Tokenizer doing the encoding."""
        return self._tk

    @property
    def vocab_size(self) -> int:
        return self._n_vocab

    def id_to_piece(self, token_id: int) -> str:
        piece = self._tk.id_to_token(self._check_id(token_id))
        if piece is None:
            raise TokenizerError(f"token id {token_id} is not assigned in this vocabulary")
        return piece

    def piece_to_id(self, piece: str) -> Optional[int]:
        return self._tk.token_to_id(piece)

    def _encode_text(self, text: str) -> List[int]:
        # BOS is ours to add (encode(add_bos=...)), never the post-processor's.
        return self._tk.encode(text, add_special_tokens=False).ids

    def _token_bytes(self, token_id: int, at_start: bool) -> Optional[bytes]:
        data = self._bytes[token_id]
        if at_start and self._strip_first_space and data and data.startswith(b" "):
            return data[1:]
        return data
