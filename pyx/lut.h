/* lut.h: linear layers run by table lookups instead of multiplications
 * (LUT-GEMM, Park et al. 2024; its CPU form T-MAC, Wei et al. 2024).
 *
 * Every weight is a sum of sign planes: w = sum_i a_i b_i / 2 + c, b_i = +-1
 * (bit_i = (b_i + 1) / 2 held as a bit), with multipliers a_i and an offset c
 * per output row and group. Two kinds of layer fill that in:
 *
 *   LUT_BINARY   binary-coding quantization (qinfer/quant/bcq.py):
 *                w = sum_i alpha_i b_i + offset: a_i = 2 alpha_i, c = offset
 *   LUT_UNIFORM  GPTQ/RTN codes q = sum_i 2^i bit_i, w = s (q - z):
 *                a_i = s 2^i, c = s ((2^bits - 1) / 2 - z); only s is held
 *
 * For each run of 4 inputs the kernel builds a table of its 16 signed half
 * sums, T[idx] = (sum_{t in idx} x_t - sum_{t not in idx} x_t) / 2 (the subset
 * sum less half the run's total: a range of sum |x_t| / 2), rounded to int8
 * with one step d per segment of at most LUT_SEGMENT inputs; a plane's 4 bits
 * of a row then look up sum_t b_t x_t / 2 over the run in one byte. The lookups
 * of one plane and segment are summed exactly in int32 (P_i); the segment then
 * adds, per row,
 *
 *   uniform:  s * (d * sum_i 2^i P_i) + c * X        X = the segment's sum of x
 *   binary:   d * (sum_i a_i P_i)     + c * X
 *
 * in float32 with fused multiply-adds, in the same order on every path, so the
 * AVX-512 and the portable loops give the same bits.
 *
 * Layout (output rows in tiles of LUT_TU = 32, inputs in blocks of LUT_BLOCK =
 * 16 = four runs of four, in kernel order: act-order's perm applied):
 *
 *   planes   [n_tiles][K / 16][bits][64]          uint8
 *            byte m of a block and plane: its low nibble is row m / 4's bits
 *            of run m % 4 (input 4 (m % 4) + t of the block at bit t), its
 *            high nibble row 16 + m / 4's. One 64-byte load gives the lookups
 *            of both halves of the tile: the low nibbles as they are, the high
 *            ones shifted down, each masked to 4 bits with its run at bits 4-5
 *   mults    [n_tiles][n_groups][n_mults][32]     float16: s (uniform, n_mults 1)
 *                                                 or a_0 .. a_{bits-1} (binary)
 *   offsets  [n_tiles][n_groups][32]              float32: c
 *   perm     [K] int32 or NULL: kernel input k is x[perm[k]]
 *
 * Rows past out_features in the last tile are zero and never stored.
 *
 * The per-row tables, as the lookups read them:
 *
 *   tables   [K / 16][64] int8: entry 16 t + idx of block j = T[idx] of run t
 *            of block j, so one 64-byte vector holds a block's four tables
 *   scale    [K / seg_len] float32: d, the table step of each segment
 *   xsum     [K / seg_len] float32: X
 */
#ifndef QINFER_LUT_H
#define QINFER_LUT_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <immintrin.h>
#include "qmatrix.h"
#include "team.h"
#ifdef _OPENMP
#include <omp.h>
#endif

#define LUT_TU 32
#define LUT_HALF 16                     /* rows of a half tile: one int32 lane each in a 512-bit vector */
#define LUT_BLOCK 16
#define LUT_SEGMENT 128
#define LUT_MAX_BITS 4

enum { LUT_UNIFORM = 0, LUT_BINARY = 1 };

typedef struct lut_matrix {
    qmatrix head;            /* in/out features, bits, group_size, n_groups, n_tiles, tu = LUT_TU, perm;
                                no words or scales: the forward pass only passes it on */
    int kind;                /* LUT_UNIFORM or LUT_BINARY */
    int n_mults;             /* 1 or bits */
    int seg_len;             /* inputs per table step: the group, or a divisor of it up to 128 */
    int avx512;              /* 1: the CPU has AVX-512 VBMI and VNNI, for the fast entry points */
    const uint8_t *planes;
    const uint16_t *mults;
    const float *offsets;
} lut_matrix;

typedef struct lut_act {
    int8_t *tables;          /* [n][K / 16][64] */
    float *scale;            /* [n][n_segments] */
    float *xsum;             /* [n][n_segments] */
    int n_segments;
} lut_act;

#define LUT_OF(m) ((const lut_matrix *)(const void *)(m))

/* ------------------------------------------------------------ the tables */

/* One row's tables: each run's 16 subset sums in float32, adding the run's
 * inputs in order (the lanes of an index without an input's bit add nothing, so
 * the vector build below computes the same values), less half the run's total
 * S = sum[15]; then rounded to int8 in steps of d = max|T| / 127 over the
 * segment. X, the segment's sum, adds the runs' totals in order. */
static void lut_build_row_portable(const lut_matrix *L, const float *x, int8_t *tables, float *scale, float *xsum)
{
    const int K = L->head.in_features, seg = L->seg_len;
    const int32_t *perm = L->head.perm;
    float T[LUT_SEGMENT / 4][16];
    for (int s0 = 0; s0 < K; s0 += seg) {
        float amax = 0.0f, sum = 0.0f;
        for (int r = 0; r < seg / 4; r++) {
            float *t = T[r];
            t[0] = 0.0f;
            for (int b = 0; b < 4; b++) {
                const int k = s0 + 4 * r + b;
                const float v = perm ? x[perm[k]] : x[k];
                for (int idx = 0; idx < (1 << b); idx++)
                    t[(1 << b) + idx] = t[idx] + v;
            }
            const float total = t[15], half = 0.5f * total;
            sum += total;
            for (int idx = 0; idx < 16; idx++) {
                t[idx] -= half;
                amax = fmaxf(amax, fabsf(t[idx]));
            }
        }
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        int8_t *out = tables + (size_t)s0 * 4;      /* 16 entries a run of 4 inputs */
        for (int r = 0; r < seg / 4; r++)
            for (int idx = 0; idx < 16; idx++)
                out[16 * r + idx] = (int8_t)lrintf(T[r][idx] * inv);
        scale[s0 / seg] = amax / 127.0f;
        xsum[s0 / seg] = sum;
    }
}

/* The same on AVX-512: a run's table is one vector, each input added under the
 * mask of the entries whose index has its bit. */
__attribute__((target("avx512f,avx512bw,avx512vl")))
static void lut_build_row_avx512(const lut_matrix *L, const float *x, int8_t *tables, float *scale, float *xsum)
{
    const int K = L->head.in_features, seg = L->seg_len;
    const int32_t *perm = L->head.perm;
    const __mmask16 has[4] = {0xAAAA, 0xCCCC, 0xF0F0, 0xFF00};
    __m512 T[LUT_SEGMENT / 4];
    for (int s0 = 0; s0 < K; s0 += seg) {
        __m512 amax = _mm512_setzero_ps();
        float sum = 0.0f;
        for (int r = 0; r < seg / 4; r++) {
            __m512 t = _mm512_setzero_ps();
            for (int b = 0; b < 4; b++) {
                const int k = s0 + 4 * r + b;
                t = _mm512_mask_add_ps(t, has[b], t, _mm512_set1_ps(perm ? x[perm[k]] : x[k]));
            }
            const float total = _mm_cvtss_f32(_mm_permute_ps(_mm512_extractf32x4_ps(t, 3), 0xff));   /* lane 15 */
            sum += total;
            t = _mm512_sub_ps(t, _mm512_set1_ps(0.5f * total));
            T[r] = t;
            amax = _mm512_max_ps(amax, _mm512_abs_ps(t));
        }
        const float m = _mm512_reduce_max_ps(amax);
        const __m512 inv = _mm512_set1_ps(m > 0.0f ? 127.0f / m : 0.0f);
        int8_t *out = tables + (size_t)s0 * 4;
        for (int r = 0; r < seg / 4; r++)
            _mm_storeu_si128((__m128i *)(out + 16 * r), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(T[r], inv))));
        scale[s0 / seg] = m / 127.0f;
        xsum[s0 / seg] = sum;
    }
}

static inline const int8_t *lut_row_tables(const lut_matrix *L, const lut_act *a, int r)
{
    return a->tables + (size_t)r * L->head.in_features * 4;
}

/* Row r of x[n][in]'s tables into a (fast: on AVX-512 where the CPU has it). */
static void lut_build_row(const lut_matrix *L, const float *x, const lut_act *a, int r, int fast)
{
    const float *xr = x + (size_t)r * L->head.in_features;
    int8_t *tables = (int8_t *)lut_row_tables(L, a, r);
    float *scale = a->scale + (size_t)r * a->n_segments, *xsum = a->xsum + (size_t)r * a->n_segments;
    if (fast && L->avx512)
        lut_build_row_avx512(L, xr, tables, scale, xsum);
    else
        lut_build_row_portable(L, xr, tables, scale, xsum);
}

static void lut_act_free(lut_act *a)
{
    free(a->tables);
    free(a->scale);
    free(a->xsum);
    a->tables = NULL;
    a->scale = a->xsum = NULL;
}

static int lut_act_alloc(const lut_matrix *L, int n, lut_act *a)
{
    const size_t K = (size_t)L->head.in_features;
    a->n_segments = (int)(K / L->seg_len);
    a->tables = (int8_t *)aligned_alloc(64, (size_t)n * K * 4);
    a->scale = (float *)malloc(sizeof(float) * (size_t)n * a->n_segments);
    a->xsum = (float *)malloc(sizeof(float) * (size_t)n * a->n_segments);
    if (!a->tables || !a->scale || !a->xsum) {
        lut_act_free(a);
        return -1;
    }
    return 0;
}

/* ---------------------------------------------------- the portable loops */

/* Tile `tile`'s outputs (rows j0 .. j0 + rows - 1 of y) for one row of tables. */
static void lut_tile_portable(const lut_matrix *L, const lut_act *a, int r, int tile, float *y, int rows)
{
    const int K = L->head.in_features, bits = L->head.bits, seg = L->seg_len;
    const int blocks = K / LUT_BLOCK, segs_per_group = L->head.group_size / seg;
    const int8_t *tables = lut_row_tables(L, a, r);
    const float *scale = a->scale + (size_t)r * a->n_segments, *xsum = a->xsum + (size_t)r * a->n_segments;
    const uint8_t *tile_planes = L->planes + (size_t)tile * blocks * bits * 64;
    const uint16_t *mults = L->mults + (size_t)tile * L->head.n_groups * L->n_mults * LUT_TU;
    const float *offsets = L->offsets + (size_t)tile * L->head.n_groups * LUT_TU;
    for (int j = 0; j < rows; j++) {
        const int byte = 4 * (j % LUT_HALF), nibble = 4 * (j / LUT_HALF);
        float out = 0.0f;
        for (int s = 0; s < a->n_segments; s++) {
            int32_t P[LUT_MAX_BITS] = {0};
            for (int blk = s * seg / LUT_BLOCK; blk < (s + 1) * seg / LUT_BLOCK; blk++) {
                const int8_t *t = tables + (size_t)blk * 64;
                for (int i = 0; i < bits; i++) {
                    const uint8_t *b = tile_planes + ((size_t)blk * bits + i) * 64 + byte;
                    for (int run = 0; run < 4; run++)
                        P[i] += t[16 * run + ((b[run] >> nibble) & 15u)];
                }
            }
            const int g = s / segs_per_group;
            const uint16_t *mg = mults + (size_t)g * L->n_mults * LUT_TU + j;
            const float c = offsets[(size_t)g * LUT_TU + j];
            if (L->kind == LUT_UNIFORM) {
                int32_t acc = 0;
                for (int i = 0; i < bits; i++)
                    acc += P[i] * (1 << i);
                out = fmaf((float)acc * scale[s], qm_half_to_float(mg[0]), out);
            } else {
                float v = (float)P[0] * qm_half_to_float(mg[0]);
                for (int i = 1; i < bits; i++)
                    v = fmaf((float)P[i], qm_half_to_float(mg[(size_t)i * LUT_TU]), v);
                out = fmaf(v, scale[s], out);
            }
            out = fmaf(c, xsum[s], out);
        }
        y[j] = out;
    }
}

/* The generated AVX-512 loops (build/generated/lut_kernels.h, from
 * pyx/lut_kernels.h.tp): lut_tile_avx512(L, a, r, tile, y, rows) computes a
 * tile's `rows` outputs for row r of the tables. */
#include "lut_kernels.h"

/* Tiles first .. last - 1 for rows 0 .. n-1 of the tables, into y[n][out];
 * fast: on AVX-512 where the CPU has it. */
static void lut_tiles(const lut_matrix *L, const lut_act *a, int n, int first, int last, float *y, int fast)
{
    const int out = L->head.out_features;
    for (int tile = first; tile < last; tile++) {
        const int j0 = tile * LUT_TU, rows = out - j0 < LUT_TU ? out - j0 : LUT_TU;
        for (int r = 0; r < n; r++) {
            float *yr = y + (size_t)r * out + j0;
            if (!(fast && L->avx512 && lut_tile_avx512(L, a, r, tile, yr, rows) == 0))
                lut_tile_portable(L, a, r, tile, yr, rows);
        }
    }
}

/* ------------------------------------------------------- packing the planes */

/* GPTQ words [in * bits / 32][out] (a column's codes one little-endian bit
 * stream, code k at bits k * bits ..) -> the planes of the layout above, tiles
 * first .. last - 1; kernel input k is the stored row perm[k] (NULL: k). What
 * qinfer/lut_linear.py's pack_planes does from unpacked codes, without them. */
static void lut_pack_words(const uint32_t *words, int bits, int in_features, int out_features,
                           const int32_t *perm, uint8_t *planes, int first, int last)
{
    const int blocks = in_features / LUT_BLOCK;
    const uint32_t mask = (1u << bits) - 1;
    for (int tile = first; tile < last; tile++)
        for (int blk = 0; blk < blocks; blk++) {
            uint8_t *out = planes + ((size_t)tile * blocks + blk) * bits * 64;
            memset(out, 0, (size_t)bits * 64);
            for (int half = 0; half < 2; half++)
                for (int r = 0; r < LUT_HALF; r++) {
                    const int row = tile * LUT_TU + half * LUT_HALF + r;
                    if (row >= out_features)
                        continue;
                    for (int run = 0; run < 4; run++)
                        for (int t = 0; t < 4; t++) {
                            const int k = blk * LUT_BLOCK + 4 * run + t, src = perm ? perm[k] : k;
                            const size_t bit = (size_t)src * bits, w = bit / 32;
                            const int off = (int)(bit % 32);
                            uint64_t v = words[w * out_features + row] >> off;
                            if (off + bits > 32)
                                v |= (uint64_t)words[(w + 1) * out_features + row] << (32 - off);
                            const uint32_t q = (uint32_t)v & mask;
                            for (int i = 0; i < bits; i++)
                                out[i * 64 + 4 * r + run] |= (uint8_t)(((q >> i) & 1u) << (4 * half + t));
                        }
                }
        }
}

/* ----------------------------------------------------------- entry points */

static inline int lut_cpu_has_avx512(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi") &&
           __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
}

/* y[n][out] = x[n][in] @ W^T (qgemm_fn): the rows' tables, then each thread a
 * contiguous run of tiles for every row. */
static int lut_gemm_with(const qmatrix *m, const float *x, int n, float *y, int nthreads, int fast)
{
    const lut_matrix *L = LUT_OF(m);
    lut_act a;
    if (lut_act_alloc(L, n, &a))
        return -1;
    #pragma omp parallel num_threads(team_thread_count(nthreads))
    {
        #pragma omp for schedule(static)
        for (int r = 0; r < n; r++)
            lut_build_row(L, x, &a, r, fast);
#ifdef _OPENMP
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
#else
        const int t = 0, T = 1;
#endif
        lut_tiles(L, &a, n, (int)((long)m->n_tiles * t / T), (int)((long)m->n_tiles * (t + 1) / T), y, fast);
    }
    lut_act_free(&a);
    return 0;
}

static int lut_gemm_fast(const qmatrix *m, const float *x, int n, float *y, int nthreads)
{
    return lut_gemm_with(m, x, n, y, nthreads, 1);
}

static int lut_gemm_portable(const qmatrix *m, const float *x, int n, float *y, int nthreads)
{
    return lut_gemm_with(m, x, n, y, nthreads, 0);
}

/* Each team thread's tables, kept from call to call (a decode step calls every
 * layer once a token); at most LUT_KEPT_BYTES stay between calls. */
#define LUT_KEPT_BYTES (1u << 20)
static __thread lut_act lut_kept = {NULL, NULL, NULL, 0};
static __thread size_t lut_kept_rows_k = 0;     /* n * K the kept buffers hold */

static int lut_team_act(const lut_matrix *L, int n, lut_act *a)
{
    const size_t need = (size_t)n * L->head.in_features;
    if (need > lut_kept_rows_k) {
        lut_act_free(&lut_kept);
        lut_kept_rows_k = 0;
        /* scale and xsum sized for the shortest segments (16 inputs): any layer of n * K fits */
        lut_kept.tables = (int8_t *)aligned_alloc(64, need * 4);
        lut_kept.scale = (float *)malloc(sizeof(float) * (need / LUT_BLOCK));
        lut_kept.xsum = (float *)malloc(sizeof(float) * (need / LUT_BLOCK));
        if (!lut_kept.tables || !lut_kept.scale || !lut_kept.xsum) {
            lut_act_free(&lut_kept);
            return -1;
        }
        lut_kept_rows_k = need;
    }
    *a = lut_kept;
    a->n_segments = L->head.in_features / L->seg_len;
    return 0;
}

static void lut_team_done(void)
{
    if (lut_kept_rows_k * 4 > LUT_KEPT_BYTES) {
        lut_act_free(&lut_kept);
        lut_kept_rows_k = 0;
    }
}

/* Several rows inside the caller's thread team (qgemm_team_fn; the fast loops): every thread
 * builds the tables (a few microseconds a layer, cheaper than a barrier and a
 * shared buffer) and computes its share of the tiles (several rows: the tiles it
 * claims, team.h); no barrier, y is whole
 * at the caller's. */
static int lut_rows_team(const qmatrix *m, const float *x, int n, float *y, const team *tm)
{
    const lut_matrix *L = LUT_OF(m);
    lut_act a;
    if (lut_team_act(L, n, &a))
        return -1;
    for (int r = 0; r < n; r++)
        lut_build_row(L, x, &a, r, 1);
    /* a batched step's tiles claimed (a barrier precedes its calls), a decode step's its fixed share */
    team_claims claims = team_claims_of(tm, m->n_tiles, n > 1);
    int first, last;
    while (team_claim(&claims, &first, &last))
        lut_tiles(L, &a, n, first, last, y, 1);
    lut_team_done();
    return 0;
}

static int lut_team(const qmatrix *m, const float *x, float *y, const team *tm)
{
    return lut_rows_team(m, x, 1, y, tm);
}

#endif
