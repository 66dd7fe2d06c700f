"""Just enough of the protobuf wire format to write a sentencepiece ModelProto.

sentencepiece loads a model from serialized ModelProto bytes; its generated
Python classes need the `protobuf` package, which we would otherwise not
depend on. Writing the handful of scalar, string and sub-message fields we
need takes a few lines (protobuf encoding: a varint key (field << 3 | wire
type), then a varint, 4 little-endian bytes, or a length-prefixed payload).
"""
import struct

_VARINT, _FIXED32, _LENGTH = 0, 5, 2


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64        # protobuf writes negative int32/int64 as 10-byte two's complement
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def int_field(field: int, value: int) -> bytes:
    """int32/int64/enum/bool."""
    return _key(field, _VARINT) + _varint(int(value))


def float_field(field: int, value: float) -> bytes:
    return _key(field, _FIXED32) + struct.pack("<f", value)


def bytes_field(field: int, payload: bytes) -> bytes:
    """string (UTF-8 encoded by the caller), bytes, or an embedded message."""
    return _key(field, _LENGTH) + _varint(len(payload)) + payload


def string_field(field: int, value: str) -> bytes:
    return bytes_field(field, value.encode("utf-8"))
