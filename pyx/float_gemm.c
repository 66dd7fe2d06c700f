/* float_gemm.c: linear maps with float32 or float16 weights (a float
 * checkpoint's layers, a float16 LM head): one dot product per output, or
 * AVX2 register blocks that share every load. Part of _forward.pyx's
 * translation unit (forward.h). */
#include "forward.h"

QI_VECTORIZE
static float dot(const float *a, const float *b, int n)
{
    float sum = 0.0f;
    #pragma omp simd reduction(+:sum)
    for (int i = 0; i < n; i++)
        sum += a[i] * b[i];
    return sum;
}

/* y[n][out] = x[n][in] @ w[out][in]^T, float32 weights: one dot product per output. */
QI_VECTORIZE
static void float_matmul_portable(const linear *l, const float *x, int n, float *y, int nthreads)
{
    int o;
    #pragma omp parallel for schedule(static) num_threads(team_thread_count(nthreads))
    for (o = 0; o < l->out; o++) {
        const float *row = l->w + (size_t)o * l->in;
        for (int t = 0; t < n; t++)
            y[(size_t)t * l->out + o] = dot(row, x + (size_t)t * l->in, l->in);
    }
}

#if defined(__GNUC__) && defined(__x86_64__)
#define QI_HAVE_AVX2_GEMM 1
#define GEMM_ROWS 3          /* weight rows per block: 3 x 4 accumulators + 3 + 1 operands = 16 registers */
#define GEMM_TOKENS 4
#define GEMM_TOKEN_CHUNK 64  /* tokens whose activations stay in L2 while the weights stream past */

__attribute__((target("avx2,fma")))
static inline float hsum256(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The prefill path: a block of 3 weight rows x 4 tokens shares every load. */
__attribute__((target("avx2,fma")))
static void gemm_block(const float *w, const float *x, int in, int out, float *y)
{
    const int vec_end = in & ~7;
    __m256 acc[GEMM_ROWS][GEMM_TOKENS];
    for (int r = 0; r < GEMM_ROWS; r++)
        for (int c = 0; c < GEMM_TOKENS; c++)
            acc[r][c] = _mm256_setzero_ps();
    for (int i = 0; i < vec_end; i += 8) {
        __m256 wr[GEMM_ROWS];
        for (int r = 0; r < GEMM_ROWS; r++)
            wr[r] = _mm256_loadu_ps(w + (size_t)r * in + i);
        for (int c = 0; c < GEMM_TOKENS; c++) {
            const __m256 xv = _mm256_loadu_ps(x + (size_t)c * in + i);
            for (int r = 0; r < GEMM_ROWS; r++)
                acc[r][c] = _mm256_fmadd_ps(wr[r], xv, acc[r][c]);
        }
    }
    for (int r = 0; r < GEMM_ROWS; r++)
        for (int c = 0; c < GEMM_TOKENS; c++) {
            float sum = hsum256(acc[r][c]);
            for (int i = vec_end; i < in; i++)
                sum += w[(size_t)r * in + i] * x[(size_t)c * in + i];
            y[(size_t)c * out + r] = sum;
        }
}

/* The decode path (one token): GEMV_ROWS weight rows at a time with two accumulators
 * each. One dot product at a time is a single chain of FMAs, paced by their latency:
 * on long rows (a 7B model's float LM head) that is slower than memory. */
#define GEMV_ROWS 4
#define GEMV_RUN_BYTES (256 * 1024)
__attribute__((target("avx2,fma")))
static void gemv_rows(const float *w, const float *x, int in, float *y)
{
    const int vec_end = in & ~15;
    __m256 acc[GEMV_ROWS][2];
    for (int r = 0; r < GEMV_ROWS; r++)
        acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int i = 0; i < vec_end; i += 16) {
        const __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
        for (int r = 0; r < GEMV_ROWS; r++) {
            acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(w + (size_t)r * in + i), x0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(w + (size_t)r * in + i + 8), x1, acc[r][1]);
        }
    }
    for (int r = 0; r < GEMV_ROWS; r++) {
        float sum = hsum256(_mm256_add_ps(acc[r][0], acc[r][1]));
        for (int i = vec_end; i < in; i++)
            sum += w[(size_t)r * in + i] * x[i];
        y[r] = sum;
    }
}

__attribute__((target("avx2,fma")))
static void float_gemv_avx2(const linear *l, const float *x, float *y, int nthreads)
{
    const int in = l->in, out = l->out, blocks = (out + GEMV_ROWS - 1) / GEMV_ROWS;
    /* runs of about GEMV_RUN_BYTES of weights, taken in turn: a fixed half per thread left
     * one core waiting for the other whenever their share of the memory bandwidth differed */
    const size_t block_bytes = (size_t)GEMV_ROWS * in * sizeof(float);
    const int run = block_bytes >= GEMV_RUN_BYTES ? 1 : (int)(GEMV_RUN_BYTES / block_bytes);
    int b;
    #pragma omp parallel for schedule(dynamic, run) num_threads(team_thread_count(nthreads))
    for (b = 0; b < blocks; b++) {
        const int o0 = b * GEMV_ROWS;
        if (o0 + GEMV_ROWS <= out) {
            gemv_rows(l->w + (size_t)o0 * in, x, in, y + o0);
            continue;
        }
        for (int o = o0; o < out; o++)     /* ragged edge */
            y[o] = dot(l->w + (size_t)o * in, x, in);
    }
}

__attribute__((target("avx2,fma")))
static void float_matmul_avx2(const linear *l, const float *x, int n, float *y, int nthreads)
{
    const int in = l->in, out = l->out, blocks = (out + GEMM_ROWS - 1) / GEMM_ROWS;
    #pragma omp parallel num_threads(team_thread_count(nthreads))
    for (int t0 = 0; t0 < n; t0 += GEMM_TOKEN_CHUNK) {
        const int t1 = t0 + GEMM_TOKEN_CHUNK < n ? t0 + GEMM_TOKEN_CHUNK : n;
        int b;
        #pragma omp for schedule(static)
        for (b = 0; b < blocks; b++) {
            const int o0 = b * GEMM_ROWS;
            for (int t = t0; t < t1; t += GEMM_TOKENS) {
                if (o0 + GEMM_ROWS <= out && t + GEMM_TOKENS <= t1) {
                    gemm_block(l->w + (size_t)o0 * in, x + (size_t)t * in, in, out, y + (size_t)t * out + o0);
                    continue;
                }
                for (int o = o0; o < o0 + GEMM_ROWS && o < out; o++)     /* ragged edge */
                    for (int c = t; c < t + GEMM_TOKENS && c < t1; c++)
                        y[(size_t)c * out + o] = dot(l->w + (size_t)o * in, x + (size_t)c * in, in);
            }
        }
    }
}
#else
#define QI_HAVE_AVX2_GEMM 0
#endif

static int cpu_avx2_fma = -1;
static int cpu_f16c;

static void check_cpu(void)
{
    if (cpu_avx2_fma >= 0)
        return;
#if QI_HAVE_AVX2_GEMM
    __builtin_cpu_init();
    cpu_f16c = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    cpu_avx2_fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    cpu_f16c = 0;
    cpu_avx2_fma = 0;
#endif
}

#if QI_HAVE_AVX2_GEMM
/* float16 -> float32, 8 at a time; returns how many it did (count rounded down to 8). */
__attribute__((target("avx2,f16c")))
static size_t widen_f16c(const uint16_t *h, size_t count, float *out)
{
    size_t i = 0;
    for (; i + 8 <= count; i += 8)
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
    return i;
}

/* gemv_rows on float16 rows, widened in registers: the same products and sums. */
__attribute__((target("avx2,fma,f16c")))
static void gemv_rows_f16c(const uint16_t *w, const float *x, int in, float *y)
{
    const int vec_end = in & ~15;
    __m256 acc[GEMV_ROWS][2];
    for (int r = 0; r < GEMV_ROWS; r++)
        acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int i = 0; i < vec_end; i += 16) {
        const __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
        for (int r = 0; r < GEMV_ROWS; r++) {
            const uint16_t *row = w + (size_t)r * in + i;
            acc[r][0] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)row)), x0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 8))), x1, acc[r][1]);
        }
    }
    for (int r = 0; r < GEMV_ROWS; r++) {
        float sum = hsum256(_mm256_add_ps(acc[r][0], acc[r][1]));
        for (int i = vec_end; i < in; i++)
            sum += qm_half_to_float(w[(size_t)r * in + i]) * x[i];
        y[r] = sum;
    }
}
#endif

static void float_matmul(const linear *l, const float *x, int n, float *y, int nthreads)
{
    check_cpu();
#if QI_HAVE_AVX2_GEMM
    if (cpu_avx2_fma) {
        if (n == 1)
            float_gemv_avx2(l, x, y, nthreads);
        else
            float_matmul_avx2(l, x, n, y, nthreads);
        return;
    }
#endif
    float_matmul_portable(l, x, n, y, nthreads);
}

/* float16 weights: HALF_ROWS rows at a time are widened into a float32 buffer of the
 * thread's, then multiplied exactly as float32 rows are (the same blocks, the same order of
 * the sums): the same results as the weights held in float32, from half the bytes. */
#define HALF_ROWS 12    /* a multiple of GEMM_ROWS and of GEMV_ROWS, so the blocks line up */
#if QI_HAVE_AVX2_GEMM
_Static_assert(HALF_ROWS % GEMM_ROWS == 0 && HALF_ROWS % GEMV_ROWS == 0, "half_matmul's blocks line up");
#endif

static void widen_rows(const uint16_t *h, size_t count, float *out)
{
    size_t i = 0;
#if QI_HAVE_AVX2_GEMM
    if (cpu_f16c)
        i = widen_f16c(h, count, out);
#endif
    for (; i < count; i++)
        out[i] = qm_half_to_float(h[i]);
}

/* y[t * ldy + r] = w[r] . x[t] for r < rows, t < n. */
static void rows_times_x(const float *w, int rows, int in, const float *x, int n, float *y, int ldy)
{
#if QI_HAVE_AVX2_GEMM
    if (cpu_avx2_fma) {
        for (int t = 0; t < n; t += GEMM_TOKENS)
            for (int r = 0; r < rows; r += n == 1 ? GEMV_ROWS : GEMM_ROWS) {
                if (n == 1 && r + GEMV_ROWS <= rows) {
                    gemv_rows(w + (size_t)r * in, x, in, y + r);
                    continue;
                }
                if (n > 1 && r + GEMM_ROWS <= rows && t + GEMM_TOKENS <= n) {
                    gemm_block(w + (size_t)r * in, x + (size_t)t * in, in, ldy, y + (size_t)t * ldy + r);
                    continue;
                }
                const int r_end = n == 1 ? GEMV_ROWS : GEMM_ROWS;
                for (int o = r; o < r + r_end && o < rows; o++)     /* ragged edge */
                    for (int c = t; c < t + GEMM_TOKENS && c < n; c++)
                        y[(size_t)c * ldy + o] = dot(w + (size_t)o * in, x + (size_t)c * in, in);
            }
        return;
    }
#endif
    for (int r = 0; r < rows; r++)
        for (int t = 0; t < n; t++)
            y[(size_t)t * ldy + r] = dot(w + (size_t)r * in, x + (size_t)t * in, in);
}

static int half_matmul(const linear *l, const float *x, int n, float *y, int nthreads)
{
    const int in = l->in, out = l->out, blocks = (out + HALF_ROWS - 1) / HALF_ROWS;
    check_cpu();
    int failed = 0;
    #pragma omp parallel num_threads(team_thread_count(nthreads)) reduction(|:failed)
    {
        float *rows = NULL;     /* the widened rows, allocated when a block first needs them */
        int b;
        #pragma omp for schedule(dynamic, 4)
        for (b = 0; b < blocks; b++) {
            const int o0 = b * HALF_ROWS, count = out - o0 < HALF_ROWS ? out - o0 : HALF_ROWS;
#if QI_HAVE_AVX2_GEMM
            if (n == 1 && count == HALF_ROWS && cpu_avx2_fma && cpu_f16c) {   /* decode: no buffer */
                for (int r = 0; r < HALF_ROWS; r += GEMV_ROWS)
                    gemv_rows_f16c(l->w16 + (size_t)(o0 + r) * in, x, in, y + o0 + r);
                continue;
            }
#endif
            if (!rows && !(rows = (float *)malloc(sizeof(float) * HALF_ROWS * (size_t)in))) {
                failed = 1;
                continue;
            }
            widen_rows(l->w16 + (size_t)o0 * in, (size_t)count * in, rows);
            rows_times_x(rows, count, in, x, n, y + o0, out);
        }
        free(rows);
    }
    return failed ? -1 : 0;
}
