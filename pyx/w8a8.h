/* w8a8.h: linear layers with int8 weights and int8 activations (SmoothQuant's
 * and ZeroQuant's W8A8), multiplied in integers.
 *
 * The weights are symmetric int8 codes with a float32 scale per output row and
 * group of inputs, w = s * c, c in [-127, 127]. Each row of the input x (a
 * token) is rounded to int8 on its own at run time ("per-token dynamic"
 * quantization):
 *
 *     d = max|x| / 127,  q = round(x * (1 / d)) half to even, in [-127, 127]
 *
 * and every group's dot product sum c * q is exact in int32 (|sum| < 65536 *
 * 255 * 128 <= 2^31 for groups up to 65536 inputs). The output is
 *
 *     y = (sum over groups g, in order, of s_g * dot_g) * d
 *
 * each product and sum rounded to float32 on its own (this module is compiled
 * without fused multiply-adds), so every path below gives the same bits.
 *
 * Layout (output rows in tiles of W8A8_TU = 16, inputs in steps of 4):
 *
 *   codes   [n_tiles][K / 4][16][4]   8-bit: int8, byte 4 j + i of step k4 is row
 *                                     j's code of input 4 k4 + i; one 64-byte load
 *                                     is a step of the whole tile, and each
 *                                     int32 lane holds one row's four codes,
 *                                     as VNNI's vpdpbusd multiplies them
 *        or [n_tiles][K / 8][16][4]   4-bit: byte 4 j + i of step k8 holds row j's
 *                                     u of input 8 k8 + i (low nibble) and of
 *                                     input 8 k8 + 4 + i (high nibble): one load
 *                                     and a mask (and a shift) give the 8-bit
 *                                     layout of four inputs. u is unsigned, the
 *                                     side of vpdpbusd / vpmaddubsw that is, and
 *                                     each group's sum is sum u q - 8 sum q
 *   scales  [n_tiles][n_groups][16]   float32 s
 *   sums    [n_tiles][n_groups][16]   int32 (8-bit): sum of the group's codes per row.
 *                                     vpdpbusd multiplies unsigned by signed
 *                                     bytes, so the AVX-512 loop feeds it q + 128
 *                                     and takes 128 * sums back off
 *
 * Rows past out_features in the last tile are zero and never stored.
 *
 * The prepared input, per row r of x:
 *
 *   xq      [n][K]          int8 q (or q + 128 as uint8, for the AVX-512 loop of
 *                           8-bit codes), read 4 bytes at a time as a broadcast word
 *   d       [n]             float32
 *   qsum    [n][n_groups]   int32: the group's sum of q (the 4-bit loops' correction)
 *   lr      [n][lr_rank]    float32: A x (low-rank compensation only)
 *
 * Low-rank compensation (ZeroQuant-V2's LoRC), when a layer has it: y += B (A x)
 * with float32 factors A [rank][K] and B [out][rank] of the weights' rounding
 * error, on the float input. Each A x is summed in 16 lanes (input k into lane
 * k % 16, then the lanes in order) and each output's B t in order, in plain C
 * the compiler may vectorize but not reorder: the same bits on every path.
 *
 * The loops per instruction set are rendered from pyx/w8a8_kernels.h.tp
 * (its table at the top); the portable loop is here. */
#ifndef QINFER_W8A8_H
#define QINFER_W8A8_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "qmatrix.h"
#include "team.h"
#include "scratch.h"
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define W8A8_X86 1
#else
#define W8A8_X86 0
#endif

/* The row rounding's loop compiled for x86-64-v3 (AVX2) and baseline, picked
 * by the loader: it vectorizes where the CPU can (the same bits either way:
 * no fused multiply-adds in this module). */
#if defined(__GNUC__) && __GNUC__ >= 12 && defined(__x86_64__) && defined(__linux__) && !defined(__clang__)
#define QI_W8A8_VECTORIZE __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define QI_W8A8_VECTORIZE
#endif

#define W8A8_TU 16
#define W8A8_STEP 4                 /* inputs per int32 lane; 4-bit groups take multiples of 8 */
#define W8A8_MAX_GROUP 65536        /* the int32 sums' bound, above */

/* Instruction sets of the loops, fastest first (W8A8_ISA_NAMES in _w8a8.pyx). */
enum { W8A8_PORTABLE = 0, W8A8_AVX2 = 1, W8A8_AVX512VNNI = 2 };

typedef struct w8a8_matrix {
    qmatrix head;            /* bits (8 or 4), in/out features, group_size, n_groups, n_tiles, tu = W8A8_TU;
                                no words or scales: the forward pass only passes it on */
    int isa;                 /* the loops the entry points run: W8A8_PORTABLE, ... */
    int amx;                 /* w8a8_gemm of 16 rows or more on AMX-INT8 tiles: W8A8_AMX_OFF, ... (w8a8_amx.h) */
    const int8_t *codes;
    const float *scales;
    const int32_t *sums;
    int lr_rank;             /* 0, or the rank of the low-rank compensation: */
    const float *lr_a;       /* [lr_rank][in_features] */
    const float *lr_b;       /* [out_features][lr_rank] */
} w8a8_matrix;

#define W8A8_OF(m) ((const w8a8_matrix *)(const void *)(m))

/* ------------------------------------------------------------ the input */

/* Row x[K] -> q (each byte XORed with `flip`: 0 keeps int8 q, 0x80 makes it
 * q + 128 as uint8) and d. x * (1 / d) is rounded to float, then to an integer
 * half to even by adding and subtracting 1.5 * 2^23 (exact for |v| < 2^22). */
QI_W8A8_VECTORIZE
static void w8a8_quantize_row(const float *x, int K, uint8_t flip, uint8_t *q, float *d_out)
{
    float amax = 0.0f;
    for (int k = 0; k < K; k++) {
        const float a = fabsf(x[k]);
        amax = a > amax ? a : amax;
    }
    const float d = amax / 127.0f;
    const float id = d > 0.0f ? 1.0f / d : 0.0f;
    for (int k = 0; k < K; k++) {
        float v = (x[k] * id + 12582912.0f) - 12582912.0f;
        v = v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
        q[k] = (uint8_t)((int8_t)(int)v) ^ flip;
    }
    *d_out = d;
}

/* ---------------------------------------------------------- the portable loop */

/* Code c of row j, input k of a tile's codes (either width). */
static inline int w8a8_code(const uint8_t *tile_codes, int bits, int j, int k)
{
    if (bits == 8)
        return (int8_t)tile_codes[(size_t)(k / 4) * 64 + 4 * j + k % 4];
    const uint8_t b = tile_codes[(size_t)(k / 8) * 64 + 4 * j + k % 4];
    return (k % 8 < 4 ? b & 0x0F : b >> 4) - 8;
}

/* Rows 0..n-1 of the prepared input (int8 q) times tile `tile`, into y (row r
 * at y + r * ldy, this tile's columns only). */
static void w8a8_tile_portable(const w8a8_matrix *M, const int8_t *xq, const float *d, int n, int tile,
                               float *y, size_t ldy)
{
    const int K = M->head.in_features, G = M->head.group_size, n_groups = M->head.n_groups, bits = M->head.bits;
    const int valid = M->head.out_features - tile * W8A8_TU < W8A8_TU ? M->head.out_features - tile * W8A8_TU
                                                                      : W8A8_TU;
    const uint8_t *codes = (const uint8_t *)M->codes + (size_t)tile * K * W8A8_TU * bits / 8;
    const float *scales = M->scales + (size_t)tile * n_groups * W8A8_TU;
    for (int r = 0; r < n; r++) {
        const int8_t *xr = xq + (size_t)r * K;
        for (int j = 0; j < valid; j++) {
            float acc = 0.0f;
            for (int g = 0; g < n_groups; g++) {
                int32_t dot = 0;
                for (int k = g * G; k < (g + 1) * G; k++)
                    dot += (int32_t)w8a8_code(codes, bits, j, k) * xr[k];
                const float t = scales[g * W8A8_TU + j] * (float)dot;
                acc = acc + t;
            }
            y[(size_t)r * ldy + (size_t)tile * W8A8_TU + j] = acc * d[r];
        }
    }
}

#include "w8a8_kernels.h"

/* ------------------------------------------------------------ entry points */

/* The prepared input's bytes: q + 128 for the AVX-512 loop of 8-bit codes (vpdpbusd's
 * unsigned side), q for the others. */
static inline uint8_t w8a8_flip(const w8a8_matrix *M)
{
    return M->isa == W8A8_AVX512VNNI && M->head.bits == 8 ? 0x80 : 0;
}

/* The prepared input of n rows (the layout above), in one allocation. */
typedef struct {
    uint8_t *xq;
    float *d;
    int32_t *qsum;
    float *lr;
} w8a8_input;

static inline size_t w8a8_input_bytes(const w8a8_matrix *M, int n)
{
    const size_t q = ((size_t)n * M->head.in_features + 63) & ~(size_t)63;
    return q + sizeof(float) * (size_t)n * (1 + M->lr_rank) + sizeof(int32_t) * (size_t)n * M->head.n_groups;
}

static inline w8a8_input w8a8_input_at(const w8a8_matrix *M, int n, void *memory)
{
    const size_t q = ((size_t)n * M->head.in_features + 63) & ~(size_t)63;
    char *at = (char *)memory + q;
    w8a8_input in = {(uint8_t *)memory, (float *)at, (int32_t *)(at + sizeof(float) * (size_t)n),
                     (float *)(at + sizeof(float) * (size_t)n + sizeof(int32_t) * (size_t)n * M->head.n_groups)};
    return in;
}

/* t = A x for one row of x: the low-rank compensation's first factor (16 lanes, above). */
QI_W8A8_VECTORIZE
static void w8a8_low_rank_input(const w8a8_matrix *M, const float *x, float *t)
{
    const int K = M->head.in_features;
    for (int j = 0; j < M->lr_rank; j++) {
        const float *a = M->lr_a + (size_t)j * K;
        float lane[16] = {0};
        for (int k = 0; k + 16 <= K; k += 16)
            for (int l = 0; l < 16; l++)
                lane[l] = lane[l] + a[k + l] * x[k + l];
        for (int k = K & ~15; k < K; k++)
            lane[k % 16] = lane[k % 16] + a[k] * x[k];
        float sum = 0.0f;
        for (int l = 0; l < 16; l++)
            sum = sum + lane[l];
        t[j] = sum;
    }
}

/* y += B t for the tile's outputs and rows 0..n-1 (after the tile's integer product). */
static void w8a8_low_rank_tile(const w8a8_matrix *M, const w8a8_input *in, int n, int tile, float *y)
{
    const int out = M->head.out_features, rank = M->lr_rank;
    const int first = tile * W8A8_TU, last = first + W8A8_TU < out ? first + W8A8_TU : out;
    for (int r = 0; r < n; r++) {
        const float *t = in->lr + (size_t)r * rank;
        for (int o = first; o < last; o++) {
            const float *b = M->lr_b + (size_t)o * rank;
            float add = 0.0f;
            for (int j = 0; j < rank; j++)
                add = add + b[j] * t[j];
            y[(size_t)r * out + o] = y[(size_t)r * out + o] + add;
        }
    }
}

/* Row r of x into the prepared input: its codes (each byte XORed with flip: w8a8_flip, or
 * 0 for the AMX loop), d and group sums of q. */
static void w8a8_prepare_row(const w8a8_matrix *M, const float *x, int r, const w8a8_input *in, uint8_t flip)
{
    const int K = M->head.in_features, G = M->head.group_size, n_groups = M->head.n_groups;
    uint8_t *q = in->xq + (size_t)r * K;
    w8a8_quantize_row(x + (size_t)r * K, K, flip, q, in->d + r);
    for (int g = 0; g < n_groups; g++) {
        int32_t sum = 0;
        for (int k = g * G; k < (g + 1) * G; k++)
            sum += (int8_t)(q[k] ^ flip);
        in->qsum[(size_t)r * n_groups + g] = sum;
    }
    if (M->lr_rank)
        w8a8_low_rank_input(M, x + (size_t)r * K, in->lr + (size_t)r * M->lr_rank);
}

/* Tiles first..last-1 for rows 0..n-1 of the prepared input, on M->isa's loops. */
static void w8a8_tiles(const w8a8_matrix *M, const w8a8_input *in, int n, int first, int last, float *y)
{
    const size_t ldy = (size_t)M->head.out_features;
    for (int tile = first; tile < last; tile++) {
        switch (M->isa) {
#if W8A8_X86
        case W8A8_AVX512VNNI: w8a8_tile_avx512vnni(M, in->xq, in->d, in->qsum, n, tile, y, ldy); break;
        case W8A8_AVX2: w8a8_tile_avx2(M, in->xq, in->d, in->qsum, n, tile, y, ldy); break;
#endif
        default: w8a8_tile_portable(M, (const int8_t *)in->xq, in->d, n, tile, y, ldy); break;
        }
        if (M->lr_rank)
            w8a8_low_rank_tile(M, in, n, tile, y);
    }
}

/* A thread's buffers in w8a8_amx_share: the tiles' sums, the rows' float sums and, for
 * 4-bit codes, two tiles' codes unpacked to bytes. */
static inline size_t w8a8_amx_work_bytes(const w8a8_matrix *M)
{
    return 8 * 1024 + (M->head.bits == 4 ? 2 * (size_t)M->head.in_features * W8A8_TU : 0);
}

#include "w8a8_amx.h"

/* Tiles first..last-1 on AMX tiles or their model (w8a8_amx.h) for the prepared input of
 * rows32 rows (n of them real), then the low-rank compensation: w8a8_tiles' twin. Returns
 * 0, or -1 when out of memory. */
static int w8a8_amx_tiles(const w8a8_matrix *M, const w8a8_input *in, int rows32, int n, int first, int last,
                          float *y)
{
    if (first >= last)
        return 0;
    uint8_t *work = (uint8_t *)aligned_alloc(64, (w8a8_amx_work_bytes(M) + 63) & ~(size_t)63);
    if (!work)
        return -1;
#if W8A8_HAVE_AMX
    if (M->amx == W8A8_AMX_TILES)
        w8a8_amx_share_tiles(M, in, rows32, n, first, last, y, work);
    else
#endif
        w8a8_amx_share_model(M, in, rows32, n, first, last, y, work);
    free(work);
    if (M->lr_rank)
        for (int tile = first; tile < last; tile++)
            w8a8_low_rank_tile(M, in, n, tile, y);
    return 0;
}

/* y[n][out] = x[n][in] @ W^T (qgemm_fn): the rows' codes, shared out among the
 * threads, then each thread a contiguous run of tiles for every row: on AMX tiles
 * where the matrix says and the call qualifies (w8a8_amx_takes), whose loop takes the
 * codes as int8 q and the rows in blocks of 32 (zero rows added), else the isa's loops. */
static int w8a8_gemm(const qmatrix *m, const float *x, int n, float *y, int nthreads)
{
    const w8a8_matrix *M = W8A8_OF(m);
    const int amx = w8a8_amx_takes(M, n), rows = amx ? (n + 31) / 32 * 32 : n, K = M->head.in_features;
    const uint8_t flip = amx ? 0 : w8a8_flip(M);
    void *memory = aligned_alloc(64, (w8a8_input_bytes(M, rows) + 63) & ~(size_t)63);
    if (!memory)
        return -1;
    const w8a8_input in = w8a8_input_at(M, rows, memory);
    memset(in.xq + (size_t)n * K, 0, (size_t)(rows - n) * K);
    int failed = 0;
    #pragma omp parallel num_threads(team_thread_count(nthreads)) reduction(|:failed)
    {
        #pragma omp for schedule(static)
        for (int r = 0; r < n; r++)
            w8a8_prepare_row(M, x, r, &in, flip);
#ifdef _OPENMP
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
#else
        const int t = 0, T = 1;
#endif
        const int first = (int)((long)m->n_tiles * t / T), last = (int)((long)m->n_tiles * (t + 1) / T);
        if (amx)
            failed |= w8a8_amx_tiles(M, &in, rows, n, first, last, y) != 0;
        else
            w8a8_tiles(M, &in, n, first, last, y);
    }
    free(memory);
    return failed ? -1 : 0;
}

/* Several rows inside the caller's thread team (qgemm_team_fn): every thread
 * rounds the rows itself (microseconds, cheaper than a barrier and a shared
 * buffer) and computes its share of the tiles (several rows: the tiles it claims,
 * team.h); y is whole at the caller's
 * barrier. The same numbers as w8a8_gemm. */
static int w8a8_rows_team(const qmatrix *m, const float *x, int n, float *y, const team *tm)
{
    const w8a8_matrix *M = W8A8_OF(m);
    void *memory = scratch_take(w8a8_input_bytes(M, n));
    if (!memory)
        return -1;
    const w8a8_input in = w8a8_input_at(M, n, memory);
    for (int r = 0; r < n; r++)
        w8a8_prepare_row(M, x, r, &in, w8a8_flip(M));
    /* a batched step's tiles claimed (a barrier precedes its calls), a decode step's its fixed share */
    team_claims claims = team_claims_of(tm, m->n_tiles, n > 1);
    int first, last;
    while (team_claim(&claims, &first, &last))
        w8a8_tiles(M, &in, n, first, last, y);
    scratch_done();
    return 0;
}

static int w8a8_team(const qmatrix *m, const float *x, float *y, const team *tm)
{
    return w8a8_rows_team(m, x, 1, y, tm);
}

/* ------------------------------------------------------------ packing */

/* Rows first..last-1 of codes [out][in] (int8 c, row-major; 4-bit: c in [-8, 7]) and
 * scales [out][n_groups] into the layout above; padded rows stay as the caller zeroed them. */
static void w8a8_pack_rows(const int8_t *src, const float *src_scales, int bits, int in_features, int group_size,
                           int first, int last, uint8_t *codes, float *scales, int32_t *sums)
{
    const int K = in_features, n_groups = K / group_size;
    for (int row = first; row < last; row++) {
        const int tile = row / W8A8_TU, j = row % W8A8_TU;
        uint8_t *tc = codes + (size_t)tile * K * W8A8_TU * bits / 8;
        for (int g = 0; g < n_groups; g++) {
            int32_t sum = 0;
            for (int k = g * group_size; k < (g + 1) * group_size; k++) {
                const int8_t c = src[(size_t)row * K + k];
                if (bits == 8)
                    tc[(size_t)(k / 4) * 64 + 4 * j + k % 4] = (uint8_t)c;
                else
                    tc[(size_t)(k / 8) * 64 + 4 * j + k % 4] |= (uint8_t)((c + 8) << (k % 8 < 4 ? 0 : 4));
                sum += c;
            }
            const size_t at = ((size_t)tile * n_groups + g) * W8A8_TU + j;
            scales[at] = src_scales[(size_t)row * n_groups + g];
            sums[at] = sum;
        }
    }
}

/* The fastest loops this CPU runs (W8A8_AVX512VNNI, ...). */
static int w8a8_cpu_isa(void)
{
#if W8A8_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
        return W8A8_AVX512VNNI;
    if (__builtin_cpu_supports("avx2"))
        return W8A8_AVX2;
#endif
    return W8A8_PORTABLE;
}

#endif
