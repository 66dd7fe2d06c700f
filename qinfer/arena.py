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
a new chunk, and the chunk with more room left takes the next array.

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


def _map(nbytes):
    """A writable uint8 array of nbytes starting on a HUGE_PAGE boundary."""
    flags = getattr(mmap, "MAP_PRIVATE", None), getattr(mmap, "MAP_ANONYMOUS", None)
    if None in flags:
        buf = np.empty(nbytes + HUGE_PAGE, dtype=np.uint8)
    else:
        # one huge page more, to start on a boundary; the pages before it are never touched
        m = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=flags[0] | flags[1])
        advice = getattr(mmap, "MADV_HUGEPAGE", None)
        if advice is not None and huge_pages_wanted():
            try:
                m.madvise(advice)
            except OSError:      # a kernel built without transparent huge pages
                pass
        buf = np.frombuffer(m, dtype=np.uint8)
    start = -buf.ctypes.data % HUGE_PAGE
    return buf[start:start + nbytes]


class Arena:
    """Cuts C-order arrays out of shared huge-page chunks (see the module's doc)."""

    def __init__(self, chunk=CHUNK):
        self.chunk = chunk
        self._current = None     # (uint8 array, bytes used)
        self._lock = threading.Lock()

    def empty(self, shape, dtype):
        """An uninitialized C-order array of `shape` starting on a 64-byte boundary."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        need = -(-max(nbytes, 1) // ALIGNMENT) * ALIGNMENT
        with self._lock:
            if self._current is not None and self._current[1] + need <= len(self._current[0]):
                memory, used = self._current
                self._current = (memory, used + need)
            else:
                memory, used = _map(-(-max(need, self.chunk) // HUGE_PAGE) * HUGE_PAGE), 0
                if self._current is None or len(memory) - need >= len(self._current[0]) - self._current[1]:
                    self._current = (memory, need)    # else the old chunk keeps the next arrays
        return memory[used:used + nbytes].view(dtype).reshape(shape)


weights = Arena()
