"""SentencePiece tokenizers (LLaMA 1/2 tokenizer.model, GGUF "llama" vocabularies).

Encoding is the sentencepiece library's own. Decoding is ours, piece by
piece, so that decode() and the incremental decoder share one definition;
it reproduces sentencepiece's DecodeIds (tests check it does):
- "▁" stands for a space; the first piece that produces output loses its
  leading "▁" (the dummy prefix added at encoding) when the model adds one;
- <0xNN> byte pieces are raw bytes, one U+FFFD per byte that is not UTF-8;
- control pieces (<s>, </s>) produce nothing, but bytes on either side of
  one are decoded separately; <unk> produces " ⁇ ".
"""
from typing import Iterable, List, Optional

from .base import Tokenizer, end_of_generation_ids
from .errors import TokenizerError
from .specials import AddedToken, SpecialSplitter

try:
    import sentencepiece as _spm
except ImportError:  # pragma: no cover - a declared dependency
    _spm = None

_SPACE = "\u2581"
_NORMAL, _CONTROL, _BYTE, _UNKNOWN = 0, 1, 2, 3


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model plus optional added tokens.

    added_tokens: tokens matched literally in text before sentencepiece sees
    it (sentencepiece itself never parses "<s>" or "<|im_start|>"); ids past
    the sentencepiece vocabulary extend it (fine-tunes add ChatML tokens at
    32000+). The text between two such tokens is encoded on its own, dummy
    prefix included, as sentencepiece, Hugging Face's slow tokenizer and
    llama.cpp all do.
    """

    _utf8_policy = "per_byte"
    _control_ends_bytes = True

    def __init__(self, processor, *, added_tokens: Iterable[AddedToken] = (),
                 bos_id: Optional[int] = None, eos_id: Optional[int] = None,
                 extra_eos_ids: Iterable[int] = (), add_bos_default: bool = True,
                 source: str = "sentencepiece model"):
        self._sp = processor
        n_sp = processor.get_piece_size()
        added = {t.id: t for t in added_tokens}
        for t in added.values():
            if t.id < 0:
                raise TokenizerError(f"added token {t.content!r} has a negative id {t.id}")
            if t.id < n_sp and processor.id_to_piece(t.id) != t.content:
                raise TokenizerError(f"added token {t.content!r} has id {t.id}, which {source} "
                                     f"uses for {processor.id_to_piece(t.id)!r}")
        # Within the sentencepiece vocabulary the piece's own type decides
        # decoding; an added entry there only makes the text parse whole.
        self._beyond = {i: t for i, t in added.items() if i >= n_sp}
        self._n_vocab = max([n_sp] + [i + 1 for i in added])
        self._splitter = SpecialSplitter(added.values())
        self._added_by_content = {t.content: t.id for t in added.values()}
        self._build_piece_table(n_sp)

        special = {i for i in range(n_sp) if processor.is_control(i)}
        special |= {i for i, t in self._beyond.items() if t.special}
        if bos_id is None:
            bos_id = _id_or_none(processor.bos_id())
        if eos_id is None:
            eos_id = _id_or_none(processor.eos_id())
        eos_ids = end_of_generation_ids(eos_id, self.piece_to_id, special.__contains__, extra_eos_ids)
        super().__init__(bos_id=bos_id, eos_id=eos_id, eos_ids=eos_ids,
                         special_ids=special, add_bos_default=add_bos_default)

    # -- construction ------------------------------------------------------
    @classmethod
    def from_file(cls, path: str, **kwargs) -> "SentencePieceTokenizer":
        return cls(load_model_file(path), source=path, **kwargs)

    @classmethod
    def from_proto(cls, data: bytes, source: str = "sentencepiece model", **kwargs) -> "SentencePieceTokenizer":
        return cls(load_model_proto(data, source), source=source, **kwargs)

    def _build_piece_table(self, n_sp):
        sp = self._sp
        # Decoding from tables is much faster than asking the library per id.
        self._kind = [_NORMAL] * n_sp
        self._bytes = [b""] * n_sp
        for i in range(n_sp):
            piece = sp.id_to_piece(i)
            if sp.is_control(i):
                self._kind[i] = _CONTROL
            elif sp.is_byte(i):
                self._kind[i] = _BYTE
                self._bytes[i] = bytes([int(piece[3:5], 16)])        # "<0xNN>"
            elif sp.is_unknown(i):
                self._kind[i] = _UNKNOWN
                self._bytes[i] = sp.decode_ids([i]).encode("utf-8")   # the model's unk surface, " ⁇ "
            else:
                self._bytes[i] = piece.replace(_SPACE, " ").encode("utf-8")
        # Whether decoding drops the first piece's leading "▁" depends on the
        # model's normalizer (add_dummy_prefix / remove_extra_whitespaces);
        # ask the library with a piece that starts with "▁".
        probe = next((i for i in range(n_sp) if self._kind[i] == _NORMAL
                      and sp.id_to_piece(i)[:2].count(_SPACE) == 1
                      and sp.id_to_piece(i).startswith(_SPACE)), None)
        self._strip_first_space = probe is not None and not sp.decode_ids([probe]).startswith(" ")

    # -- Tokenizer ---------------------------------------------------------
    @property
    def backend(self):
        """The sentencepiece.SentencePieceProcessor doing the encoding."""
        return self._sp

    @property
    def vocab_size(self) -> int:
        return self._n_vocab

    def id_to_piece(self, token_id: int) -> str:
        i = self._check_id(token_id)
        if i >= len(self._kind):
            if i not in self._beyond:
                raise TokenizerError(f"token id {i} is not assigned in this vocabulary")
            return self._beyond[i].content
        return self._sp.id_to_piece(i)

    def piece_to_id(self, piece: str) -> Optional[int]:
        if piece in self._added_by_content:
            return self._added_by_content[piece]
        i = self._sp.piece_to_id(piece)
        # sentencepiece answers unk_id for unknown pieces.
        if i == self._sp.unk_id() and self._sp.id_to_piece(i) != piece:
            return None
        return i

    def _encode_text(self, text: str) -> List[int]:
        if not self._splitter:
            return self._sp.encode(text)
        ids: List[int] = []
        for part in self._splitter.split(text):
            if isinstance(part, str):
                ids += self._sp.encode(part)
            else:
                ids.append(part.id)
        return ids

    def _token_bytes(self, token_id: int, at_start: bool) -> Optional[bytes]:
        if token_id >= len(self._kind):
            added = self._beyond.get(token_id)
            if added is None:
                return b""      # a hole between the model's pieces and its added tokens
            return None if added.special else added.content.encode("utf-8")
        kind = self._kind[token_id]
        if kind == _CONTROL:
            return None
        data = self._bytes[token_id]
        if at_start and kind == _NORMAL and self._strip_first_space and data.startswith(b" "):
            return data[1:]
        return data


def _id_or_none(i: int) -> Optional[int]:
    return i if i >= 0 else None


def load_model_file(path: str):
    """A sentencepiece processor for a tokenizer.model file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TokenizerError(f"cannot read SentencePiece model {path}: {e.strerror or e}") from None
    return load_model_proto(data, path)


def load_model_proto(data: bytes, what: str):
    """A sentencepiece processor for serialized ModelProto bytes (what: for messages)."""
    if _spm is None:
        raise TokenizerError("the 'sentencepiece' package is needed for this tokenizer: pip install sentencepiece")
    processor = _spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(data)
    except Exception as e:   # the library raises RuntimeError/OSError with its C++ status text
        detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise TokenizerError(f"{what} is not a valid SentencePiece model ({detail})") from None
    if processor.get_piece_size() == 0:
        raise TokenizerError(f"{what} has no pieces")
    return processor
