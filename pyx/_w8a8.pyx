# cython: language_level=3
"""Int8Matrix: one layer for the int8 x int8 kernels of pyx/w8a8.h, with the
QMatrix entry points the forward pass takes (capsules of qmatrix.h's types)."""
import numpy as np

from cpython.pycapsule cimport PyCapsule_New
from cython.parallel cimport prange
from libc.stdint cimport int8_t, uint8_t, int32_t

from qmatrix cimport qmatrix, qm_init_head, qgemm_fn, qgemv_team_fn, qgemm_team_fn, team

cdef extern from "w8a8.h" nogil:
    int W8A8_TU, W8A8_STEP, W8A8_MAX_GROUP, W8A8_PORTABLE, W8A8_AVX2, W8A8_AVX512VNNI
    ctypedef struct w8a8_matrix:
        qmatrix head
        int isa
        int amx
        const int8_t *codes
        const float *scales
        const int32_t *sums
        int lr_rank
        const float *lr_a
        const float *lr_b
    int w8a8_cpu_isa()
    int W8A8_AMX_OFF
    int w8a8_amx_available()
    void w8a8_pack_rows(const int8_t *src, const float *src_scales, int bits, int in_features, int group_size,
                        int first, int last, uint8_t *codes, float *scales, int32_t *sums)
    int w8a8_gemm(const qmatrix *m, const float *x, int n, float *y, int nthreads)
    int w8a8_team(const qmatrix *m, const float *x, float *y, const team *tm)
    int w8a8_rows_team(const qmatrix *m, const float *x, int n, float *y, const team *tm)

TILE, STEP, MAX_GROUP = W8A8_TU, W8A8_STEP, W8A8_MAX_GROUP
# the loops' instruction sets, slowest first (pyx/w8a8.h's enum)
ISAS = ("portable", "avx2", "avx512vnni")


def cpu_isas():
    """The instruction sets this CPU runs the loops on, fastest first."""
    return list(reversed(ISAS[:w8a8_cpu_isa() + 1]))


# where w8a8_gemm of 16 rows or more multiplies (pyx/w8a8_amx.h): not on tiles, on AMX-INT8
# tiles, or on the C model of the tiles (tests on CPUs without AMX)
AMX_MODES = ("off", "tiles", "model")     # pyx/w8a8_amx.h's W8A8_AMX_OFF, ... in order


def amx_available():
    """Whether this CPU has AMX-INT8 tiles and the OS grants them to this process."""
    return bool(w8a8_amx_available())


def group_multiple(int bits):
    """Inputs a group must be a multiple of: a step of the layout (4 for 8-bit codes, 8 for 4-bit)."""
    return W8A8_STEP * 8 // bits


cdef class Int8Matrix:
    """codes int8 [out, in] (8-bit: in [-128, 127]; 4-bit: in [-8, 7]) and scales float32
    [out, in / group] laid out as pyx/w8a8.h says (the arrays kept alive here), run on `isa`
    ("portable", "avx2", "avx512vnni": one this CPU has); low_rank: None, or the float32
    factors (A [rank, in], B [out, rank]) of the compensation y += B (A x)."""
    cdef w8a8_matrix M
    cdef object arrays
    cdef object factors

    def __cinit__(self, const int8_t[:, ::1] codes, const float[:, ::1] scales, int group, str isa,
                  int threads=1, int bits=8, low_rank=None):
        cdef const float[:, ::1] lr_a
        cdef const float[:, ::1] lr_b
        cdef qmatrix *m = &self.M.head
        cdef int out_features = codes.shape[0], in_features = codes.shape[1], t, n_groups
        if isa not in ISAS or ISAS.index(isa) > w8a8_cpu_isa():
            raise ValueError(f"int8 x int8 loops: isa must be one of {cpu_isas()} on this CPU, got {isa!r}")
        if bits not in (8, 4):
            raise ValueError(f"int8-activation layers take 8- or 4-bit codes, got {bits}")
        if out_features < 1 or in_features < 1 or group < 1 or in_features % group or \
                group % group_multiple(bits) or group > W8A8_MAX_GROUP:
            raise ValueError(f"groups of {group} inputs must divide in_features={in_features}, be a multiple of "
                             f"{group_multiple(bits)} and at most {W8A8_MAX_GROUP}")
        if bits == 4 and out_features and (np.asarray(codes).min() < -8 or np.asarray(codes).max() > 7):
            raise ValueError("4-bit codes must lie in [-8, 7]")
        n_groups = in_features // group
        if scales.shape[0] != out_features or scales.shape[1] != n_groups:
            raise ValueError(f"scales must be [{out_features}, {n_groups}], got {list(scales.shape)}")
        qm_init_head(m, bits, in_features, out_features, group, W8A8_TU)
        self.M.isa = ISAS.index(isa)
        self.M.amx = W8A8_AMX_OFF
        packed = np.zeros(m.n_tiles * in_features * W8A8_TU * bits // 8, dtype=np.uint8)
        packed_scales = np.zeros(m.n_tiles * n_groups * W8A8_TU, dtype=np.float32)
        sums = np.zeros(m.n_tiles * n_groups * W8A8_TU, dtype=np.int32)
        cdef uint8_t[::1] pc = packed
        cdef float[::1] ps = packed_scales
        cdef int32_t[::1] pu = sums
        with nogil:
            for t in prange(m.n_tiles, num_threads=max(1, threads), schedule="static"):
                w8a8_pack_rows(&codes[0, 0], &scales[0, 0], bits, in_features, group, t * W8A8_TU,
                               min(out_features, (t + 1) * W8A8_TU), &pc[0], &ps[0], &pu[0])
        self.M.lr_rank = 0
        self.M.lr_a = self.M.lr_b = NULL
        self.factors = None
        if low_rank is not None:
            lr_a, lr_b = low_rank
            if lr_a.shape[0] < 1 or lr_a.shape[1] != in_features or lr_b.shape[0] != out_features or \
                    lr_b.shape[1] != lr_a.shape[0]:
                raise ValueError(f"low-rank factors must be [rank, {in_features}] and [{out_features}, rank]")
            self.M.lr_rank = lr_a.shape[0]
            self.M.lr_a = &lr_a[0, 0]
            self.M.lr_b = &lr_b[0, 0]
            self.factors = (np.asarray(lr_a), np.asarray(lr_b))
        self.M.codes = <const int8_t *>&pc[0]
        self.M.scales = &ps[0]
        self.M.sums = &pu[0]
        self.arrays = (packed, packed_scales, sums)

    @property
    def isa(self):
        return ISAS[self.M.isa]

    @isa.setter
    def isa(self, str isa):
        if isa not in ISAS or ISAS.index(isa) > w8a8_cpu_isa():
            raise ValueError(f"int8 x int8 loops: isa must be one of {cpu_isas()} on this CPU, got {isa!r}")
        self.M.isa = ISAS.index(isa)

    @property
    def amx(self):
        """Where a call of 16 rows or more multiplies: "off" (the isa's loops), "tiles"
        (AMX-INT8, where amx_available()) or "model" (the same loop on a C model of the
        tiles); groups of a multiple of 64 inputs only, others keep the isa's loops."""
        return AMX_MODES[self.M.amx]

    @amx.setter
    def amx(self, str mode):
        if mode not in AMX_MODES:
            raise ValueError(f"amx must be one of {AMX_MODES}, got {mode!r}")
        if mode == "tiles" and not w8a8_amx_available():
            raise ValueError("no AMX-INT8 tiles on this CPU or OS")
        self.M.amx = AMX_MODES.index(mode)

    @property
    def nbytes(self):
        return sum(a.nbytes for a in self.arrays) + sum(a.nbytes for a in self.factors or ())

    def low_rank(self):
        """None, or the compensation's factors (A [rank, in], B [out, rank])."""
        return self.factors

    @property
    def bits(self):
        return self.M.head.bits

    def codes(self):
        """The codes c, int8 [out, in], read back from the layout."""
        cdef int N = self.M.head.out_features, K = self.M.head.in_features
        if self.M.head.bits == 8:
            tiles = self.arrays[0].view(np.int8).reshape(self.M.head.n_tiles, K // 4, W8A8_TU, 4)
        else:     # [tiles][K / 8][16][4] bytes: low nibbles inputs 0-3 of the step, high ones 4-7
            b = self.arrays[0].reshape(self.M.head.n_tiles, K // 8, W8A8_TU, 4)
            halves = np.stack([b & 0x0F, b >> 4], axis=3)                  # [tiles, steps, 16, 2, 4]
            tiles = (halves.astype(np.int8) - 8).reshape(self.M.head.n_tiles, K // 8, W8A8_TU, 8)
        return np.ascontiguousarray(tiles.transpose(0, 2, 1, 3).reshape(-1, K)[:N])

    def scales(self):
        """The scales, float32 [out, in / group]."""
        cdef int N = self.M.head.out_features, G = self.M.head.n_groups
        tiles = self.arrays[1].reshape(self.M.head.n_tiles, G, W8A8_TU)
        return np.ascontiguousarray(tiles.transpose(0, 2, 1).reshape(-1, G)[:N])

    def matrix_capsule(self):
        """The head member of the C struct, which the entry points below take."""
        return PyCapsule_New(<void *>&self.M.head, b"qinfer.qmatrix", NULL)

    def kernel_capsule(self):
        return PyCapsule_New(<void *>w8a8_gemm, b"qinfer.qgemm_fn", NULL)

    def team_capsule(self):
        return PyCapsule_New(<void *>w8a8_team, b"qinfer.qgemv_team_fn", NULL)

    def rows_team_capsule(self):
        return PyCapsule_New(<void *>w8a8_rows_team, b"qinfer.qgemm_team_fn", NULL)

    def matmul(self, const float[:, ::1] x, float[:, ::1] out, int nthreads):
        cdef int n = x.shape[0]
        cdef int rc
        if x.shape[1] != self.M.head.in_features or out.shape[0] != n or out.shape[1] != self.M.head.out_features:
            raise ValueError("matmul: shapes do not match the layer")
        if n == 0:
            return
        with nogil:
            rc = w8a8_gemm(&self.M.head, &x[0, 0], n, &out[0, 0], nthreads)
        if rc != 0:
            raise MemoryError("out of memory in the int8 x int8 matmul")

    def time_calls(self, const float[:, ::1] x, float[:, ::1] out, int nthreads, int repeats):
        """repeats calls back to back without the GIL (benchmarks)."""
        cdef int rc = 0, i
        with nogil:
            for i in range(repeats):
                rc = rc | w8a8_gemm(&self.M.head, &x[0, 0], x.shape[0], &out[0, 0], nthreads)
        if rc != 0:
            raise MemoryError("out of memory in the int8 x int8 matmul")


cdef extern from "w8a8.h" nogil:
    void w8a8_quantize_row(const float *x, int K, unsigned char flip, unsigned char *q, float *d_out)


def quantize_rows(const float[:, ::1] x):
    """(q int8 [n, in], d float32 [n]): each row of x rounded to int8 as the kernels round it."""
    cdef int n = x.shape[0], K = x.shape[1], r
    q = np.empty((n, K), dtype=np.int8)
    d = np.empty(n, dtype=np.float32)
    cdef int8_t[:, ::1] qv = q
    cdef float[::1] dv = d
    if n and K:
        with nogil:
            for r in range(n):
                w8a8_quantize_row(&x[r, 0], K, 0, <unsigned char *>&qv[r, 0], &dv[r])
    return q, d
