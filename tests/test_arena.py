"""qinfer/arena.py: the weights' huge-page chunks."""
import gc
import mmap
import weakref

import numpy as np
import pytest

from qinfer import arena
from qinfer.linear import QuantizedLinear

MiB = 1 << 20


def owner(array):
    """The object at the end of an array's chain of bases (the chunk's mmap)."""
    while isinstance(array, np.ndarray) and array.base is not None:
        array = array.base
    return array.obj if isinstance(array, memoryview) else array


def thp_mode():
    """The bracketed word of /sys/kernel/mm/transparent_hugepage/enabled, or None."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


def huge_kib(array, field="AnonHugePages:"):
    """KiB of the mapping holding `array` that sit on huge pages (/proc/self/smaps; or
    another of its fields, e.g. "Rss:")."""
    address = array.ctypes.data
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == field:
                return int(line.split()[1])
    raise AssertionError("no mapping holds the array")


def test_arrays_are_aligned_disjoint_and_keep_their_contents():
    a = arena.Arena(chunk=2 * MiB)
    sizes = [1, 63, 64, 1000, 300_000, 700_000, 2 * MiB, 5 * MiB + 3, 17, 900_000]
    arrays = [a.empty((n,), np.uint8) for n in sizes]
    for i, x in enumerate(arrays):
        assert x.shape == (sizes[i],) and x.flags.c_contiguous and x.flags.writeable
        assert x.ctypes.data % arena.ALIGNMENT == 0
        x[...] = i + 1
    for i, x in enumerate(arrays):
        assert np.all(x == i + 1), f"array {i} was overwritten"
    spans = sorted((x.ctypes.data, x.ctypes.data + x.nbytes) for x in arrays)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))


def test_shape_and_dtype():
    x = arena.Arena().empty((3, 5, 16), np.float16)
    assert x.shape == (3, 5, 16) and x.dtype == np.float16 and x.flags.c_contiguous
    x[...] = np.arange(240, dtype=np.float16).reshape(3, 5, 16)
    assert x[2, 4, 15] == 239


def test_a_chunk_is_unmapped_when_its_last_array_goes():
    a = arena.Arena(chunk=2 * MiB)
    first = a.empty((MiB,), np.uint8)
    second = a.empty((MiB // 2,), np.uint8)          # the same chunk
    chunk = owner(first)
    if not isinstance(chunk, mmap.mmap):
        pytest.skip("chunks are numpy arrays on this platform")
    assert owner(second) is chunk
    ref = weakref.ref(chunk)
    a.empty((3 * MiB // 4,), np.uint8)               # does not fit: a new chunk, roomier, becomes current
    del first, chunk
    gc.collect()
    assert ref() is not None, "unmapped while an array still uses it"
    del second
    gc.collect()
    assert ref() is None


def test_a_large_array_that_does_not_fit_leaves_the_roomier_chunk_current():
    a = arena.Arena(chunk=4 * MiB)
    small = a.empty((MiB,), np.uint8)
    big = a.empty((6 * MiB,), np.uint8)              # its own chunk, full
    after = a.empty((MiB,), np.uint8)                # back in the first chunk
    assert owner(after) is owner(small) and owner(big) is not owner(small)


@pytest.mark.skipif(thp_mode() not in ("always", "madvise"), reason="transparent huge pages are off here")
def test_chunks_sit_on_huge_pages(monkeypatch):
    monkeypatch.delenv(arena.HUGEPAGES_ENV, raising=False)
    x = arena.Arena(chunk=8 * MiB).empty((8 * MiB,), np.uint8)
    x[...] = 1
    assert huge_kib(x) >= 2048


@pytest.mark.skipif(not hasattr(mmap, "MADV_DONTNEED"), reason="no madvise here")
def test_trim_gives_back_the_pages_past_the_last_array_and_keeps_the_arrays(monkeypatch):
    """An array ending inside a huge page makes all of it resident; trim() returns the pages
    past the array (and the arrays keep their contents; the next ones touch pages anew)."""
    monkeypatch.delenv(arena.HUGEPAGES_ENV, raising=False)
    a = arena.Arena(chunk=8 * MiB)
    x = a.empty((MiB + 4096,), np.uint8)
    x[...] = 7
    a.trim()
    assert huge_kib(x, "Rss:") <= (MiB + 4096) // 1024 + 8      # not the 2 MiB huge page it began on
    assert (x == 7).all()
    y = a.empty((3 * MiB,), np.uint8)                           # from the trimmed pages on
    y[...] = 9
    assert (x == 7).all() and (y == 9).all()
    assert huge_kib(x, "Rss:") >= (4 * MiB + 4096) // 1024


@pytest.mark.skipif(thp_mode() != "madvise", reason="huge pages are given only when asked for under 'madvise'")
def test_qinfer_hugepages_0_does_not_ask(monkeypatch):
    monkeypatch.setenv(arena.HUGEPAGES_ENV, "0")
    x = arena.Arena(chunk=8 * MiB).empty((8 * MiB,), np.uint8)
    x[...] = 1
    assert huge_kib(x) == 0


def test_a_layers_tiles_come_from_the_arena():
    layer = QuantizedLinear.from_float(np.random.default_rng(3).standard_normal((96, 256)), 4, group_size=32)
    for array in (layer._words, layer._scales, layer._zeros):
        assert isinstance(owner(array), mmap.mmap) or owner(array).nbytes >= arena.CHUNK
        assert array.ctypes.data % arena.ALIGNMENT == 0
