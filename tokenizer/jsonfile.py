"""Parsing a JSON file's bytes strictly: tokenizer.json here, and every JSON file of a checkpoint
(qinfer/readers/jsonfile.py, which passes its own error class; the tokenizer package depends on
nothing, so the one copy lives here).

json.loads can fail with ValueError, UnicodeDecodeError or, on deeply nested
input, RecursionError: all of them become one `error` naming the file.
"""
import json

from .errors import TokenizerError


def parse_json(data, path, what="JSON", error=TokenizerError):
    """bytes -> object; duplicate keys are rejected (which copy would a reader pick?)."""
    def no_duplicates(pairs):
        obj = {}
        for key, value in pairs:
            if key in obj:
                raise error(f"{path}: {what} has the key {key!r} twice")
            obj[key] = value
        return obj

    try:
        text = data.decode("utf-8")
        return json.loads(text, object_pairs_hook=no_duplicates)
    except error:
        raise
    except UnicodeDecodeError:
        raise error(f"{path}: {what} is not valid UTF-8") from None
    except (ValueError, RecursionError) as e:
        raise error(f"{path}: {what} is not valid JSON ({e})") from None
