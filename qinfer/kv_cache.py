"""The KV cache's formats: the names users choose from, and which ones run.

    f32       float32 keys and values (4 bytes a value): the reference
    f16       IEEE float16 (2 bytes a value, round to nearest even when stored):
              half the cache's memory and half the bytes attention reads per token
    q8        one float16 scale per 32 values of a token, int8 codes (llama.cpp's q8_0 cache)
    kivi4/2   KIVI: keys per channel, values per token, 4 or 2 bits, a full-precision window
    kvquant*  KVQuant: pre-RoPE per-channel keys, non-uniform levels, dense-and-sparse

The layout of each format is in pyx/attention.c. Only the formats in
IMPLEMENTED run today; the others are named so that asking for one is a
clear error, not a silent float32 cache (issue 36 brings them).
"""
from .errors import UnsupportedError

FORMATS = ("f32", "f16", "q8", "kivi4", "kivi2", "kvquant4", "kvquant3", "kvquant2")
IMPLEMENTED = ("f32", "f16")
DEFAULT = "f32"
VALUE_BYTES = {"f32": 4, "f16": 2}


def check(name):
    """`name` if qinfer can hold its cache in that format, else an UnsupportedError naming it."""
    if name is None:
        return DEFAULT
    if not isinstance(name, str) or name not in FORMATS:
        raise UnsupportedError(f"unknown KV cache format {name!r}; choose from {', '.join(FORMATS)}")
    if name not in IMPLEMENTED:
        raise UnsupportedError(f"KV cache format {name!r} is not implemented yet; "
                               f"available: {', '.join(IMPLEMENTED)}")
    return name


def bytes_per_token(config, name):
    """Bytes a sequence's cache holds per token in format `name` (keys and values, every layer)."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * VALUE_BYTES[name]
