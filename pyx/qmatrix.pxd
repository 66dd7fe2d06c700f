# qmatrix.h for Cython: the run-time layer struct and the kernel table, cimported
# by _runtime.pyx, _forward.pyx and the generated kernel modules (qgemm.pyx.tp).
from libc.stdint cimport uint32_t, int32_t

cdef extern from "qmatrix.h":
    ctypedef struct qmatrix:
        int bits
        int in_features
        int out_features
        int group_size
        int n_groups
        int tu
        int n_tiles
        int segment_rows
        int gemv_tiles
        int mb
        int rows_per_chunk
        int tiles_per_block
        int half_scales
        const uint32_t *words
        const void *scales
        const void *zeros
        int zero_groups
        const int32_t *perm
    ctypedef int (*qgemm_fn)(const qmatrix *m, const float *x, int n, float *y, int nthreads) noexcept nogil
    ctypedef struct team:
        pass
    ctypedef int (*qgemv_team_fn)(const qmatrix *m, const float *x, float *y, const team *tm) noexcept nogil
    ctypedef int (*qgemm_team_fn)(const qmatrix *m, const float *x, int n, float *y, const team *tm) noexcept nogil
    int qm_whole_tiles(const qmatrix *m) nogil
    void qm_init_head(qmatrix *m, int bits, int in_features, int out_features, int group, int tu) nogil
    ctypedef struct qkernels:
        int bits
        int unit_words
        int unit_values
        int max_gemv_tiles
        qgemm_fn avx2
        qgemm_fn scalar
        qgemm_fn avx2_i8
        qgemm_fn scalar_i8
        qgemv_team_fn avx2_i8_team
        qgemm_team_fn avx2_i8_rows_team
        qgemv_team_fn avx2_team
