/* spqr.h: a SpQR layer (Dettmers et al. 2023; qinfer/quant/spqr.py) as the
 * kernels run it: b-bit codes with their scale statistics kept compressed in
 * memory, and a sparse table of float16 outliers.
 *
 * The dense part is a qmatrix like any other (qmatrix.h: the codes in tiles of
 * tu output columns, groups of beta1 = group_size inputs, act-order perm)
 * except that it holds no float scales or zeros. Those stay in records of 16
 * output rows (beta2) x one group, each (stat_bits + bits + 2) uint16:
 *
 *   records [n_runs = ceil(out / 16)][n_groups][stat_bits + bits + 2]   uint16
 *
 *     half  0 .. stat_bits-1          scale-code bit planes: bit i of plane p is
 *                                     bit p of row (16 run + i)'s scale code
 *     half  stat_bits .. +bits-1      zero-point bit planes, the same way
 *     half  stat_bits + bits          s2: the run's float16 second-level scale
 *     half  stat_bits + bits + 1      z2: its float16 second-level zero
 *
 *   row i's group scale = s2 * (scale code - z2)   (float32, as numpy computes it)
 *   row i's group zero  = its zero point, an integer in [0, 2^bits)
 *
 * At 3-bit codes and statistics that is 8 halves, 16 bytes, per 256 weights:
 * 0.5 bits a weight on top of the codes' 3.
 *
 * The outliers, in the weight's own column order (not act-order's):
 *
 *   outlier_rows [out + 1]   int32: output row j's outliers are entries rows[j] .. rows[j+1]-1
 *   outlier_cols [count]     uint16: their input columns, ascending within a row
 *   outlier_vals [count]     float16: their weights (the dense code there is the zero point: 0.0)
 *
 * A call walks each thread's share of the tiles a few at a time: it widens
 * those tiles' records into a float32 buffer (about SPQR_CHUNK_BYTES a row, so
 * it stays in the core's L2), runs the layer's own dense kernel on a qmatrix
 * view of just those tiles, and adds the same tiles' outliers while their
 * outputs are still in cache. Every kernel sums a column the same way whatever
 * tiles it is given, so the dense part equals the dense kernel's result on the
 * whole matrix with float32 scales, bit for bit (tests/test_spqr_kernels.py).
 */
#ifndef QINFER_SPQR_H
#define QINFER_SPQR_H

#include <stdlib.h>
#include <string.h>
#include "qmatrix.h"
#include "team.h"
#ifdef _OPENMP
#include <omp.h>
#endif

#define SPQR_RUN 16                    /* beta2: output rows per record */
#define SPQR_CHUNK_BYTES (512 * 1024)   /* decoded statistics per chunk of tiles and row (up to 16 rows) */

typedef struct spqr_matrix {
    qmatrix dense;              /* scales, zeros: NULL; the kernels get views (spqr_view) */
    int stat_bits;
    int record_halves;          /* stat_bits + bits + 2 */
    const uint16_t *records;    /* [ceil(out / 16)][n_groups][record_halves] */
    const int32_t *outlier_rows;
    const uint16_t *outlier_cols;
    const uint16_t *outlier_vals;
    /* the dense per-call kernels run on views (NULL: none); [0] the scalar path, [1] AVX2.
     * The team entry points run them too: the dense team kernels may hold OpenMP
     * worksharing, which would bind to the decode team around a chunk's call. */
    qgemm_fn gemm[2];
    qgemm_fn gemm_i8[2];
} spqr_matrix;

/* Tiles per chunk of a call on n rows: as many as keep the widened scales and
 * zeros within SPQR_CHUNK_BYTES a row (up to 16 rows: each chunk's call
 * prepares the rows anew, and the widening pays once for all of them), in
 * whole steps of qgemv's tiles side by side. */
static inline int spqr_chunk_tiles(const spqr_matrix *s, int n)
{
    const qmatrix *m = &s->dense;
    const size_t per_tile = (size_t)m->n_groups * m->tu * 2 * sizeof(float);
    int tiles = (int)(SPQR_CHUNK_BYTES * (size_t)(n < 16 ? n : 16) / per_tile);
    if (tiles < 2 * m->gemv_tiles)   /* long rows: still enough tiles to pay for a call's preparation */
        tiles = 2 * m->gemv_tiles;
    return tiles - tiles % m->gemv_tiles;
}

/* Each thread's buffer of widened statistics, kept from call to call while it
 * is at most SPQR_KEPT_BYTES: allocated afresh each call, a few hundred KiB
 * came as new pages the kernel zeroed every time (a tenth of a 4096x11008
 * layer's time). */
#define SPQR_KEPT_BYTES (2u << 20)
static __thread float *stats_buf = NULL;
static __thread size_t stats_len = 0;

static float *stats_buffer(size_t floats)
{
    if (floats > stats_len) {
        free(stats_buf);
        stats_buf = (float *)malloc(sizeof(float) * floats);
        stats_len = stats_buf ? floats : 0;
    }
    return stats_buf;
}

static void stats_buffer_done(void)
{
    if (stats_len * sizeof(float) > SPQR_KEPT_BYTES) {
        free(stats_buf);
        stats_buf = NULL;
        stats_len = 0;
    }
}

/* The records of one run of 16 rows for every group (`groups` records, rh
 * halves apart), lanes lane0 .. lane0+lanes-1 of each, widened: the scale
 * s2 * (code - z2) and the zero point, float32, to sc and zc (group g at
 * g * stride). Three builds of the same arithmetic (no fused multiply-add, so
 * all three give the same bits): the planes become lane masks (AVX-512), lane
 * tests (AVX2), or loops. Each build's body is inlined once with 3-bit codes
 * and statistics as constants (the loops over planes unroll) and once for any. */
#define SPQR_ALWAYS_INLINE static inline __attribute__((always_inline))

SPQR_ALWAYS_INLINE void widen_plain_body(const uint16_t *rec, int groups, int rh, int sb, int zb, int lane0,
                                         int lanes, float *sc, float *zc, size_t stride)
{
    for (int g = 0; g < groups; g++, rec += rh, sc += stride, zc += stride) {
        const float s2 = qm_half_to_float(rec[sb + zb]), z2 = qm_half_to_float(rec[sb + zb + 1]);
        for (int i = 0; i < lanes; i++) {
            int code = 0, zero = 0;
            for (int p = 0; p < sb; p++)
                code |= ((rec[p] >> (lane0 + i)) & 1) << p;
            for (int p = 0; p < zb; p++)
                zero |= ((rec[sb + p] >> (lane0 + i)) & 1) << p;
            sc[i] = s2 * ((float)code - z2);
            zc[i] = (float)zero;
        }
    }
}

static void widen_plain(const uint16_t *rec, int groups, int rh, int sb, int zb, int lane0, int lanes,
                        float *sc, float *zc, size_t stride)
{
    widen_plain_body(rec, groups, rh, sb, zb, lane0, lanes, sc, zc, stride);
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define SPQR_X86 1

#define SPQR_AVX2 __attribute__((target("avx2,f16c")))
#define SPQR_AVX512 __attribute__((target("avx512f,f16c")))

SPQR_ALWAYS_INLINE SPQR_AVX2 __m256i lane_values8(const uint16_t *planes, int count, __m256i bit)
{
    __m256i v = _mm256_setzero_si256();
    for (int p = 0; p < count; p++) {
        const __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(planes[p]), bit), bit);
        v = _mm256_or_si256(v, _mm256_and_si256(set, _mm256_set1_epi32(1 << p)));
    }
    return v;
}

SPQR_ALWAYS_INLINE SPQR_AVX2 void widen_avx2_body(const uint16_t *rec, int groups, int rh, int sb, int zb,
                                                  int lane0, int lanes, float *sc, float *zc, size_t stride)
{
    for (int g = 0; g < groups; g++, rec += rh, sc += stride, zc += stride) {
        const __m128 halves = _mm_cvtph_ps(_mm_cvtsi32_si128(rec[sb + zb] | (int)rec[sb + zb + 1] << 16));
        const __m256 s2 = _mm256_broadcastss_ps(halves), z2 = _mm256_broadcastss_ps(_mm_movehdup_ps(halves));
        for (int i0 = 0; i0 < lanes; i0 += 8) {
            const __m256i bit = _mm256_sllv_epi32(_mm256_set1_epi32(1 << (lane0 + i0)),
                                                  _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
            const __m256i code = lane_values8(rec, sb, bit), zero = lane_values8(rec + sb, zb, bit);
            _mm256_storeu_ps(sc + i0, _mm256_mul_ps(s2, _mm256_sub_ps(_mm256_cvtepi32_ps(code), z2)));
            _mm256_storeu_ps(zc + i0, _mm256_cvtepi32_ps(zero));
        }
    }
}

static SPQR_AVX2 void widen_avx2(const uint16_t *rec, int groups, int rh, int sb, int zb, int lane0, int lanes,
                                 float *sc, float *zc, size_t stride)
{
    if (sb == 3 && zb == 3)
        widen_avx2_body(rec, groups, 8, 3, 3, lane0, lanes, sc, zc, stride);
    else
        widen_avx2_body(rec, groups, rh, sb, zb, lane0, lanes, sc, zc, stride);
}

SPQR_ALWAYS_INLINE SPQR_AVX512 __m512i lane_values16(const uint16_t *planes, int count, int lane0)
{
    __m512i v = _mm512_setzero_si512();
    for (int p = 0; p < count; p++)
        v = _mm512_mask_add_epi32(v, (__mmask16)(planes[p] >> lane0), v, _mm512_set1_epi32(1 << p));
    return v;
}

SPQR_ALWAYS_INLINE SPQR_AVX512 void widen_avx512_body(const uint16_t *rec, int groups, int rh, int sb, int zb,
                                                      int lane0, int lanes, float *sc, float *zc, size_t stride)
{
    const __mmask16 keep = (__mmask16)((1u << lanes) - 1);
    for (int g = 0; g < groups; g++, rec += rh, sc += stride, zc += stride) {
        const __m128 halves = _mm_cvtph_ps(_mm_cvtsi32_si128(rec[sb + zb] | (int)rec[sb + zb + 1] << 16));
        const __m512 s2 = _mm512_broadcastss_ps(halves), z2 = _mm512_broadcastss_ps(_mm_movehdup_ps(halves));
        const __m512i code = lane_values16(rec, sb, lane0), zero = lane_values16(rec + sb, zb, lane0);
        _mm512_mask_storeu_ps(sc, keep, _mm512_mul_ps(s2, _mm512_sub_ps(_mm512_cvtepi32_ps(code), z2)));
        _mm512_mask_storeu_ps(zc, keep, _mm512_cvtepi32_ps(zero));
    }
}

static SPQR_AVX512 void widen_avx512(const uint16_t *rec, int groups, int rh, int sb, int zb, int lane0,
                                     int lanes, float *sc, float *zc, size_t stride)
{
    if (sb == 3 && zb == 3)
        widen_avx512_body(rec, groups, 8, 3, 3, lane0, lanes, sc, zc, stride);
    else
        widen_avx512_body(rec, groups, rh, sb, zb, lane0, lanes, sc, zc, stride);
}
#else
#define SPQR_X86 0
#endif

typedef void (*widen_fn)(const uint16_t *rec, int groups, int rh, int sb, int zb, int lane0, int lanes,
                         float *sc, float *zc, size_t stride);

/* The widest build this CPU runs; QINFER_AVX512=0 holds it to AVX2 (as it
 * does the float kernels), so the tests reach every build here. */
static widen_fn spqr_widen_build(void)
{
    static widen_fn chosen = NULL;
    if (!chosen) {
        widen_fn fn = widen_plain;
#if SPQR_X86
        const char *avx512 = getenv("QINFER_AVX512");
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c"))
            fn = widen_avx2;
        if (__builtin_cpu_supports("avx512f") && !(avx512 && avx512[0] == '0'))
            fn = widen_avx512;
#endif
        chosen = fn;
    }
    return chosen;
}

/* Widen the statistics of `count` tiles from tile t0 into scales and zeros,
 * each [count][n_groups][tu] float32 (the layout qmatrix.h gives them). */
static void spqr_widen(const spqr_matrix *s, int t0, int count, float *scales, float *zeros)
{
    const qmatrix *m = &s->dense;
    const int tu = m->tu, rh = s->record_halves;
    const int lanes = tu < SPQR_RUN ? tu : SPQR_RUN;
    const widen_fn widen = spqr_widen_build();
    for (int t = 0; t < count; t++) {
        for (int i0 = 0; i0 < tu; i0 += lanes) {
            const int row0 = (t0 + t) * tu + i0;
            const size_t at = (size_t)t * m->n_groups * tu + i0;
            widen(s->records + (size_t)(row0 / SPQR_RUN) * m->n_groups * rh, m->n_groups, rh, s->stat_bits,
                  m->bits, row0 % SPQR_RUN, lanes, scales + at, zeros + at, (size_t)tu);
        }
    }
}

/* The dense part of tiles t0 .. t0+count-1 as a qmatrix of its own, its
 * statistics widened into buf (2 * count * n_groups * tu floats). */
static inline void spqr_view(const spqr_matrix *s, int t0, int count, float *buf, qmatrix *v)
{
    const qmatrix *m = &s->dense;
    const size_t tile_words = (size_t)m->in_features * m->bits / 32 * m->tu;
    const size_t stats = (size_t)count * m->n_groups * m->tu;
    spqr_widen(s, t0, count, buf, buf + stats);
    *v = *m;
    v->n_tiles = count;
    v->out_features = (t0 + count) * m->tu <= m->out_features ? count * m->tu : m->out_features - t0 * m->tu;
    v->words = m->words + (size_t)t0 * tile_words;
    v->scales = buf;
    v->zeros = buf + stats;
    v->half_scales = 0;
    v->zero_groups = m->n_groups;
}

/* Output row j's outliers times one row of x: four interleaved partial sums
 * (entry k goes to sum k % 4, each summed in table order), then
 * (a0 + a1) + (a2 + a3): four chains instead of one long one. Several rows of
 * x (a prefill, a batched step) are taken transposed, xt [in][n], and summed
 * side by side, lane r doing row r's operations in that same order: the same
 * bits as one row at a time. Each adder is built twice, widening float16 bit
 * by bit or with F16C (the AVX2 target: no fused multiply-add, the same values). */
#define SPQR_OUTLIER_ADDERS(suffix, attributes, widen_half)                                           \
static attributes void add_outliers_row##suffix(const spqr_matrix *s, int j0, int j1, const float *x,  \
                                                float *y)                                             \
{                                                                                                     \
    for (int j = j0; j < j1; j++) {                                                                   \
        float a[4] = {0.0f, 0.0f, 0.0f, 0.0f};                                                        \
        for (int k = s->outlier_rows[j], i = 0; k < s->outlier_rows[j + 1]; k++, i = (i + 1) & 3)      \
            a[i] += widen_half(s->outlier_vals[k]) * x[s->outlier_cols[k]];                           \
        y[j - j0] += (a[0] + a[1]) + (a[2] + a[3]);                                                   \
    }                                                                                                 \
}                                                                                                     \
                                                                                                      \
static attributes void add_outliers_rows##suffix(const spqr_matrix *s, int j0, int j1, const float *xt, \
                                                 int n, float *y, size_t ldy, float *a)               \
{                                                                                                     \
    for (int j = j0; j < j1; j++) {                                                                   \
        memset(a, 0, sizeof(float) * 4 * (size_t)n);                                                 \
        for (int k = s->outlier_rows[j], i = 0; k < s->outlier_rows[j + 1]; k++, i = (i + 1) & 3) {    \
            const float v = widen_half(s->outlier_vals[k]);                                           \
            const float *xc = xt + (size_t)s->outlier_cols[k] * n;                                    \
            float *ai = a + (size_t)i * n;                                                            \
            for (int r = 0; r < n; r++)                                                               \
                ai[r] += v * xc[r];                                                                   \
        }                                                                                             \
        for (int r = 0; r < n; r++)                                                                   \
            y[(size_t)r * ldy + (j - j0)] += (a[r] + a[n + r]) + (a[2 * n + r] + a[3 * n + r]);       \
    }                                                                                                 \
}

SPQR_OUTLIER_ADDERS(_plain, , qm_half_to_float)
#if SPQR_X86
SPQR_OUTLIER_ADDERS(_avx2, __attribute__((target("avx2,f16c"))), _cvtsh_ss)
#endif

static inline int spqr_has_outliers(const spqr_matrix *s)
{
    return s->outlier_rows[s->dense.out_features] > 0;
}

/* What the outlier adder reads of one call's rows: x as given, and for
 * several rows x transposed and the partial sums' room. */
typedef struct {
    const float *x;   /* [n][in] */
    float *xt;        /* [in][n] when n > 1, else NULL */
    float *sums;      /* [4][n] when n > 1 */
    int n;
} outlier_input;

/* Set up `in` for n rows of x (a thread's own copy); -1 when out of memory. */
static int outlier_input_init(const spqr_matrix *s, const float *x, int n, outlier_input *in)
{
    const int K = s->dense.in_features;
    in->x = x;
    in->n = n;
    in->xt = in->sums = NULL;
    if (n == 1 || !spqr_has_outliers(s))
        return 0;
    in->xt = (float *)malloc(sizeof(float) * (size_t)K * n);
    in->sums = (float *)malloc(sizeof(float) * 4 * (size_t)n);
    if (!in->xt || !in->sums)
        return -1;
    for (int r = 0; r < n; r++)
        for (int k = 0; k < K; k++)
            in->xt[(size_t)k * n + r] = x[(size_t)r * K + k];
    return 0;
}

static void outlier_input_free(outlier_input *in)
{
    free(in->xt);
    free(in->sums);
}

/* y[r][j - j0] += the outliers of output rows j0 .. j1-1 times x[r], for the
 * rows of `in` (y: ldy apart). */
static inline void spqr_add_outliers(const spqr_matrix *s, int j0, int j1, const outlier_input *in,
                                     float *y, size_t ldy)
{
    if (s->outlier_rows[j1] == s->outlier_rows[j0])
        return;
#if SPQR_X86
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) {
        if (in->n == 1)
            add_outliers_row_avx2(s, j0, j1, in->x, y);
        else
            add_outliers_rows_avx2(s, j0, j1, in->xt, in->n, y, ldy, in->sums);
        return;
    }
#endif
    if (in->n == 1)
        add_outliers_row_plain(s, j0, j1, in->x, y);
    else
        add_outliers_rows_plain(s, j0, j1, in->xt, in->n, y, ldy, in->sums);
}

/* y[n][out] for the output tiles first .. last-1 (one thread's share):
 * chunk by chunk, the dense kernel `dense` (the layer's own per-call qgemm_fn,
 * run on one thread: its OpenMP constructs then bind to a region of its own,
 * not to an enclosing decode team's) on a view of the chunk's tiles, then
 * those rows' outliers. One row is written in place; several go through `out`. */
static int spqr_share(const spqr_matrix *s, qgemm_fn dense, const float *x, int n, float *y, int first, int last)
{
    const qmatrix *m = &s->dense;
    const int chunk = spqr_chunk_tiles(s, n), tu = m->tu;
    float *buf = stats_buffer(2 * (size_t)chunk * m->n_groups * tu);
    float *out = n > 1 ? (float *)malloc(sizeof(float) * (size_t)n * chunk * tu) : NULL;
    outlier_input in;
    const int no_input = outlier_input_init(s, x, n, &in);   /* frees safely even when it fails */
    int rc = !dense || !buf || (n > 1 && !out) || no_input ? -1 : 0;
    for (int t0 = first; t0 < last && !rc; t0 += chunk) {
        const int count = last - t0 < chunk ? last - t0 : chunk;
        const int j0 = t0 * tu;
        qmatrix v;
        spqr_view(s, t0, count, buf, &v);
        const int width = v.out_features;
        float *yv = n > 1 ? out : y + j0;
        rc = dense(&v, x, n, yv, 1);
        if (rc)
            break;
        spqr_add_outliers(s, j0, j0 + width, &in, yv, (size_t)width);
        for (int r = 0; n > 1 && r < n; r++)
            memcpy(y + (size_t)r * m->out_features + j0, out + (size_t)r * width, sizeof(float) * width);
    }
    outlier_input_free(&in);
    stats_buffer_done();
    free(out);
    return rc;
}

/* y[n][out] = x[n][in] @ W^T (qgemm_fn), each thread of a region of its own a
 * contiguous run of tiles. */
static int spqr_gemm_with(const spqr_matrix *s, qgemm_fn dense, const float *x, int n, float *y, int nthreads)
{
    const qmatrix *m = &s->dense;
    int failed = 0;
    #pragma omp parallel num_threads(team_thread_count(nthreads)) reduction(|:failed)
    {
#ifdef _OPENMP
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
#else
        const int t = 0, T = 1;
#endif
        failed = spqr_share(s, dense, x, n, y, (int)((long)m->n_tiles * t / T),
                            (int)((long)m->n_tiles * (t + 1) / T)) != 0;
    }
    return failed ? -1 : 0;
}

/* The same inside the caller's thread team (qgemv_team_fn, qgemm_team_fn): this
 * thread's share of the tiles, no barrier (y is whole at the caller's). Layers
 * of whole tiles, as the dense team kernels. */
static int spqr_team_with(const spqr_matrix *s, qgemm_fn dense, const float *x, int n, float *y, const team *tm)
{
    const qmatrix *m = &s->dense;
    if (!qm_whole_tiles(m))
        return -1;
    int first, last;
    team_share(tm, m->n_tiles, &first, &last);
    return spqr_share(s, dense, x, n, y, first, last);
}

/* The entry points the forward pass and QuantizedLinear-like callers take
 * (qmatrix.h's function types): m is the dense member of a spqr_matrix. */
#define SPQR_OF(m) ((const spqr_matrix *)(const void *)(m))

static int spqr_gemm_scalar(const qmatrix *m, const float *x, int n, float *y, int nthreads)
{
    return spqr_gemm_with(SPQR_OF(m), SPQR_OF(m)->gemm[0], x, n, y, nthreads);
}

static int spqr_gemm_avx2(const qmatrix *m, const float *x, int n, float *y, int nthreads)
{
    return spqr_gemm_with(SPQR_OF(m), SPQR_OF(m)->gemm[1], x, n, y, nthreads);
}

static int spqr_gemm_i8_scalar(const qmatrix *m, const float *x, int n, float *y, int nthreads)
{
    return spqr_gemm_with(SPQR_OF(m), SPQR_OF(m)->gemm_i8[0], x, n, y, nthreads);
}

static int spqr_gemm_i8_avx2(const qmatrix *m, const float *x, int n, float *y, int nthreads)
{
    return spqr_gemm_with(SPQR_OF(m), SPQR_OF(m)->gemm_i8[1], x, n, y, nthreads);
}

static int spqr_team(const qmatrix *m, const float *x, float *y, const team *tm)
{
    return spqr_team_with(SPQR_OF(m), SPQR_OF(m)->gemm[1], x, 1, y, tm);
}

static int spqr_team_i8(const qmatrix *m, const float *x, float *y, const team *tm)
{
    return spqr_team_with(SPQR_OF(m), SPQR_OF(m)->gemm_i8[1], x, 1, y, tm);
}

static int spqr_rows_team_i8(const qmatrix *m, const float *x, int n, float *y, const team *tm)
{
    return spqr_team_with(SPQR_OF(m), SPQR_OF(m)->gemm_i8[1], x, n, y, tm);
}

#endif
