"""Reading the tokenizer.ggml.* keys of GGUF metadata, with errors that name the key.

The engine's GGUF reader hands over the metadata as a dict: keys exactly as
in the file, arrays as Python lists, scalars as Python values.
"""
import math
from typing import Optional

from .errors import TokenizerError

MODEL = "tokenizer.ggml.model"
PRE = "tokenizer.ggml.pre"
TOKENS = "tokenizer.ggml.tokens"
SCORES = "tokenizer.ggml.scores"
TOKEN_TYPE = "tokenizer.ggml.token_type"
MERGES = "tokenizer.ggml.merges"
BOS_ID = "tokenizer.ggml.bos_token_id"
EOS_ID = "tokenizer.ggml.eos_token_id"
EOT_ID = "tokenizer.ggml.eot_token_id"
EOM_ID = "tokenizer.ggml.eom_token_id"
UNK_ID = "tokenizer.ggml.unknown_token_id"
ADD_BOS = "tokenizer.ggml.add_bos_token"
ADD_SPACE_PREFIX = "tokenizer.ggml.add_space_prefix"

# tokenizer.ggml.token_type values (llama.cpp's, the same numbers as
# sentencepiece's SentencePiece.Type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def require(meta: dict, key: str):
    if key not in meta:
        raise TokenizerError(f"GGUF metadata lacks {key!r}")
    return meta[key]


def string_list(meta: dict, key: str) -> list:
    value = require(meta, key)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TokenizerError(f"GGUF metadata {key!r} must be an array of strings, got {_kind(value)}")
    return list(value)


def string(meta: dict, key: str, default=None):
    """An optional string key (e.g. tokenizer.ggml.pre)."""
    value = meta.get(key, default)
    if value is not None and not isinstance(value, str):
        raise TokenizerError(f"GGUF metadata {key!r} must be a string, got {_kind(value)}")
    return value


def _kind(value):
    if isinstance(value, (list, tuple)):
        return f"an array of {len(value)}"
    return f"{type(value).__name__} {value!r}"[:80]


def number_list(meta: dict, key: str, length: int, kind=float, default=None) -> list:
    """A per-token array of the vocabulary's length (default when absent)."""
    if key not in meta:
        if default is None:
            raise TokenizerError(f"GGUF metadata lacks {key!r}")
        return [default] * length
    raw = meta[key]
    if not isinstance(raw, (list, tuple)):
        raise TokenizerError(f"GGUF metadata {key!r} must be an array of numbers, got {_kind(raw)}")
    value = []
    for v in raw:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise TokenizerError(f"GGUF metadata {key!r} must be an array of finite numbers, got {v!r}")
        if kind is int and v != int(v):
            raise TokenizerError(f"GGUF metadata {key!r} must be an array of integers, got {v!r}")
        if kind is float and abs(v) > 3.4e38:
            raise TokenizerError(f"GGUF metadata {key!r} value {v!r} does not fit a float32 score")
        value.append(kind(v))
    if len(value) != length:
        raise TokenizerError(f"GGUF metadata {key!r} has {len(value)} entries "
                             f"but {TOKENS!r} has {length}")
    return value


def token_id(meta: dict, key: str, n_vocab: int) -> Optional[int]:
    """An optional token-id key; out-of-range ids (llama.cpp writes -1 or
    0xFFFFFFFF for "none") read as None."""
    value = meta.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value):
        raise TokenizerError(f"GGUF metadata {key!r} must be an integer, got {_kind(value)}")
    value = int(value)
    return value if 0 <= value < n_vocab else None


def flag(meta: dict, key: str, default: bool) -> bool:
    value = meta.get(key, default)
    if not isinstance(value, (bool, int)):
        raise TokenizerError(f"GGUF metadata {key!r} must be a bool, got {value!r}")
    return bool(value)
