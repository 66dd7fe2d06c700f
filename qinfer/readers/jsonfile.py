"""Reading the small JSON files of a checkpoint (config.json, indexes) with a size cap.

json.loads can fail with ValueError, UnicodeDecodeError or, on deeply nested
input, RecursionError: all of them become one FormatError naming the file
(the parsing is the tokenizer package's, which reads tokenizer.json alike).
"""
import os

from ..errors import FormatError
from ..tokenizer.jsonfile import parse_json as _parse_json

MAX_JSON_BYTES = 64 << 20


def parse_json(data, path, what="JSON"):
    """bytes -> object; duplicate keys are rejected (which copy would a reader pick?)."""
    return _parse_json(data, path, what, FormatError)


def read_json(path, max_bytes=MAX_JSON_BYTES):
    """The JSON object in `path` (a dict), or FormatError."""
    try:
        size = os.path.getsize(path)
        if size > max_bytes:
            raise FormatError(f"{path}: {size} bytes is too large for a JSON file (limit {max_bytes})")
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from None
    obj = parse_json(data, path)
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj
