"""The tuning cache: one JSON file per CPU, qinfer version and kernel build.

    $XDG_CACHE_HOME/qinfer/tuning-<digest>.json     (default ~/.cache/qinfer/)

The digest covers the CPU model and flags, the qinfer version and the
compiled kernels' parameters, so a new CPU, upgrade or rebuild starts afresh
instead of trusting measurements of other code. Written atomically (a
temporary file renamed over the old one): a reader never sees half a file.
"""
import functools
import hashlib
import json
import os
import platform
import tempfile

from .. import kernels
from ..packing import BITWIDTHS

FORMAT_VERSION = 1


class CacheError(Exception):
    """The cache file exists but cannot be used (unreadable, not JSON, wrong layout)."""


def cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "qinfer")


@functools.lru_cache(maxsize=None)     # every layer built looks the cache up: read the CPU once
def _cpu():
    """(model name, flags digest) of this CPU, as /proc/cpuinfo gives them."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key == "flags":
                    flags = sorted(value.split())
                    break
    except OSError:
        pass
    return model, hashlib.sha256(" ".join(flags).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def _kernels_digest():
    built = json.dumps({b: kernels.params(b) for b in BITWIDTHS}, sort_keys=True)
    return hashlib.sha256(built.encode()).hexdigest()[:16]


def machine_key():
    """What a cache entry is valid for."""
    from .. import __version__

    model, flags = _cpu()
    return dict(cpu=model, flags=flags, qinfer=__version__, kernels=_kernels_digest(),
                path=kernels.active_path())


def cache_path(key=None):
    key = key or machine_key()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir(), f"tuning-{digest}.json")


def load(path=None):
    """{shape key: entry dict}, {} when there is no cache, CacheError when it is unusable."""
    path = path or cache_path()
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CacheError(f"{path}: {exc}") from None
    if (not isinstance(data, dict) or data.get("format") != FORMAT_VERSION
            or not isinstance(data.get("layers"), dict)):
        raise CacheError(f"{path}: not a qinfer tuning cache of format {FORMAT_VERSION}")
    return data["layers"]


def save(layers, threads, path=None):
    """Write {shape key: entry dict} atomically; returns the path."""
    path = path or cache_path()
    write_json(path, dict(format=FORMAT_VERSION, key=machine_key(), threads=threads, layers=layers))
    return path


def write_json(path, data):
    """`data` as JSON at `path`, atomically: a temporary file in the same folder renamed over it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tuning-", suffix=".tmp", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
