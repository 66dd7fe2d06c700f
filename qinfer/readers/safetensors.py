"""A validating .safetensors reader: numpy views on one read-only memory map.

Layout: u64 little-endian header length N, N bytes of JSON header, then the
data buffer. The header maps tensor names to {dtype, shape, data_offsets}
(offsets relative to the data buffer). Everything in the header is checked
before any tensor is touched, so a hostile file cannot make us allocate or
read beyond what it actually contains.

We do not use the safetensors package: we want the checks (and their error
messages) ourselves, and numpy views instead of copies.
"""
import os

import numpy as np

from ..errors import FormatError, UnsupportedError
from .jsonfile import parse_json
from .lazy import lazy_bf16, lazy_f16

MAX_HEADER_BYTES = 100 << 20
MAX_DIMS = 8
MAX_DIM = 1 << 48        # per dimension: only an empty tensor could have a larger one, and numpy cannot make it

# dtype name -> numpy dtype of the stored bytes (BF16 is read as raw uint16).
DTYPES = {
    "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I8": np.dtype("i1"), "U8": np.dtype("u1"),
    "U16": np.dtype("<u2"),      # SpQR checkpoints' statistics records and outlier columns (readers/spqr.py)
}
# Valid safetensors dtypes we do not load: named in the error so it reads as "unsupported", not "corrupt".
KNOWN_UNSUPPORTED = {"F64", "I16", "U32", "U64", "BOOL", "F8_E4M3", "F8_E5M2",
                     "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4", "C64"}


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)   # JSON true/false arrive as bool, a subclass of int


class SafetensorsFile:
    """The validated contents of one .safetensors file.

    tensors: name -> np.ndarray (read-only view on the map) for F32 and integer
    dtypes, or LazyTensor (float32 on call) for F16 and BF16.
    dtypes:  name -> the file's dtype string.
    metadata: the optional __metadata__ dict (str -> str).
    mmap:    the np.memmap all views share; keep it referenced while the views live.
    """

    def __init__(self, path, metadata, dtypes, tensors, mmap):
        self.path, self.metadata, self.dtypes, self.tensors, self.mmap = path, metadata, dtypes, tensors, mmap

    def __contains__(self, name):
        return name in self.tensors

    def __getitem__(self, name):
        return self.tensors[name]


def read_safetensors(path):
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from None
    if size < 8:
        raise FormatError(f"{path}: {size} bytes is too small for a safetensors file (needs an 8-byte header length)")
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > MAX_HEADER_BYTES:
                raise FormatError(f"{path}: safetensors header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
            if n > size - 8:
                raise FormatError(f"{path}: safetensors header length {n} runs past the end of the "
                                  f"{size}-byte file (truncated or not a safetensors file)")
            header_bytes = f.read(n)
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from None

    header = parse_json(header_bytes, path, "safetensors header")
    data_start = 8 + n
    entries, metadata = _check_header(header, path, size - data_start)

    # np.memmap cannot map 0 bytes; a file with only empty tensors needs no map at all.
    try:
        mm = np.memmap(path, dtype=np.uint8, mode="r") if size > data_start else None
    except (OSError, ValueError) as e:
        raise FormatError(f"{path}: cannot map the file ({e})") from None
    tensors, dtypes = {}, {}
    for name, (dtype_name, shape, begin, end) in entries.items():
        dtypes[name] = dtype_name
        dt = DTYPES[dtype_name]
        if begin == end:
            arr = np.zeros(shape, dtype=dt)     # nothing to map (and np.ndarray needs a buffer)
            arr.flags.writeable = False
        else:
            arr = np.ndarray(shape, dtype=dt, buffer=mm, offset=data_start + begin)
        if dtype_name == "BF16":
            tensors[name] = lazy_bf16(arr)
        elif dtype_name == "F16":
            tensors[name] = lazy_f16(arr)
        else:
            tensors[name] = arr
    return SafetensorsFile(path, metadata, dtypes, tensors, mm)


def _check_header(header, path, data_size):
    """-> ({name: (dtype, shape, begin, end)}, metadata); FormatError/UnsupportedError on anything off."""
    if not isinstance(header, dict):
        raise FormatError(f"{path}: safetensors header must be a JSON object, got {type(header).__name__}")
    metadata = header.get("__metadata__")
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise FormatError(f"{path}: __metadata__ must be an object of string -> string")
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entries[name] = _check_entry(name, info, path, data_size)

    # Sorted by start, each tensor must end before the next begins. Empty
    # tensors occupy no bytes, so they cannot overlap anything.
    spans = sorted((b, e, name) for name, (_, _, b, e) in entries.items() if e > b)
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise FormatError(f"{path}: tensors {n0!r} [{b0}, {e0}) and {n1!r} [{b1}, {e1}) overlap")
    return entries, metadata


def _check_entry(name, info, path, data_size):
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise FormatError(f"{where}: entry must be a JSON object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in info:
            raise FormatError(f"{where}: missing {key!r}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]

    if not isinstance(dtype, str):
        raise FormatError(f"{where}: dtype must be a string, got {dtype!r}")
    if dtype not in DTYPES:
        if dtype in KNOWN_UNSUPPORTED:
            raise UnsupportedError(f"{where}: dtype {dtype} is not supported (supported: {', '.join(DTYPES)})")
        raise FormatError(f"{where}: unknown dtype {dtype!r}")

    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise FormatError(f"{where}: shape must be a list of at most {MAX_DIMS} dimensions, got {shape!r}")
    if not all(_is_int(d) and d >= 0 for d in shape):
        raise FormatError(f"{where}: shape must hold non-negative integers, got {shape!r}")
    if any(d > MAX_DIM for d in shape):
        raise FormatError(f"{where}: shape {shape} has a dimension above {MAX_DIM}")

    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)):
        raise FormatError(f"{where}: data_offsets must be [begin, end] integers, got {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise FormatError(f"{where}: data_offsets [{begin}, {end}] must satisfy 0 <= begin <= end")
    if end > data_size:
        raise FormatError(f"{where}: data_offsets end {end} is past the {data_size}-byte data buffer "
                          f"(file truncated?)")

    # Python ints do not overflow; the running cap only keeps a shape like
    # [10**4000, ...] from costing time before it is rejected.
    nbytes = 0 if 0 in shape else DTYPES[dtype].itemsize
    for d in shape:
        nbytes *= d
        if nbytes > data_size:
            raise FormatError(f"{where}: shape {shape} of {dtype} needs more bytes than the "
                              f"{data_size}-byte data buffer holds")
    if nbytes != end - begin:
        raise FormatError(f"{where}: shape {shape} of {dtype} needs {nbytes} bytes but "
                          f"data_offsets [{begin}, {end}] span {end - begin}")
    return dtype, tuple(shape), begin, end
