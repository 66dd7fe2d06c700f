"""A sentencepiece model built from a GGUF "llama" vocabulary.

A GGUF file with tokenizer.ggml.model == "llama" carries the SentencePiece
vocabulary as three arrays (pieces, scores, types). Serializing them into a
ModelProto lets the sentencepiece library itself do the encoding, so the
GGUF path tokenizes exactly like the original tokenizer.model.
"""
from . import gguf_metadata as gm
from .errors import TokenizerError
from .protowire import bytes_field, float_field, int_field, string_field

_BPE = 2    # TrainerSpec.ModelType: llama.cpp's SPM tokenizer is score-driven BPE

# ModelProto / TrainerSpec / NormalizerSpec / SentencePiece field numbers,
# from sentencepiece_model.proto.
_PIECES, _TRAINER_SPEC, _NORMALIZER_SPEC = 1, 2, 3
_PIECE, _SCORE, _TYPE = 1, 2, 3
_MODEL_TYPE, _VOCAB_SIZE, _BYTE_FALLBACK = 3, 4, 35
_UNK_ID, _BOS_ID, _EOS_ID, _PAD_ID, _UNK_PIECE = 40, 41, 42, 43, 45
_NAME, _ADD_DUMMY_PREFIX, _REMOVE_EXTRA_WHITESPACES, _ESCAPE_WHITESPACES = 1, 3, 4, 5


def model_proto_from_gguf(meta: dict) -> bytes:
    """Serialized ModelProto for the vocabulary in GGUF metadata."""
    pieces = gm.string_list(meta, gm.TOKENS)
    n = len(pieces)
    scores = gm.number_list(meta, gm.SCORES, n, float, default=0.0)
    types = gm.number_list(meta, gm.TOKEN_TYPE, n, int, default=gm.NORMAL)

    unk = gm.token_id(meta, gm.UNK_ID, n)
    if unk is None and gm.UNKNOWN in types:
        unk = types.index(gm.UNKNOWN)
    if unk is None:
        raise TokenizerError(f"GGUF llama vocabulary has no unknown token (no {gm.UNK_ID!r} and no token of "
                             f"type {gm.UNKNOWN} in {gm.TOKEN_TYPE!r}); a SentencePiece vocabulary needs one")
    # llama.cpp takes unknown_token_id whatever its piece's type; sentencepiece needs that type
    types = [gm.UNKNOWN if i == unk else (gm.NORMAL if t == gm.UNKNOWN else t) for i, t in enumerate(types)]
    out = bytearray()
    for piece, score, kind in zip(pieces, scores, types):
        entry = string_field(_PIECE, piece) + float_field(_SCORE, score)
        if kind != gm.NORMAL:
            entry += int_field(_TYPE, kind)
        out += bytes_field(_PIECES, entry)

    trainer = (int_field(_MODEL_TYPE, _BPE) + int_field(_VOCAB_SIZE, n)
               + int_field(_BYTE_FALLBACK, gm.BYTE in types))
    if unk is not None:
        trainer += int_field(_UNK_ID, unk) + string_field(_UNK_PIECE, pieces[unk])
    # BOS/EOS/PAD come from the GGUF keys, not from sentencepiece; -1 keeps the
    # proto's defaults (1, 2) from naming pieces that may be something else.
    trainer += int_field(_BOS_ID, -1) + int_field(_EOS_ID, -1) + int_field(_PAD_ID, -1)
    out += bytes_field(_TRAINER_SPEC, trainer)

    # llama.cpp's SPM tokenizer never normalizes: no Unicode normalization and
    # no whitespace collapsing, only the optional dummy-prefix space.
    normalizer = (string_field(_NAME, "identity")
                  + int_field(_ADD_DUMMY_PREFIX, gm.flag(meta, gm.ADD_SPACE_PREFIX, True))
                  + int_field(_REMOVE_EXTRA_WHITESPACES, False)
                  + int_field(_ESCAPE_WHITESPACES, True))
    out += bytes_field(_NORMALIZER_SPEC, normalizer)
    return bytes(out)
