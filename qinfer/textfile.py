"""Reading a user's text file (calibration text, a perplexity corpus) with one-line errors."""
import os

from .errors import QinferError

MAX_TEXT_BYTES = 1 << 30     # far above WikiText-2 (1.3 MB); keeps a wrong path to a huge file from filling memory


def read_utf8(path, what, error=QinferError):
    """The whole UTF-8 text of `path`; problems raise `error` naming `what` ("data file", ...)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise error(f"{what} {path}: no such file")
    try:
        size = os.path.getsize(path)
        if size > MAX_TEXT_BYTES:
            raise error(f"{what} {path}: {size} bytes is more than the {MAX_TEXT_BYTES >> 20} MiB qinfer reads")
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise error(f"{what} {path}: cannot read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} {path}: not UTF-8 text (byte {e.start})") from None
