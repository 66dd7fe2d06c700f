# cython: language_level=3
"""LutMatrix: one layer for the lookup-table kernels of pyx/lut.h, with the
QMatrix entry points the forward pass takes (capsules of qmatrix.h's types)."""
from cpython.pycapsule cimport PyCapsule_New
from cython.parallel cimport prange
from libc.stdint cimport uint8_t, uint16_t, uint32_t, int32_t

from qmatrix cimport qmatrix, qm_init_head, qgemm_fn, qgemv_team_fn, qgemm_team_fn, team

cdef extern from "lut.h" nogil:
    int LUT_TU, LUT_BLOCK, LUT_SEGMENT, LUT_MAX_BITS, LUT_UNIFORM, LUT_BINARY
    ctypedef struct lut_matrix:
        qmatrix head
        int kind
        int n_mults
        int seg_len
        int avx512
        const uint8_t *planes
        const uint16_t *mults
        const float *offsets
    int lut_cpu_has_avx512()
    void lut_pack_words(const uint32_t *words, int bits, int in_features, int out_features,
                        const int32_t *perm, uint8_t *planes, int first, int last)
    int lut_gemm_fast(const qmatrix *m, const float *x, int n, float *y, int nthreads)
    int lut_gemm_portable(const qmatrix *m, const float *x, int n, float *y, int nthreads)
    int lut_team(const qmatrix *m, const float *x, float *y, const team *tm)
    int lut_rows_team(const qmatrix *m, const float *x, int n, float *y, const team *tm)

TILE, BLOCK, SEGMENT, MAX_BITS = LUT_TU, LUT_BLOCK, LUT_SEGMENT, LUT_MAX_BITS
KINDS = {"uniform": LUT_UNIFORM, "binary": LUT_BINARY}


def cpu_has_avx512():
    """True when this CPU runs the AVX-512 lookup loops (VBMI's vpermb, VNNI's vpdpbusd)."""
    return bool(lut_cpu_has_avx512())


def segment_length(int group):
    """Inputs per table step: the group, or its largest divisor of 16 .. 128 in powers of two."""
    cdef int seg = LUT_SEGMENT
    while seg > LUT_BLOCK and group % seg:
        seg //= 2
    if group % seg:
        raise ValueError(f"a group of {group} inputs is not a multiple of {LUT_BLOCK}")
    return seg


def pack_words(const uint32_t[:, ::1] words, int bits, int in_features, uint8_t[::1] planes, perm=None,
               int threads=1):
    """GPTQ words [in * bits / 32, out] -> `planes` (pyx/lut.h's layout, filled in place);
    kernel input k is the stored row perm[k] (None: k)."""
    cdef const int32_t[::1] perm_view
    cdef const int32_t *p = NULL
    cdef int out_features = words.shape[1], n_tiles = (out_features + LUT_TU - 1) // LUT_TU, t
    if words.shape[0] * 32 != in_features * bits or in_features % LUT_BLOCK or \
            planes.shape[0] != <size_t>n_tiles * in_features * bits * LUT_TU // 8:
        raise ValueError("words, bits, in_features and planes do not match")
    if perm is not None:
        perm_view = perm
        if perm_view.shape[0] != in_features:
            raise ValueError("perm must have in_features entries")
        p = &perm_view[0]
    with nogil:
        for t in prange(n_tiles, num_threads=max(1, threads), schedule="static"):
            lut_pack_words(&words[0, 0], bits, in_features, out_features, p, &planes[0], t, t + 1)


cdef class LutMatrix:
    """The arrays of pyx/lut.h's layout (kept alive here) and its entry points."""
    cdef lut_matrix L
    cdef object arrays

    def __cinit__(self, str kind, int bits, int in_features, int out_features, int group,
                  const uint8_t[::1] planes, const uint16_t[::1] mults, const float[::1] offsets, perm=None):
        cdef const int32_t[::1] perm_view
        cdef qmatrix *m = &self.L.head
        if kind not in KINDS:
            raise ValueError(f"unknown lookup-table kind {kind!r}")
        if not 1 <= bits <= LUT_MAX_BITS:
            raise ValueError(f"lookup-table layers take 1 to {LUT_MAX_BITS} bits, got {bits}")
        if group <= 0 or in_features % group or group % LUT_BLOCK:
            raise ValueError(f"groups of {group} inputs must divide in_features={in_features} "
                             f"and be a multiple of {LUT_BLOCK}")
        qm_init_head(m, bits, in_features, out_features, group, LUT_TU)
        self.L.kind = KINDS[kind]
        self.L.n_mults = bits if kind == "binary" else 1
        self.L.seg_len = segment_length(group)
        self.L.avx512 = lut_cpu_has_avx512()
        if planes.shape[0] != <size_t>m.n_tiles * in_features * bits * LUT_TU // 8 or \
                mults.shape[0] != <size_t>m.n_tiles * m.n_groups * self.L.n_mults * LUT_TU or \
                offsets.shape[0] != <size_t>m.n_tiles * m.n_groups * LUT_TU:
            raise ValueError("lookup-table arrays do not match the layer's shape")
        if perm is not None:
            perm_view = perm
            if perm_view.shape[0] != in_features:
                raise ValueError("perm must have in_features entries")
            m.perm = &perm_view[0]
        self.L.planes = &planes[0]
        self.L.mults = &mults[0]
        self.L.offsets = &offsets[0]
        self.arrays = (planes, mults, offsets, perm)

    def matrix_capsule(self):
        """The head member of the C struct, which the entry points below take."""
        return PyCapsule_New(<void *>&self.L.head, b"qinfer.qmatrix", NULL)

    def kernel_capsule(self, bint fast):
        return PyCapsule_New(<void *>(lut_gemm_fast if fast else lut_gemm_portable), b"qinfer.qgemm_fn", NULL)

    def team_capsule(self, bint fast):
        """The decode team's entry point (the fast loops), or None on the portable path."""
        if not fast:
            return None
        return PyCapsule_New(<void *>lut_team, b"qinfer.qgemv_team_fn", NULL)

    def rows_team_capsule(self, bint fast):
        if not fast:
            return None
        return PyCapsule_New(<void *>lut_rows_team, b"qinfer.qgemm_team_fn", NULL)

    def has_int8(self, bint avx2=False):
        return False

    def matmul(self, const float[:, ::1] x, float[:, ::1] out, int nthreads, bint fast):
        cdef qgemm_fn fn = lut_gemm_fast if fast else lut_gemm_portable
        cdef int n = x.shape[0]
        cdef int rc
        if x.shape[1] != self.L.head.in_features or out.shape[0] != n or out.shape[1] != self.L.head.out_features:
            raise ValueError("matmul: shapes do not match the layer")
        if n == 0:
            return
        with nogil:
            rc = fn(&self.L.head, &x[0, 0], n, &out[0, 0], nthreads)
        if rc != 0:
            raise MemoryError("out of memory in the lookup-table matmul")

    def time_calls(self, const float[:, ::1] x, float[:, ::1] out, int nthreads, bint fast, int repeats):
        """repeats calls back to back without the GIL (benchmarks)."""
        cdef qgemm_fn fn = lut_gemm_fast if fast else lut_gemm_portable
        cdef int rc = 0, i
        with nogil:
            for i in range(repeats):
                rc = rc | fn(&self.L.head, &x[0, 0], x.shape[0], &out[0, 0], nthreads)
        if rc != 0:
            raise MemoryError("out of memory in the lookup-table matmul")
