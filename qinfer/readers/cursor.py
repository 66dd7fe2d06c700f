"""A bounds-checked little-endian reader over a file's bytes.

Every read first checks that the bytes exist, so a truncated or lying file
ends in a FormatError naming the file, the field and the offset, never in an
IndexError, a struct.error or a read past the end of a memory map.
"""
import struct

from ..errors import FormatError

_FORMATS = {name: struct.Struct("<" + code) for name, code in
            (("u8", "B"), ("i8", "b"), ("u16", "H"), ("i16", "h"), ("u32", "I"), ("i32", "i"),
             ("u64", "Q"), ("i64", "q"), ("f32", "f"), ("f64", "d"))}


class Cursor:
    def __init__(self, buf, path, pos=0):
        self.buf = buf            # a memoryview (of a memory map): slicing it copies nothing
        self.path = path
        self.pos = pos
        self.size = len(buf)

    @property
    def remaining(self):
        return self.size - self.pos

    def error(self, message, at=None):
        at = self.pos if at is None else at
        return FormatError(f"{self.path}: {message} (at byte offset {at})")

    def need(self, n, what):
        if n > self.remaining:
            raise self.error(f"file is truncated: {what} needs {n} bytes, only {self.remaining} left")

    def scalar(self, kind, what):
        fmt = _FORMATS[kind]
        self.need(fmt.size, what)
        value = fmt.unpack_from(self.buf, self.pos)[0]
        self.pos += fmt.size
        return value

    def take(self, n, what):
        """The next n bytes as a memoryview (no copy)."""
        self.need(n, what)
        view = self.buf[self.pos:self.pos + n]
        self.pos += n
        return view

    def string(self, max_bytes, what):
        """A u64 length then that many UTF-8 bytes; the length is capped before anything is read."""
        start = self.pos
        n = self.scalar("u64", f"length of {what}")
        if n > max_bytes:
            raise self.error(f"{what} is {n} bytes long, more than the {max_bytes} allowed", at=start)
        raw = self.take(n, what)
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise self.error(f"{what} is not valid UTF-8", at=start) from None


def item_size(kind):
    return _FORMATS[kind].size
