"""Reading the small JSON files of a checkpoint (config.json, indexes) with a size cap.

json.loads can fail with ValueError, UnicodeDecodeError or, on deeply nested
input, RecursionError: all of them become one FormatError naming the file.
"""
import json
import os

from ..errors import FormatError

MAX_JSON_BYTES = 64 << 20


def parse_json(data, path, what="JSON"):
    """bytes -> object; duplicate keys are rejected (which copy would a reader pick?)."""
    def no_duplicates(pairs):
        obj = {}
        for key, value in pairs:
            if key in obj:
                raise FormatError(f"{path}: {what} has the key {key!r} twice")
            obj[key] = value
        return obj

    try:
        text = data.decode("utf-8")
        return json.loads(text, object_pairs_hook=no_duplicates)
    except FormatError:
        raise
    except UnicodeDecodeError:
        raise FormatError(f"{path}: {what} is not valid UTF-8") from None
    except (ValueError, RecursionError) as e:
        raise FormatError(f"{path}: {what} is not valid JSON ({e})") from None


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
