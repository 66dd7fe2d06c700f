"""Memory for a model's packed weights: large anonymous mappings on huge pages.

Every decode step reads all of a model's weights, a few hundred kilobytes per
layer matrix (SmolLM2) to tens of megabytes (a 7B). On 4 KiB pages that read
walks the page tables once per 4 KiB, more pages than the TLB holds; on 2 MiB
pages (transparent huge pages, which Linux gives an anonymous mapping asked
for with madvise(MADV_HUGEPAGE) where the system's setting is "madvise" or
"always") it does not. Measured on the 2-core Zen 4 KVM guest, SmolLM2 Q4_1:
decode 1 thread +19%, 2 threads +5% (benchmarks/arena.py). numpy asks for
huge pages too, but only for its own allocations of 4 MiB and more, and
glibc hands most of a model's arrays out of the heap, where none are used.

So the arrays a layer keeps for good (QuantizedLinear's tiles) are cut one
after another out of chunks of CHUNK bytes, each mapped on a 2 MiB boundary.
A chunk is unmapped when no array cut from it is left. Only pages written are
resident, so the part of a chunk no array reached costs address space, not
memory; an array that does not fit in what is left of the current chunk gets
a new chunk, and the chunk with more room left takes the next array. One
exception: the huge page an array ends in is resident whole, up to 2 MiB
past the array. So a chunk that takes no more arrays, and the current one
whenever a model has loaded (trim()), gives back the pages past its last
array (madvise MADV_DONTNEED, which splits that huge page): about 1 MiB a
chunk, 60 MiB of a 7B model's 3.6 GB.

QINFER_HUGEPAGES=0 keeps the chunks but does not ask for huge pages (for A/B
measurements). Where mmap cannot map anonymous memory (Windows), chunks are
numpy arrays.
"""
import mmap
import os
import threading

import numpy as np

HUGE_PAGE = 2 << 20       # bytes: x86-64's and most arm64 kernels' transparent huge page
CHUNK = 64 << 20          # bytes mapped at a time (a multiple of HUGE_PAGE)
ALIGNMENT = 64            # bytes: each array starts on a cache line
HUGEPAGES_ENV = "QINFER_HUGEPAGES"


def huge_pages_wanted():
    """Whether chunks ask for transparent huge pages (QINFER_HUGEPAGES, default 1)."""
    return os.environ.get(HUGEPAGES_ENV, "1").strip() != "0"


class _Chunk:
    """A chunk: `memory` (uint8, on a HUGE_PAGE boundary) at byte `offset` of its mapping
    `mapping` (an mmap, or None where chunks are numpy arrays), `used` bytes of it cut."""

    def __init__(self, nbytes):
        flags = getattr(mmap, "MAP_PRIVATE", None), getattr(mmap, "MAP_ANONYMOUS", None)
        if None in flags:
            self.mapping = None
            buf = np.empty(nbytes + HUGE_PAGE, dtype=np.uint8)
        else:
            # one huge page more, to start on a boundary; the pages before it are never touched
            self.mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=flags[0] | flags[1])
            advice = getattr(mmap, "MADV_HUGEPAGE", None)
            if advice is not None and huge_pages_wanted():
                try:
                    self.mapping.madvise(advice)
                except OSError:      # a kernel built without transparent huge pages
                    pass
            buf = np.frombuffer(self.mapping, dtype=np.uint8)
        self.offset = -buf.ctypes.data % HUGE_PAGE
        self.memory = buf[self.offset:self.offset + nbytes]
        self.used = 0

    def room(self):
        return len(self.memory) - self.used

    def trim(self):
        """Give back the pages past the last array (the rest of the huge page it ends in)."""
        advice = getattr(mmap, "MADV_DONTNEED", None)
        if self.mapping is None or advice is None:
            return
        start = -(-self.used // mmap.PAGESIZE) * mmap.PAGESIZE
        if start < len(self.memory):
            try:
                self.mapping.madvise(advice, self.offset + start, len(self.memory) - start)
            except (OSError, ValueError):   # the memory stays resident: no harm
                pass


class Arena:
    """Cuts C-order arrays out of shared huge-page chunks (see the module's doc)."""

    def __init__(self, chunk=CHUNK):
        self.chunk = chunk
        self._current = None     # the _Chunk the next array is cut from, if it fits
        self._lock = threading.Lock()

    def empty(self, shape, dtype):
        """An uninitialized C-order array of `shape` starting on a 64-byte boundary."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        need = -(-max(nbytes, 1) // ALIGNMENT) * ALIGNMENT
        with self._lock:
            chunk = self._current
            if chunk is None or need > chunk.room():
                chunk = _Chunk(-(-max(need, self.chunk) // HUGE_PAGE) * HUGE_PAGE)
                if self._current is None or chunk.room() - need >= self._current.room():
                    if self._current is not None:
                        self._current.trim()          # it takes no more arrays
                    self._current = chunk
                else:                                 # the old chunk keeps the next arrays
                    chunk.used = need
                    chunk.trim()
                    return chunk.memory[:nbytes].view(dtype).reshape(shape)
            used = chunk.used
            chunk.used += need
        return chunk.memory[used:used + nbytes].view(dtype).reshape(shape)

    def trim(self):
        """Give back the resident pages past the current chunk's last array (a model has
        loaded; arrays cut later touch them again)."""
        with self._lock:
            if self._current is not None:
                self._current.trim()


weights = Arena()
