"""Writing a checkpoint directory so that an interrupted run leaves nothing half-written.

The files are written into a hidden sibling of the output,
`.<name>.qinfer-partial-<pid>`, and the directory is renamed to `<name>`
only when every file is complete (and flushed to disk). Replacing an
existing output (force) renames it to `.<name>.qinfer-old-<pid>` first and
deletes it after the new one is in place. A run killed outright (SIGKILL,
power loss) can leave one of these hidden directories behind: the next run
for the same output removes those whose process is gone. Readers never
look at them.
"""
import json
import os
import shutil
import signal
import struct
import threading

import numpy as np

from ..errors import QinferError

PARTIAL_TAG = ".qinfer-partial-"
OLD_TAG = ".qinfer-old-"
SAFETENSORS_DTYPES = {np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("int32"): "I32",
                      np.dtype("uint16"): "U16", np.dtype("uint8"): "U8"}


# ------------------------------------------------------------------ safetensors
def write_safetensors(path, tensors, metadata=None):
    """tensors: {name: ndarray} (float32, float16, int32, uint16 or uint8), written in the given order."""
    header = {"__metadata__": dict(metadata or {})}
    offset = 0
    arrays = []
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        code = SAFETENSORS_DTYPES.get(a.dtype)
        if code is None:
            raise TypeError(f"tensor {name!r}: dtype {a.dtype} cannot be written")
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        header[name] = {"dtype": code, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)            # the data buffer starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for a in arrays:
            f.write(memoryview(a.reshape(-1)).cast("B"))
        f.flush()
        os.fsync(f.fileno())


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------ output paths
def _pid_alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(out):
    parent, name = os.path.split(out)
    found = []
    try:
        entries = os.listdir(parent)
    except OSError:
        return found
    for entry in entries:
        for tag in (PARTIAL_TAG, OLD_TAG):
            prefix = f".{name}{tag}"
            if entry.startswith(prefix) and entry[len(prefix):].isdigit():
                found.append((os.path.join(parent, entry), int(entry[len(prefix):])))
    return found


def clean_leftovers(out):
    """Remove hidden directories left for `out` by runs that were killed; returns their paths."""
    removed = []
    for path, pid in _leftovers(out):
        if not _pid_alive(pid):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def check_output(out, force, source_path=None):
    """The absolute output path, or a QinferError if writing there is not allowed."""
    out = os.path.abspath(os.fspath(out))
    parent = os.path.dirname(out)
    if not os.path.basename(out):
        raise QinferError(f"output path {out!r} has no directory name")
    if not os.path.isdir(parent):
        raise QinferError(f"output directory {out}: its parent {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise QinferError(f"output directory {out}: cannot write in {parent}")
    if source_path is not None:
        src = os.path.abspath(os.fspath(source_path))
        if src == out or src.startswith(out + os.sep):
            raise QinferError(f"output directory {out} would replace the source model {src}")
    if os.path.lexists(out):
        if not force:
            raise QinferError(f"output {out} already exists (pass --force to replace it)")
        if not os.path.isdir(out) or os.path.islink(out):
            raise QinferError(f"output {out} exists and is not a directory; not replacing it")
        if os.listdir(out) and not os.path.isfile(os.path.join(out, "config.json")):
            raise QinferError(f"output {out} exists and is not a model directory (no config.json); "
                              f"not replacing it even with --force")
    return out


class _TermAsInterrupt:
    """While writing, SIGTERM raises KeyboardInterrupt so the partial directory is removed."""

    def __enter__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            def handler(signum, frame):
                raise KeyboardInterrupt("terminated")
            self.previous = signal.signal(signal.SIGTERM, handler)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False


class OutputDir:
    """with OutputDir(out, force) as d: write into d.path; d.commit() puts it at `out`.

    Leaving the block without commit() (an error, Ctrl-C) deletes everything written."""

    def __init__(self, out, force):
        self.out = out
        self.force = force
        parent, name = os.path.split(out)
        self.path = os.path.join(parent, f".{name}{PARTIAL_TAG}{os.getpid()}")
        self._old = os.path.join(parent, f".{name}{OLD_TAG}{os.getpid()}")
        self.committed = False

    def __enter__(self):
        self._term = _TermAsInterrupt().__enter__()
        clean_leftovers(self.out)
        shutil.rmtree(self.path, ignore_errors=True)
        os.mkdir(self.path)
        return self

    def commit(self):
        if os.path.lexists(self.out):
            if not self.force:
                raise QinferError(f"output {self.out} appeared while quantizing; not replacing it "
                                  f"(pass --force to replace it)")
            os.rename(self.out, self._old)
        os.rename(self.path, self.out)
        self.committed = True
        shutil.rmtree(self._old, ignore_errors=True)
        _fsync_dir(os.path.dirname(self.out))

    def __exit__(self, *exc):
        try:
            if not self.committed:
                shutil.rmtree(self.path, ignore_errors=True)
        finally:
            self._term.__exit__(*exc)
        return False


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def directory_size(path):
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)
