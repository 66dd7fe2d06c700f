# cython: language_level=3
"""Run-time glue between Python and the generated kernels.

CPU feature detection, the OpenMP thread count and wait policy, the thread
governor of pyx/team.h on made-up timings (for tests), QMatrix (one
packed layer handed to a generated kernel without the GIL) and a
streaming-read probe that benchmarks use to measure the machine's memory
bandwidth.
"""
from cpython.mem cimport PyMem_Calloc, PyMem_Free
from cpython.pycapsule cimport PyCapsule_GetPointer, PyCapsule_IsValid, PyCapsule_New
from libc.stdint cimport uint16_t, uint32_t, int32_t, uint64_t

from qmatrix cimport qmatrix, qgemm_fn, qgemv_team_fn, qgemm_team_fn, qm_whole_tiles, qkernels, team
from team cimport (team_barrier, team_member, team_claims, team_claims_reset, team_claims_of, team_claim,
                   TEAM_MAX_CLAIMS, team_governor, governor_init, governor_rows, governor_threads, governor_report, team_stat_busy_ticks,
                   TEAM_PROBE_MIN_S, TEAM_PROBE_MAX_S, TEAM_PROBE_MARGIN, TEAM_PROBE_MARGIN_UP,
                   TEAM_PROBE_WARMUP, TEAM_PROBE_SHARE)

cdef extern from "runtime.h":
    int qi_cpu_has_avx2_fma()
    int qi_openmp_threads()
    int qi_have_openmp()
    int qi_display_omp_env()
    uint64_t qi_stream_read(const uint64_t *buf, size_t n_words, int nthreads, int avx2) nogil


def cpu_has_avx2_fma():
    """True when this CPU can run the AVX2+FMA kernels."""
    return bool(qi_cpu_has_avx2_fma())


def openmp_threads():
    """OpenMP's default thread count (OMP_NUM_THREADS or the core count)."""
    return qi_openmp_threads()


def have_openmp():
    return bool(qi_have_openmp())


def display_omp_env():
    """Print the OpenMP runtime's settings (OMP_WAIT_POLICY, GOMP_SPINCOUNT, ...)
    as it read them when it loaded, on stderr; False when it cannot."""
    return bool(qi_display_omp_env())


PROBE_MIN_SECONDS, PROBE_MAX_SECONDS = TEAM_PROBE_MIN_S, TEAM_PROBE_MAX_S
PROBE_MARGIN, PROBE_MARGIN_UP = TEAM_PROBE_MARGIN, TEAM_PROBE_MARGIN_UP
PROBE_WARMUP_UNITS = TEAM_PROBE_WARMUP
PROBE_SHARE = TEAM_PROBE_SHARE


cdef class Governor:
    """The thread governor of pyx/team.h (the forward pass has one for decode steps
    and one for prefill blocks), for tests to drive with made-up timings.
    threads(n) is the count for the next unit of at most n; report(threads,
    seconds, idle=0) tells it how long that unit took, started `idle` seconds
    after the previous one ended; rows(n): the units that follow have n rows.
    probe_share: TEAM_PROBE_SHARE (0: periodic probes wait for the interval alone).
    load, cores: the other processes' load (cores' worth) on the cores it may use and their
    count, assumed instead of measured; the default, an infinite load, runs every probe."""
    cdef team_governor g
    cdef double clock

    def __cinit__(self, int probe_units=2, double probe_share=TEAM_PROBE_SHARE,
                  double load=float("inf"), int cores=0):
        governor_init(&self.g, probe_units)
        self.g.share = probe_share
        self.g.fixed_load = load
        self.g.fixed_cores = cores
        self.clock = 1.0

    def rows(self, int rows):
        governor_rows(&self.g, rows)

    def threads(self, int nthreads):
        return governor_threads(&self.g, nthreads)

    def report(self, int threads, double seconds, double idle=0.0):
        governor_report(&self.g, threads, self.clock + idle, self.clock + idle + seconds)
        self.clock += idle + seconds

    @property
    def use(self):
        return self.g.use

    @property
    def probes(self):
        return self.g.probes

    @property
    def switches(self):
        return self.g.switches

    @property
    def skipped(self):
        return self.g.skipped


def claim_order(int count, int threads, order):
    """team_claim (pyx/team.h) replayed in one thread: a team of `threads` threads
    claiming the tiles of one call of `count` tiles, the claims made in `order` (a
    thread id each). Returns (thread, first, last) per claim, last = first = -1 when
    that thread found nothing left."""
    if not 1 <= threads <= TEAM_MAX_CLAIMS:
        raise ValueError(f"threads must be in [1, {TEAM_MAX_CLAIMS}]")
    cdef team_barrier *barrier = <team_barrier *>PyMem_Calloc(1, sizeof(team_barrier))
    cdef team_member *members = <team_member *>PyMem_Calloc(threads, sizeof(team_member))
    cdef team_claims *claims = <team_claims *>PyMem_Calloc(threads, sizeof(team_claims))
    cdef int first, last, t
    out = []
    try:
        if not barrier or not members or not claims:
            raise MemoryError()
        team_claims_reset(barrier, threads)
        for t in range(threads):
            members[t].barrier = barrier
            members[t].thread = t
            members[t].threads = threads
            claims[t] = team_claims_of(&members[t], count, 1)
        for t in order:
            if not 0 <= t < threads:
                raise ValueError(f"thread {t} is not in a team of {threads}")
            if team_claim(&claims[t], &first, &last):
                out.append((t, first, last))
            else:
                out.append((t, -1, -1))
    finally:
        PyMem_Free(barrier)
        PyMem_Free(members)
        PyMem_Free(claims)
    return out


def stat_busy_ticks(bytes line):
    """(cpu, busy clock ticks) of a /proc/stat "cpu" (cpu -1: all CPUs) or "cpuN" line as
    the governor counts them (all but idle and iowait), or None when the line is not one."""
    cdef int cpu = -1
    ticks = team_stat_busy_ticks(line, &cpu)
    return None if ticks < 0 else (cpu, ticks)


def stream_read(const uint64_t[::1] buf, int nthreads, bint avx2):
    """Read the whole buffer once (its length a multiple of 16 words, 32-byte aligned)."""
    cdef size_t n = buf.shape[0]
    cdef uint64_t total
    if n % 16:
        raise ValueError("stream_read needs a multiple of 16 words")
    with nogil:
        total = qi_stream_read(&buf[0], n, nthreads, avx2)
    return total


cdef class QMatrix:
    """One packed layer as the kernels see it (see pyx/qmatrix.h).

    Holds references to the numpy arrays whose memory the C struct points
    into, so they live as long as the struct does. The run-time kernel
    parameters start at the smallest valid values; the owner sets its own
    with configure(), and may change them later (the forward pass reads the
    struct on every call, so a change reaches it too).
    """
    cdef qmatrix m
    cdef const qkernels *kernels
    cdef object arrays

    def __cinit__(self, kernels_capsule, int bits, int in_features, int out_features,
                  int group_size, int tu, int segment_rows,
                  const uint32_t[::1] words, scales, zeros, perm=None, bint half_scales=False):
        # scales, zeros: float32 buffers, or (half_scales) float16 ones viewed as uint16
        cdef const int32_t[::1] perm_view
        cdef const float[::1] scales32, zeros32
        cdef const uint16_t[::1] scales16, zeros16
        cdef size_t n_scales, n_zeros
        if not PyCapsule_IsValid(kernels_capsule, b"qinfer.qkernels"):
            raise TypeError("not a qinfer kernel table")
        self.kernels = <const qkernels *>PyCapsule_GetPointer(kernels_capsule, b"qinfer.qkernels")
        if self.kernels.bits != bits:
            raise ValueError("kernel table is for another bitwidth")
        self.m.bits = bits
        self.m.in_features = in_features
        self.m.out_features = out_features
        self.m.group_size = group_size
        self.m.n_groups = in_features // group_size
        self.m.tu = tu
        self.m.n_tiles = (out_features + tu - 1) // tu
        self.m.segment_rows = segment_rows
        expected_words = <size_t>self.m.n_tiles * tu * in_features * bits // 32
        expected_scales = <size_t>self.m.n_tiles * tu * self.m.n_groups
        self.m.half_scales = half_scales
        if half_scales:
            scales16, zeros16 = scales, zeros
            n_scales, n_zeros = scales16.shape[0], zeros16.shape[0]
        else:
            scales32, zeros32 = scales, zeros
            n_scales, n_zeros = scales32.shape[0], zeros32.shape[0]
        # zeros: one row per group, or one for all groups (the same zero in every group of a column)
        if words.shape[0] != expected_words or n_scales != expected_scales or \
                n_zeros not in (expected_scales, <size_t>self.m.n_tiles * tu):
            raise ValueError("packed arrays do not match the layer's shape")
        self.m.zero_groups = self.m.n_groups if n_zeros == expected_scales else 1
        self._check_row_block(segment_rows)
        self.configure(1, segment_rows, 1, 1)
        self.m.words = &words[0]
        if half_scales:
            self.m.scales = &scales16[0]
            self.m.zeros = &zeros16[0]
        else:
            self.m.scales = &scales32[0]
            self.m.zeros = &zeros32[0]
        self.m.perm = NULL
        if perm is not None:
            perm_view = perm
            if perm_view.shape[0] != in_features:
                raise ValueError("perm must have in_features entries")
            self.m.perm = &perm_view[0]
        self.arrays = (words, scales, zeros, perm)

    def _check_row_block(self, int rows):
        if rows <= 0 or self.m.in_features % rows or rows % self.kernels.unit_values:
            raise ValueError(f"a row block of {rows} must divide in_features={self.m.in_features} "
                             f"and hold whole units of {self.kernels.unit_values} values")

    def configure(self, int gemv_tiles, int mb, int rows_per_chunk, int tiles_per_block):
        """Set the run-time kernel parameters (not while a matmul on this layer runs).

        gemv_tiles: qgemv's tiles side by side (1..max_gemv_tiles); mb: qgemm's
        row block; rows_per_chunk: qgemm's activation rows per pass;
        tiles_per_block: qgemm's column block, in tiles.
        """
        if not 1 <= gemv_tiles <= self.kernels.max_gemv_tiles:
            raise ValueError(f"gemv_tiles must lie in [1, {self.kernels.max_gemv_tiles}], got {gemv_tiles}")
        self._check_row_block(mb)
        if rows_per_chunk < 1 or tiles_per_block < 1:
            raise ValueError("rows_per_chunk and tiles_per_block must be >= 1")
        self.m.gemv_tiles = gemv_tiles
        self.m.mb = mb
        self.m.rows_per_chunk = rows_per_chunk
        self.m.tiles_per_block = tiles_per_block

    def configuration(self):
        """The run-time kernel parameters, as configure() takes them."""
        return dict(gemv_tiles=self.m.gemv_tiles, mb=self.m.mb, rows_per_chunk=self.m.rows_per_chunk,
                    tiles_per_block=self.m.tiles_per_block)

    @property
    def max_gemv_tiles(self):
        return self.kernels.max_gemv_tiles

    def has_avx2(self):
        return self.kernels.avx2 != NULL

    def matrix_capsule(self):
        """The C struct, for compiled callers (the forward pass); valid while self lives."""
        return PyCapsule_New(<void *>&self.m, b"qinfer.qmatrix", NULL)

    def kernel_capsule(self, bint avx2):
        """The qgemm function of one path, for compiled callers."""
        cdef qgemm_fn fn = self.kernels.avx2 if avx2 else self.kernels.scalar
        if fn == NULL:
            raise RuntimeError("this build has no AVX2 kernels")
        return PyCapsule_New(<void *>fn, b"qinfer.qgemm_fn", NULL)

    def matmul(self, const float[:, ::1] x, float[:, ::1] out, int nthreads, bint avx2, int repeats=1):
        """out[n, out_features] = x[n, in_features] @ W^T, computed `repeats` times
        without returning to Python in between (the tuner times short calls so)."""
        cdef qgemm_fn fn = self.kernels.avx2 if avx2 else self.kernels.scalar
        cdef int n = x.shape[0]
        cdef int rc = 0
        cdef int i
        if fn == NULL:
            raise RuntimeError("this build has no AVX2 kernels")
        if x.shape[1] != self.m.in_features or out.shape[0] != n or out.shape[1] != self.m.out_features:
            raise ValueError("matmul: shapes do not match the layer")
        if n == 0:
            return
        with nogil:
            for i in range(repeats):
                rc = rc | fn(&self.m, &x[0, 0], n, &out[0, 0], nthreads)
        if rc != 0:
            raise MemoryError("out of memory in the quantized matmul")

    # ------------------------------------------ int8 activations (decode)
    def has_int8(self, bint avx2=False):
        """True when this bitwidth has the int8-activation kernel on that path (the
        scalar path: every bitwidth; the AVX2 path: 2, 4, 8 bits, and 3, 5, 6 bits
        on AVX-512 VBMI CPUs)."""
        return (self.kernels.avx2_i8 if avx2 else self.kernels.scalar_i8) != NULL

    def int8_kernel_capsule(self, bint avx2):
        """The int8-activation qgemv of one path for compiled callers, or None."""
        cdef qgemm_fn fn = self.kernels.avx2_i8 if avx2 else self.kernels.scalar_i8
        if fn == NULL:
            return None
        return PyCapsule_New(<void *>fn, b"qinfer.qgemm_fn", NULL)

    def team_capsule(self, bint avx2):
        """The team twin of kernel_capsule for one row (qgemv_team_fn, qmatrix.h),
        for the forward pass's decode team, or None: the scalar path, or a layer
        whose last tile is padded."""
        if not avx2 or self.kernels.avx2_team == NULL or not qm_whole_tiles(&self.m):
            return None
        return PyCapsule_New(<void *>self.kernels.avx2_team, b"qinfer.qgemv_team_fn", NULL)

    def int8_team_capsule(self, bint avx2):
        """The team twin of int8_kernel_capsule (qgemv_team_fn, qmatrix.h) for the
        forward pass's decode team, or None: the scalar path, a bitwidth
        without int8 kernels, or a layer whose last tile is padded."""
        if not avx2 or self.kernels.avx2_i8_team == NULL or not qm_whole_tiles(&self.m):
            return None
        return PyCapsule_New(<void *>self.kernels.avx2_i8_team, b"qinfer.qgemv_team_fn", NULL)

    def int8_rows_team_capsule(self, bint avx2):
        """The team twin of int8_kernel_capsule for several rows (qgemm_team_fn,
        qmatrix.h) for the forward pass's batched steps, or None (as int8_team_capsule)."""
        if not avx2 or self.kernels.avx2_i8_rows_team == NULL or not qm_whole_tiles(&self.m):
            return None
        return PyCapsule_New(<void *>self.kernels.avx2_i8_rows_team, b"qinfer.qgemm_team_fn", NULL)

    def matmul_int8(self, const float[:, ::1] x, float[:, ::1] out, int nthreads, bint avx2):
        """out = x @ W^T with each row of x rounded to int8 per block of 32 inputs."""
        cdef qgemm_fn fn = self.kernels.avx2_i8 if avx2 else self.kernels.scalar_i8
        cdef int n = x.shape[0]
        cdef int rc
        if fn == NULL:
            raise RuntimeError(f"no int8-activation kernel for {self.m.bits}-bit weights")
        if x.shape[1] != self.m.in_features or out.shape[0] != n or out.shape[1] != self.m.out_features:
            raise ValueError("matmul_int8: shapes do not match the layer")
        if n == 0:
            return
        with nogil:
            rc = fn(&self.m, &x[0, 0], n, &out[0, 0], nthreads)
        if rc != 0:
            raise MemoryError("out of memory in the quantized matmul")


def nibble_stream(const unsigned char[:, :, :] qs, unsigned char[:, :, ::1] out):
    """llama.cpp's 4-bit bytes -> qinfer's 4-bit stream (readers/ggml_quants.py).

    qs[r][c][0..n): the low nibbles are elements 0..n-1 of a run of 2n, the high
    nibbles elements n..2n-1 (Q4_0/Q4_1: n = 16 a block; Q4_K: n = 32 a quarter of
    one). out[r][c][m] = element 2m | element 2m + 1 << 4, as packing.pack_rows
    makes it. In C because numpy's strided byte slices made this a third of the
    load time of a 7B Q4_0 model."""
    cdef Py_ssize_t rows = qs.shape[0], runs = qs.shape[1], n = qs.shape[2], half = n // 2
    cdef Py_ssize_t r, c, m
    cdef unsigned char a, b
    if out.shape[0] != rows or out.shape[1] != runs or out.shape[2] != n or n % 2:
        raise ValueError("nibble_stream: out must have qs's shape, with an even last dimension")
    with nogil:
        for r in range(rows):
            for c in range(runs):
                for m in range(half):
                    a = qs[r, c, 2 * m]
                    b = qs[r, c, 2 * m + 1]
                    out[r, c, m] = (a & 0x0F) | ((b & 0x0F) << 4)
                    out[r, c, half + m] = (a >> 4) | (b & 0xF0)


cdef extern from "spqr.h":
    ctypedef struct spqr_matrix:
        qmatrix dense
        int stat_bits
        int record_halves
        const uint16_t *records
        const int32_t *outlier_rows
        const uint16_t *outlier_cols
        const uint16_t *outlier_vals
        qgemm_fn gemm[2]
        qgemm_fn gemm_i8[2]
    int spqr_gemm_scalar(const qmatrix *m, const float *x, int n, float *y, int nthreads) nogil
    int spqr_gemm_avx2(const qmatrix *m, const float *x, int n, float *y, int nthreads) nogil
    int spqr_gemm_i8_scalar(const qmatrix *m, const float *x, int n, float *y, int nthreads) nogil
    int spqr_gemm_i8_avx2(const qmatrix *m, const float *x, int n, float *y, int nthreads) nogil
    int spqr_team(const qmatrix *m, const float *x, float *y, const team *tm) nogil
    int spqr_team_i8(const qmatrix *m, const float *x, float *y, const team *tm) nogil
    int spqr_rows_team_i8(const qmatrix *m, const float *x, int n, float *y, const team *tm) nogil


cdef class SpqrMatrix:
    """One SpQR layer as the kernels see it (pyx/spqr.h): the codes in tiles, the
    statistics as records, the outliers as a row table. Its entry points have the
    dense QMatrix's signatures and run that bitwidth's own kernels, so the forward
    pass takes it like any other layer; the same methods as QMatrix."""
    cdef spqr_matrix s
    cdef const qkernels *kernels
    cdef object arrays

    def __cinit__(self, kernels_capsule, int bits, int in_features, int out_features, int group_size, int tu,
                  int segment_rows, const uint32_t[::1] words, int stat_bits, const uint16_t[::1] records,
                  const int32_t[::1] outlier_rows, const uint16_t[::1] outlier_cols,
                  const uint16_t[::1] outlier_vals, perm=None):
        cdef const int32_t[::1] perm_view
        cdef qmatrix *m = &self.s.dense
        if not PyCapsule_IsValid(kernels_capsule, b"qinfer.qkernels"):
            raise TypeError("not a qinfer kernel table")
        self.kernels = <const qkernels *>PyCapsule_GetPointer(kernels_capsule, b"qinfer.qkernels")
        if self.kernels.bits != bits:
            raise ValueError("kernel table is for another bitwidth")
        if group_size <= 0 or in_features % group_size or in_features == group_size:
            raise ValueError("SpQR groups must divide in_features, more than one of them")
        m.bits = bits
        m.in_features = in_features
        m.out_features = out_features
        m.group_size = group_size
        m.n_groups = in_features // group_size
        m.tu = tu
        m.n_tiles = (out_features + tu - 1) // tu
        m.segment_rows = segment_rows
        m.half_scales = 0
        m.zero_groups = m.n_groups
        m.scales = NULL
        m.zeros = NULL
        n_runs = (out_features + 15) // 16
        if tu % 16 and 16 % tu:
            raise ValueError("the tile width must be a multiple or a divisor of 16")
        if words.shape[0] != <size_t>m.n_tiles * tu * in_features * bits // 32 or \
                records.shape[0] != <size_t>n_runs * m.n_groups * (stat_bits + bits + 2) or \
                outlier_rows.shape[0] != out_features + 1 or outlier_cols.shape[0] != outlier_vals.shape[0]:
            raise ValueError("SpQR arrays do not match the layer's shape")
        self.configure(1, segment_rows, 1, 1)
        m.words = &words[0]
        m.perm = NULL
        if perm is not None:
            perm_view = perm
            if perm_view.shape[0] != in_features:
                raise ValueError("perm must have in_features entries")
            m.perm = &perm_view[0]
        self.s.stat_bits = stat_bits
        self.s.record_halves = stat_bits + bits + 2
        self.s.records = &records[0]
        self.s.outlier_rows = &outlier_rows[0]
        self.s.outlier_cols = &outlier_cols[0] if outlier_cols.shape[0] else NULL
        self.s.outlier_vals = &outlier_vals[0] if outlier_vals.shape[0] else NULL
        self.s.gemm[0] = self.kernels.scalar
        self.s.gemm[1] = self.kernels.avx2
        self.s.gemm_i8[0] = self.kernels.scalar_i8
        self.s.gemm_i8[1] = self.kernels.avx2_i8
        self.arrays = (words, records, outlier_rows, outlier_cols, outlier_vals, perm)

    def configure(self, int gemv_tiles, int mb, int rows_per_chunk, int tiles_per_block):
        """QMatrix.configure: the dense kernels' run-time parameters."""
        cdef qmatrix *m = &self.s.dense
        if not 1 <= gemv_tiles <= self.kernels.max_gemv_tiles:
            raise ValueError(f"gemv_tiles must lie in [1, {self.kernels.max_gemv_tiles}], got {gemv_tiles}")
        if mb <= 0 or m.in_features % mb or mb % self.kernels.unit_values:
            raise ValueError(f"a row block of {mb} must divide in_features={m.in_features} "
                             f"and hold whole units of {self.kernels.unit_values} values")
        if rows_per_chunk < 1 or tiles_per_block < 1:
            raise ValueError("rows_per_chunk and tiles_per_block must be >= 1")
        m.gemv_tiles = gemv_tiles
        m.mb = mb
        m.rows_per_chunk = rows_per_chunk
        m.tiles_per_block = tiles_per_block

    def configuration(self):
        cdef qmatrix *m = &self.s.dense
        return dict(gemv_tiles=m.gemv_tiles, mb=m.mb, rows_per_chunk=m.rows_per_chunk,
                    tiles_per_block=m.tiles_per_block)

    @property
    def max_gemv_tiles(self):
        return self.kernels.max_gemv_tiles

    def has_avx2(self):
        return self.kernels.avx2 != NULL

    def matrix_capsule(self):
        """The dense member of the C struct, which the entry points below take."""
        return PyCapsule_New(<void *>&self.s.dense, b"qinfer.qmatrix", NULL)

    def kernel_capsule(self, bint avx2):
        if avx2 and self.kernels.avx2 == NULL:
            raise RuntimeError("this build has no AVX2 kernels")
        return PyCapsule_New(<void *>(spqr_gemm_avx2 if avx2 else spqr_gemm_scalar), b"qinfer.qgemm_fn", NULL)

    def has_int8(self, bint avx2=False):
        return (self.kernels.avx2_i8 if avx2 else self.kernels.scalar_i8) != NULL

    def int8_kernel_capsule(self, bint avx2):
        if not self.has_int8(avx2):
            return None
        return PyCapsule_New(<void *>(spqr_gemm_i8_avx2 if avx2 else spqr_gemm_i8_scalar), b"qinfer.qgemm_fn",
                             NULL)

    def team_capsule(self, bint avx2):
        if not avx2 or self.kernels.avx2_team == NULL or not qm_whole_tiles(&self.s.dense):
            return None
        return PyCapsule_New(<void *>spqr_team, b"qinfer.qgemv_team_fn", NULL)

    def int8_team_capsule(self, bint avx2):
        if not avx2 or self.kernels.avx2_i8_team == NULL or not qm_whole_tiles(&self.s.dense):
            return None
        return PyCapsule_New(<void *>spqr_team_i8, b"qinfer.qgemv_team_fn", NULL)

    def int8_rows_team_capsule(self, bint avx2):
        if not avx2 or self.kernels.avx2_i8_rows_team == NULL or not qm_whole_tiles(&self.s.dense):
            return None
        return PyCapsule_New(<void *>spqr_rows_team_i8, b"qinfer.qgemm_team_fn", NULL)

    def _run(self, const float[:, ::1] x, float[:, ::1] out, int nthreads, bint avx2, bint int8):
        cdef qgemm_fn fn
        cdef int n = x.shape[0]
        cdef int rc
        if int8:
            fn = spqr_gemm_i8_avx2 if avx2 else spqr_gemm_i8_scalar
            if not self.has_int8(avx2):
                raise RuntimeError(f"no int8-activation kernel for {self.s.dense.bits}-bit weights")
        else:
            fn = spqr_gemm_avx2 if avx2 else spqr_gemm_scalar
            if avx2 and self.kernels.avx2 == NULL:
                raise RuntimeError("this build has no AVX2 kernels")
        if x.shape[1] != self.s.dense.in_features or out.shape[0] != n or out.shape[1] != self.s.dense.out_features:
            raise ValueError("matmul: shapes do not match the layer")
        if n == 0:
            return
        with nogil:
            rc = fn(&self.s.dense, &x[0, 0], n, &out[0, 0], nthreads)
        if rc != 0:
            raise MemoryError("out of memory in the SpQR matmul")

    def matmul(self, const float[:, ::1] x, float[:, ::1] out, int nthreads, bint avx2):
        """out[n, out_features] = x[n, in_features] @ W^T (dense part + outliers)."""
        self._run(x, out, nthreads, avx2, False)

    def matmul_int8(self, const float[:, ::1] x, float[:, ::1] out, int nthreads, bint avx2):
        """The same with each row of x rounded to int8 per block of 32 inputs (the outliers
        take x as it is)."""
        self._run(x, out, nthreads, avx2, True)
