"""How a sweep's model and calibration text reach the machines its tasks run on.

A task first looks for the file (or model directory) at the driver's path: on one
machine, or on a cluster whose nodes share a file system (NFS, a bucket mounted at
the same path), it is there, and nothing is copied. When it is not, and the driver
put the file's bytes in Ray's object store (files up to the ship limit,
DEFAULT_SHIP_LIMIT unless the user says otherwise), the task writes them once into
a folder of its node (SCRATCH, named by the content's digest) and uses that copy;
larger files must be on a shared path, and a task that cannot find one fails
naming the path and the node.

A local file is taken to be the driver's when its size matches and, for a shipped
file, its SHA-256 digest too.
"""
import dataclasses
import hashlib
import os
import shutil
import socket
import tempfile

from ..errors import QinferError

DEFAULT_SHIP_LIMIT = 512 * 2 ** 20
SCRATCH = os.path.join(tempfile.gettempdir(), "qinfer-sweep-files")


@dataclasses.dataclass
class SharedFile:
    """A file or directory of the driver: path, total size, digest (SHA-256 of the content, when
    shipped) and ref (a Ray ObjectRef of {relative path: bytes}, when shipped)."""
    path: str
    size: int
    digest: str = None
    ref: object = None

    def local(self):
        """The path of this content on the machine running the caller (a copy when shipped)."""
        if os.path.exists(self.path) and _size(self.path) == self.size and \
                (self.digest is None or _digest(self.path) == self.digest):
            return self.path
        if self.ref is None:
            raise QinferError(f"{self.path} is not on node {socket.gethostname()} ({self.size:,} bytes: above the "
                              f"ship limit, so it must be on a path every node shares)")
        dest = os.path.join(SCRATCH, self.digest, os.path.basename(os.path.normpath(self.path)))
        if not os.path.exists(dest):
            import ray

            _unpack(ray.get(self.ref), dest)
        return dest


def share(path, limit, put=None):
    """A SharedFile of `path`; its bytes go to put() (ray.put) when it is at most `limit` bytes."""
    path = os.path.abspath(path)
    size = _size(path)
    if put is None or size > limit:
        return SharedFile(path, size)
    return SharedFile(path, size, _digest(path), put(_pack(path)))


def _files(path):
    """(relative path, absolute path) of a file, or of every file under a directory, sorted."""
    if os.path.isfile(path):
        return [("", path)]
    out = []
    for root, _, names in os.walk(path):
        for n in names:
            full = os.path.join(root, n)
            out.append((os.path.relpath(full, path), full))
    return sorted(out)


def _size(path):
    return sum(os.path.getsize(full) for _, full in _files(path))


def _digest(path):
    h = hashlib.sha256()
    for rel, full in _files(path):
        h.update(rel.encode() + b"\0")
        with open(full, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:32]


def _pack(path):
    out = {}
    for rel, full in _files(path):
        with open(full, "rb") as f:
            out[rel] = f.read()
    return out


def _unpack(files, dest):
    """Write {relative path: bytes} at dest ("" alone: a file) through a temporary name."""
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(dest), prefix=".partial-")
    if set(files) == {""}:
        target = os.path.join(tmp, "file")
        with open(target, "wb") as f:
            f.write(files[""])
    else:
        target = os.path.join(tmp, "dir")
        for rel, data in files.items():
            full = os.path.join(target, rel)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "wb") as f:
                f.write(data)
    try:
        os.replace(target, dest)
    except OSError:
        if not os.path.exists(dest):        # another task of the node wrote it first otherwise
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
