"""A validating GGUF reader: header, key/values and tensor infos, with every limit checked.

Layout (little-endian, version 2 and 3):
    "GGUF"  u32 version  u64 tensor_count  u64 kv_count
    kv_count x  (string key, u32 value type, value)
    tensor_count x  (string name, u32 n_dims, u64 ne[n_dims], u32 ggml type, u64 offset)
    padding to `general.alignment`, then the data section (offsets are relative to it)
A string is a u64 byte length and UTF-8 bytes; an array is u32 element type,
u64 count and the elements.

We parse the structure ourselves (the gguf package only supplies the type
constants) so that every count and length is capped before it is used and
every read is inside the file: a corrupt or hostile file ends in a
FormatError/UnsupportedError naming the file and the problem, never in a
hang, a MemoryError or an IndexError.

Shapes are kept in GGUF order (ne0 first, the fastest-varying dimension);
`GGUFTensorInfo.numpy_shape` is the reverse.
"""
import os
from dataclasses import dataclass

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ..errors import FormatError, UnsupportedError
from . import ggml_quants
from .cursor import Cursor, item_size

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_TENSORS = 1 << 16
MAX_KV = 1 << 16
MAX_KEY_BYTES = 1 << 16
MAX_TENSOR_NAME_BYTES = 1 << 10
MAX_STRING_BYTES = 16 << 20        # string values: chat templates can be long
MAX_ARRAY_LEN = 1 << 24
MAX_ARRAY_DEPTH = 1                # an array may hold arrays, those may not
MAX_DIMS = 4
MAX_ELEMENTS = 1 << 40             # per tensor; the file size bounds it far lower in practice
MAX_ALIGNMENT = 1 << 16
DEFAULT_ALIGNMENT = 32

SUPPORTED_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16) + tuple(ggml_quants.FORMATS)

_SCALAR_KIND = {
    GGUFValueType.UINT8: "u8", GGUFValueType.INT8: "i8", GGUFValueType.UINT16: "u16",
    GGUFValueType.INT16: "i16", GGUFValueType.UINT32: "u32", GGUFValueType.INT32: "i32",
    GGUFValueType.UINT64: "u64", GGUFValueType.INT64: "i64", GGUFValueType.FLOAT32: "f32",
    GGUFValueType.FLOAT64: "f64", GGUFValueType.BOOL: "u8",
}
INT_TYPES = frozenset((GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
                       GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64))
FLOAT_TYPES = frozenset((GGUFValueType.FLOAT32, GGUFValueType.FLOAT64))


@dataclass(frozen=True)
class GGUFValue:
    type: GGUFValueType
    value: object                         # int/float/bool/str, or for ARRAY a list (strings, nested) or np.ndarray (numbers)
    item_type: GGUFValueType = None       # element type of an ARRAY

    def to_python(self):
        """Arrays as Python lists (nested GGUFValues unwrapped), scalars as they are."""
        if self.type != GGUFValueType.ARRAY:
            return self.value
        if isinstance(self.value, np.ndarray):
            return self.value.tolist()
        if self.item_type == GGUFValueType.ARRAY:
            return [v.to_python() for v in self.value]
        return list(self.value)


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple                          # GGUF order: ne0 (fastest) first
    type: GGMLQuantizationType
    offset: int                           # absolute byte offset in the file
    nbytes: int

    @property
    def numpy_shape(self):
        return tuple(reversed(self.shape))

    @property
    def n_elements(self):
        n = 1
        for d in self.shape:
            n *= d
        return n


class GGUFFile:
    """A parsed, validated GGUF file. `raw(name)` gives a tensor's bytes as a view on the memory map."""

    def __init__(self, path, version, kv, tensors, alignment, data_offset, mmap):
        self.path = path
        self.version = version
        self.kv = kv                      # key -> GGUFValue, in file order
        self.tensors = tensors            # name -> GGUFTensorInfo, in file order
        self.alignment = alignment
        self.data_offset = data_offset
        self.mmap = mmap                  # np.memmap (uint8, read-only); keep it alive while views exist

    def raw(self, name):
        info = self.tensors[name]
        return self.mmap[info.offset:info.offset + info.nbytes]

    # -- metadata, checked by type before use --------------------------------
    def _get(self, key, required):
        v = self.kv.get(key)
        if v is None:
            if required:
                raise FormatError(f"{self.path}: required metadata key {key!r} is missing")
            return None
        return v

    def get_int(self, key, default=None, required=False, minimum=None):
        v = self._get(key, required)
        if v is None:
            return default
        if v.type not in INT_TYPES:
            raise FormatError(f"{self.path}: metadata {key!r} must be an integer, got {v.type.name}")
        if minimum is not None and v.value < minimum:
            raise FormatError(f"{self.path}: metadata {key!r} must be >= {minimum}, got {v.value}")
        return int(v.value)

    def get_float(self, key, default=None, required=False, positive=False):
        v = self._get(key, required)
        if v is None:
            return default
        if v.type not in FLOAT_TYPES and v.type not in INT_TYPES:
            raise FormatError(f"{self.path}: metadata {key!r} must be a number, got {v.type.name}")
        x = float(v.value)
        if not np.isfinite(x) or (positive and x <= 0):
            raise FormatError(f"{self.path}: metadata {key!r} must be a finite{' positive' if positive else ''} "
                              f"number, got {x}")
        return x

    def get_str(self, key, default=None, required=False):
        v = self._get(key, required)
        if v is None:
            return default
        if v.type != GGUFValueType.STRING:
            raise FormatError(f"{self.path}: metadata {key!r} must be a string, got {v.type.name}")
        return v.value

    def get_array_len(self, key):
        """Length of an array value, or None if absent."""
        v = self.kv.get(key)
        if v is None:
            return None
        if v.type != GGUFValueType.ARRAY:
            raise FormatError(f"{self.path}: metadata {key!r} must be an array, got {v.type.name}")
        return len(v.value)


def read_gguf(path):
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from None
    if size < 4:
        raise FormatError(f"{path}: {size} bytes is too small for a GGUF file")
    try:
        mm = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:
        raise FormatError(f"{path}: cannot map the file ({e})") from None
    cur = Cursor(memoryview(mm), path)

    magic = bytes(cur.take(4, "magic"))
    if magic != MAGIC:
        raise FormatError(f"{path}: not a GGUF file (magic {magic!r}, expected {MAGIC!r})")
    version = cur.scalar("u32", "version")
    if version not in VERSIONS:
        if int.from_bytes(version.to_bytes(4, "little"), "big") in VERSIONS:
            raise UnsupportedError(f"{path}: big-endian GGUF files are not supported")
        raise UnsupportedError(f"{path}: GGUF version {version} is not supported (supported: 2, 3)")
    n_tensors = cur.scalar("u64", "tensor count")
    if n_tensors > MAX_TENSORS:
        raise FormatError(f"{path}: tensor count {n_tensors} exceeds the limit of {MAX_TENSORS}")
    n_kv = cur.scalar("u64", "metadata count")
    if n_kv > MAX_KV:
        raise FormatError(f"{path}: metadata count {n_kv} exceeds the limit of {MAX_KV}")

    kv = {}
    for i in range(n_kv):
        at = cur.pos
        key = cur.string(MAX_KEY_BYTES, f"metadata key #{i}")
        if key in kv:
            raise cur.error(f"metadata key {key!r} appears twice", at=at)
        kv[key] = _read_value(cur, f"metadata {key!r}", depth=0)

    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in kv:
        a = kv["general.alignment"]
        if a.type not in INT_TYPES or a.value <= 0 or a.value > MAX_ALIGNMENT or a.value & (a.value - 1):
            raise FormatError(f"{path}: general.alignment must be a power of two <= {MAX_ALIGNMENT}, got {a.value!r}")
        alignment = int(a.value)

    infos = [_read_tensor_info(cur, i) for i in range(n_tensors)]
    data_offset = -(-cur.pos // alignment) * alignment
    tensors = {}
    for name, shape, ggml_type, rel_offset, nbytes in infos:
        if name in tensors:
            raise FormatError(f"{path}: tensor {name!r} appears twice")
        if rel_offset % alignment:
            raise FormatError(f"{path}: tensor {name!r} offset {rel_offset} is not a multiple of the "
                              f"alignment {alignment}")
        start = data_offset + rel_offset
        if start + nbytes > size:
            raise FormatError(f"{path}: tensor {name!r} data [{start}, {start + nbytes}) runs past the end "
                              f"of the {size}-byte file (truncated?)")
        tensors[name] = GGUFTensorInfo(name, shape, ggml_type, start, nbytes)

    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values() if t.nbytes)
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise FormatError(f"{path}: tensors {n0!r} and {n1!r} overlap in the data section")
    return GGUFFile(path, version, kv, tensors, alignment, data_offset, mm)


def _read_value(cur, what, depth):
    at = cur.pos
    raw_type = cur.scalar("u32", f"type of {what}")
    vtype = _value_type(cur, raw_type, what, at)
    if vtype == GGUFValueType.ARRAY:
        return _read_array(cur, what, depth)
    if vtype == GGUFValueType.STRING:
        return GGUFValue(vtype, cur.string(MAX_STRING_BYTES, what))
    value = cur.scalar(_SCALAR_KIND[vtype], what)
    if vtype == GGUFValueType.BOOL:
        if value > 1:
            raise cur.error(f"{what} is a bool but holds {value}", at=cur.pos - 1)
        value = bool(value)
    return GGUFValue(vtype, value)


def _value_type(cur, raw, what, at):
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise cur.error(f"{what} has unknown value type {raw}", at=at) from None


def _read_array(cur, what, depth):
    at = cur.pos
    item_type = _value_type(cur, cur.scalar("u32", f"element type of {what}"), what, at)
    n = cur.scalar("u64", f"length of {what}")
    if n > MAX_ARRAY_LEN:
        raise cur.error(f"{what} has {n} elements, more than the {MAX_ARRAY_LEN} allowed", at=at)
    if item_type == GGUFValueType.ARRAY:
        if depth >= MAX_ARRAY_DEPTH:
            raise cur.error(f"{what} nests arrays deeper than {MAX_ARRAY_DEPTH} level", at=at)
        cur.need(n * 12, f"{n} nested arrays of {what}")      # each needs at least a type and a length
        return GGUFValue(GGUFValueType.ARRAY, [_read_array(cur, f"{what}[{i}]", depth + 1) for i in range(n)],
                         item_type)
    if item_type == GGUFValueType.STRING:
        cur.need(n * 8, f"{n} strings of {what}")             # each needs at least its length
        return GGUFValue(GGUFValueType.ARRAY, [cur.string(MAX_STRING_BYTES, f"{what}[{i}]") for i in range(n)],
                         item_type)
    kind = _SCALAR_KIND[item_type]
    raw = cur.take(n * item_size(kind), what)
    values = np.frombuffer(raw, dtype="<" + kind[0] + str(item_size(kind))).copy()
    if item_type == GGUFValueType.BOOL:
        if values.size and values.max() > 1:
            raise cur.error(f"{what} is a bool array holding a value other than 0/1", at=at)
        values = values.astype(bool)
    return GGUFValue(GGUFValueType.ARRAY, values, item_type)


def _type_name(raw):
    try:
        return GGMLQuantizationType(raw).name
    except ValueError:
        return f"unknown type id {raw}"


def _read_tensor_info(cur, i):
    at = cur.pos
    name = cur.string(MAX_TENSOR_NAME_BYTES, f"name of tensor #{i}")
    what = f"tensor {name!r}"
    n_dims = cur.scalar("u32", f"n_dims of {what}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.error(f"{what} has {n_dims} dimensions (must be 1..{MAX_DIMS})", at=at)
    shape = []
    n_elements = 1
    for d in range(n_dims):
        ne = cur.scalar("u64", f"dimension {d} of {what}")
        if ne < 1:
            raise cur.error(f"{what} has dimension {d} = 0 (each must be >= 1)", at=at)
        n_elements *= ne
        if n_elements > MAX_ELEMENTS:
            raise cur.error(f"{what} has more than {MAX_ELEMENTS} elements (dimension {d} = {ne})", at=at)
        shape.append(ne)
    raw_type = cur.scalar("u32", f"type of {what}")
    try:
        ggml_type = GGMLQuantizationType(raw_type)
    except ValueError:
        ggml_type = None
    if ggml_type not in SUPPORTED_TYPES:
        raise UnsupportedError(f"{cur.path}: {what} has type {_type_name(raw_type)}, which qinfer cannot load "
                               f"(supported: {', '.join(t.name for t in SUPPORTED_TYPES)})")
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    if shape[0] % block:
        raise cur.error(f"{what} ({ggml_type.name}) has a first dimension {shape[0]} that is not a "
                        f"multiple of its block size {block}", at=at)
    offset = cur.scalar("u64", f"data offset of {what}")
    return name, tuple(shape), ggml_type, offset, n_elements // block * type_size
