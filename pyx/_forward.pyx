# cython: language_level=3
"""The LLaMA forward pass: one call per step (a prefill of n tokens, or one
decode step), in C without the GIL and without numpy.

The C below reads top to bottom like llama2.c's run.c: the model's weights
(`weights`), the buffers one step needs (`run_state`), the KV cache, then one
function per step of the transformer. Linear layers are either quantized
(a qmatrix and the generated kernel for its bitwidth) or float32.
Float loops are compiled twice (AVX2+FMA and baseline) and picked by the
dynamic loader (GCC target_clones), so they vectorize where the CPU can.
"""
from cpython.pycapsule cimport PyCapsule_GetPointer
from libc.stdint cimport int32_t, uint16_t
from libc.stdlib cimport malloc, calloc, free

cdef extern from "qmatrix.h":
    ctypedef struct qmatrix:
        pass
    ctypedef int (*qgemm_fn)(const qmatrix *m, const float *x, int n, float *y, int nthreads) noexcept nogil
    ctypedef struct team:
        pass
    ctypedef int (*qgemv_team_fn)(const qmatrix *m, const float *x, float *y, const team *tm) noexcept nogil

cdef extern from *:
    """
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif
#include <string.h>
#include "qmatrix.h"
#include "team.h"
#ifdef _OPENMP
#include <omp.h>
#endif

/* One clone for x86-64-v3 (AVX2 and FMA together) and one baseline. Not
 * target_clones("avx2,fma"): that makes an AVX2 clone without FMA and an FMA
 * clone without AVX2, and the resolver picks the first. */
#if defined(__GNUC__) && __GNUC__ >= 12 && defined(__x86_64__) && defined(__linux__) && !defined(__clang__)
#define QI_VECTORIZE __attribute__((target_clones("arch=x86-64-v3", "default")))
#elif defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(__clang__)
#define QI_VECTORIZE __attribute__((target_clones("avx2", "default")))
#else
#define QI_VECTORIZE
#endif

/* ----------------------------------------------------------------- weights */

typedef struct {
    const qmatrix *q;     /* quantized: the packed layer ... */
    qgemm_fn qgemm;       /* ... and the kernel for its bitwidth */
    qgemm_fn qgemm_i8;    /* NULL, or the int8-activation kernel (Engine(activations="int8")) */
    qgemv_team_fn team;   /* NULL, or the decode kernel's twin for the decode team (decode_team) */
    const float *w;       /* float32: [out][in] (Hugging Face orientation) */
    const uint16_t *w16;  /* or float16, the same layout (a float16 checkpoint's LM head) */
    int in, out;
} linear;

/* A block's linear maps. Stacked maps: when wqkv is set (quantized models,
 * qinfer/model.py), it holds wq, wk and wv one above the other and replaces
 * them, so the three projections of the same input are one kernel call (one
 * pass of the threads, one preparation of the input) and wq/wk/wv are unset;
 * w_gate_up likewise stacks w_gate over w_up. */
typedef struct {
    const float *attn_norm;     /* [dim] */
    linear wq, wk, wv, wo;      /* dim -> n_heads*head_dim, dim -> kv_dim (x2), n_heads*head_dim -> dim */
    linear wqkv;                /* dim -> n_heads*head_dim + 2*kv_dim, or unset */
    const float *ffn_norm;      /* [dim] */
    linear w_gate, w_up, w_down;
    linear w_gate_up;           /* dim -> 2*hidden_dim, or unset */
} layer_weights;

typedef struct {
    int dim, hidden_dim, n_layers, n_heads, n_kv_heads, head_dim, vocab_size, ctx;
    float eps;
    const float *embedding;     /* [vocab][dim] float32, or */
    const uint16_t *embedding16;    /* [vocab][dim] float16 (a float16 checkpoint's table), or */
    const qmatrix *embedding_q;     /* dim -> vocab packed (a quantized table, rows widened on lookup) */
    layer_weights *layers;      /* [n_layers] */
    const float *final_norm;    /* [dim] */
    linear lm_head;             /* dim -> vocab */
    const float *inv_freq;      /* [head_dim/2]: RoPE frequencies, scaling applied */
} weights;

/* ------------------------------------------------------------ buffers */

typedef struct {
    int max_tokens;   /* rows every buffer below has room for */
    int threads;      /* rows of `scores` */
    float *x;         /* [T][dim]        the residual stream */
    float *xb;        /* [T][dim]        normalized input of a block */
    float *proj;      /* [T][dim]        output of wo / w_down before the residual add */
    float *q;         /* [T][n_heads*head_dim] */
    float *att;       /* [T][n_heads*head_dim]  attention output per head */
    float *gate;      /* [T][hidden_dim] */
    float *up;        /* [T][hidden_dim] */
    float *scores;    /* [threads][QUERY_TOKENS*group][ctx]  attention scores of one query tile */
    float *cos_sin;   /* [T][head_dim]   cos (first half) and sin (second half) per position */
    float *k;         /* [T][kv_dim]     new keys, before RoPE and the move into the cache */
    float *v;         /* [T][kv_dim]     new values */
    float *stacked;   /* [T][widest stacked map]  output of wqkv / w_gate_up (NULL when none) */
    /* The KV cache. Keys are stored transposed in blocks of KV_BLOCK positions,
     * [n_layers][n_kv_heads][ctx/KV_BLOCK][head_dim][KV_BLOCK], so the scores of a
     * block are KV_BLOCK-wide vector FMAs with no horizontal sums; values are
     * [n_layers][n_kv_heads][ctx][head_dim] (each probability scales one row). */
    float *key_cache;
    float *value_cache;
    int ctx_blocks;   /* ctx rounded up to whole KV_BLOCKs, in blocks */
    int decode_team;  /* 1: a decode step runs as one thread team when every layer can (decode_team) */
    team_governor decode_governor;    /* how many threads decode steps run with (team.h) ... */
    team_governor prefill_governor;   /* ... and each block of a prefill */
} run_state;

#define KV_BLOCK 32
/* Prefill's row-wise steps (norms, RoPE, the cache write, SwiGLU, residual
 * adds) share their rows out among the threads; fewer rows than this (decode)
 * are too little work to wake them for. */
#define PARALLEL_ROWS 4
#define QUERY_TOKENS 8   /* tokens per attention tile (see attention_tile) */

static int is_set(const linear *l)
{
    return l->q != NULL || l->w != NULL || l->w16 != NULL;
}

static void free_state(run_state *s)
{
    free(s->x); free(s->xb); free(s->proj); free(s->q); free(s->att);
    free(s->gate); free(s->up); free(s->scores); free(s->cos_sin);
    free(s->k); free(s->v); free(s->stacked); free(s->key_cache); free(s->value_cache);
    memset(s, 0, sizeof(*s));
}

/* Floats of `scores` one attention thread uses: a query tile's rows over the whole context. */
static size_t scores_per_thread(const weights *w, const run_state *s)
{
    return (size_t)QUERY_TOKENS * (w->n_heads / w->n_kv_heads) * s->ctx_blocks * KV_BLOCK;
}

/* Room for `threads` attention threads, when a call asks for more than the state was made for. */
static int grow_threads(run_state *s, const weights *w, int threads)
{
    if (threads <= s->threads)
        return 0;
    float *scores = realloc(s->scores, sizeof(float) * (size_t)threads * scores_per_thread(w, s));
    if (!scores)
        return -1;
    s->scores = scores;
    s->threads = threads;
    return 0;
}

static int alloc_state(run_state *s, const weights *w, int max_tokens, int threads)
{
    const size_t T = (size_t)max_tokens, q_dim = (size_t)w->n_heads * w->head_dim;
    const size_t kv_dim = (size_t)w->n_kv_heads * w->head_dim;
    memset(s, 0, sizeof(*s));
    s->max_tokens = max_tokens;
    s->threads = threads;
    s->decode_team = 1;
    governor_init(&s->decode_governor, 2);
    governor_init(&s->prefill_governor, 2);
    s->x = malloc(sizeof(float) * T * w->dim);
    s->xb = malloc(sizeof(float) * T * w->dim);
    s->proj = malloc(sizeof(float) * T * w->dim);
    s->q = malloc(sizeof(float) * T * q_dim);
    s->att = malloc(sizeof(float) * T * q_dim);
    s->gate = malloc(sizeof(float) * T * w->hidden_dim);
    s->up = malloc(sizeof(float) * T * w->hidden_dim);
    s->ctx_blocks = (w->ctx + KV_BLOCK - 1) / KV_BLOCK;
    const size_t cache = (size_t)w->n_layers * s->ctx_blocks * KV_BLOCK * kv_dim;
    s->scores = malloc(sizeof(float) * (size_t)threads * scores_per_thread(w, s));
    s->cos_sin = malloc(sizeof(float) * T * w->head_dim);
    s->k = malloc(sizeof(float) * T * kv_dim);
    s->v = malloc(sizeof(float) * T * kv_dim);
    s->key_cache = calloc(cache, sizeof(float));
    s->value_cache = calloc(cache, sizeof(float));
    size_t stacked = 0;
    for (int l = 0; l < w->n_layers; l++) {
        if (is_set(&w->layers[l].wqkv) && stacked < q_dim + 2 * kv_dim)
            stacked = q_dim + 2 * kv_dim;
        if (is_set(&w->layers[l].w_gate_up) && stacked < 2 * (size_t)w->hidden_dim)
            stacked = 2 * (size_t)w->hidden_dim;
    }
    s->stacked = stacked ? malloc(sizeof(float) * T * stacked) : NULL;
    if (!s->x || !s->xb || !s->proj || !s->q || !s->att || !s->gate || !s->up || !s->scores ||
        !s->cos_sin || !s->k || !s->v || !s->key_cache || !s->value_cache || (stacked && !s->stacked)) {
        free_state(s);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------ the steps */

static int thread_count(int nthreads)
{
#ifdef _OPENMP
    return nthreads > 0 ? nthreads : omp_get_max_threads();
#else
    (void)nthreads;
    return 1;
#endif
}

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
    #pragma omp parallel for schedule(static) num_threads(thread_count(nthreads))
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
    #pragma omp parallel for schedule(dynamic, run) num_threads(thread_count(nthreads))
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
    #pragma omp parallel num_threads(thread_count(nthreads))
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
    #pragma omp parallel num_threads(thread_count(nthreads)) reduction(|:failed)
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

static int matmul(const linear *l, const float *x, int n, float *y, int nthreads)
{
    if (l->q)
        return (l->qgemm_i8 ? l->qgemm_i8 : l->qgemm)(l->q, x, n, y, nthreads);
    if (l->w16)
        return half_matmul(l, x, n, y, nthreads);
    float_matmul(l, x, n, y, nthreads);
    return 0;
}

static void embed(const weights *w, const int *tokens, int n, float *x)
{
    for (int t = 0; t < n; t++) {
        float *row = x + (size_t)t * w->dim;
        if (w->embedding_q)
            qm_dequantize_column(w->embedding_q, tokens[t], row);
        else if (w->embedding16)
            for (int i = 0; i < w->dim; i++)
                row[i] = qm_half_to_float(w->embedding16[(size_t)tokens[t] * w->dim + i]);
        else
            memcpy(row, w->embedding + (size_t)tokens[t] * w->dim, sizeof(float) * w->dim);
    }
}

/* out = x / sqrt(mean(x^2) + eps) * weight (Hugging Face order of operations) */
QI_VECTORIZE
static void rmsnorm_row(const float *x, const float *weight, int dim, float eps, float *out)
{
    float ss = 0.0f;
    #pragma omp simd reduction(+:ss)
    for (int i = 0; i < dim; i++)
        ss += x[i] * x[i];
    const float inv = 1.0f / sqrtf(ss / dim + eps);
    #pragma omp simd
    for (int i = 0; i < dim; i++)
        out[i] = weight[i] * (x[i] * inv);
}

static void rmsnorm(const float *x, const float *weight, int n, int dim, float eps, float *out, int nthreads)
{
    int t;
    #pragma omp parallel for schedule(static) if(n >= PARALLEL_ROWS) num_threads(thread_count(nthreads))
    for (t = 0; t < n; t++)
        rmsnorm_row(x + (size_t)t * dim, weight, dim, eps, out + (size_t)t * dim);
}

static void rope_tables(const weights *w, int pos, int n, float *cos_sin)
{
    const int half = w->head_dim / 2;
    for (int t = 0; t < n; t++) {
        float *cs = cos_sin + (size_t)t * w->head_dim;
        for (int i = 0; i < half; i++) {
            const float angle = (float)(pos + t) * w->inv_freq[i];
            cs[i] = cosf(angle);
            cs[half + i] = sinf(angle);
        }
    }
}

/* Rotate-half RoPE (Hugging Face order): pairs (i, i + head_dim/2) of every head of one token. */
static void rope_row(float *v, int heads, int head_dim, const float *cs)
{
    const int half = head_dim / 2;
    for (int h = 0; h < heads; h++) {
        float *vh = v + (size_t)h * head_dim;
        for (int i = 0; i < half; i++) {
            const float a = vh[i], b = vh[half + i];
            vh[i] = a * cs[i] - b * cs[half + i];
            vh[half + i] = b * cs[i] + a * cs[half + i];
        }
    }
}

static void rope(float *v, int n, int heads, int head_dim, const float *cos_sin, int nthreads)
{
    int t;
    #pragma omp parallel for schedule(static) if(n >= PARALLEL_ROWS) num_threads(thread_count(nthreads))
    for (t = 0; t < n; t++)
        rope_row(v + (size_t)t * heads * head_dim, heads, head_dim, cos_sin + (size_t)t * head_dim);
}

/* Where a layer's keys and values for one KV head start in the cache. */
static float *key_head(const weights *w, const run_state *s, int layer, int kv_h)
{
    return s->key_cache + ((size_t)layer * w->n_kv_heads + kv_h) * s->ctx_blocks * KV_BLOCK * w->head_dim;
}

static float *value_head(const weights *w, const run_state *s, int layer, int kv_h)
{
    return s->value_cache + ((size_t)layer * w->n_kv_heads + kv_h) * s->ctx_blocks * KV_BLOCK * w->head_dim;
}

/* Move new token t's key and value (after RoPE) into the cache at position p. */
static void store_kv_row(const weights *w, run_state *s, int layer, int t, int p)
{
    const int hd = w->head_dim, kv_dim = w->n_kv_heads * hd, block = p / KV_BLOCK, lane = p % KV_BLOCK;
    for (int h = 0; h < w->n_kv_heads; h++) {
        const float *k = s->k + (size_t)t * kv_dim + h * hd;
        float *kb = key_head(w, s, layer, h) + (size_t)block * hd * KV_BLOCK + lane;
        for (int i = 0; i < hd; i++)
            kb[(size_t)i * KV_BLOCK] = k[i];
        memcpy(value_head(w, s, layer, h) + (size_t)p * hd, s->v + (size_t)t * kv_dim + h * hd,
               sizeof(float) * hd);
    }
}

/* Move the n new keys and values (after RoPE) into the cache at positions pos.. */
static void store_kv(const weights *w, run_state *s, int layer, int pos, int n, int nthreads)
{
    int t;
    #pragma omp parallel for schedule(static) if(n >= PARALLEL_ROWS) num_threads(thread_count(nthreads))
    for (t = 0; t < n; t++)
        store_kv_row(w, s, layer, t, pos + t);
}

/* exp(x) for x <= 0, branch-free so the softmax loop vectorizes: x*log2(e) =
 * n + f with |f| <= 1/2, 2^f by its Taylor series to degree 6 (relative error
 * < 2e-7), 2^n written into the exponent bits. */
static inline float exp_nonpositive(float x)
{
    x = x < -87.0f ? -87.0f : x;                       /* exp(-87) ~ 1.6e-38: as good as 0 */
    const float t = x * 1.44269504088896341f;
    const float n = (t + 12582912.0f) - 12582912.0f;   /* round to nearest: 1.5 * 2^23 */
    const float f = t - n;
    const float p = 1.0f + f * (0.693147181f + f * (0.240226507f + f * (0.0555041087f +
                    f * (0.00961812911f + f * (0.00133335581f + f * 0.000154035304f)))));
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
}

/* Attention is computed for a tile of queries at a time: the heads that
 * share one KV head, for up to QUERY_TOKENS consecutive tokens. Each key and
 * value block of the cache is then read once per tile while it sits in L1,
 * instead of once per query: at a 2048-token prefill one KV head's keys
 * (512 KiB) no longer fit L2, and streaming them per query made attention
 * the larger part of the prefill. */

/* Attention's inner loops work on ROWS_PER_PASS query rows at once, so that
 * each key or value vector loaded from L1 feeds that many multiply-adds
 * instead of one (one row at a time, the loads and not the FMAs set the pace).
 * Three rows of a 32-wide block are 12 accumulators: with the broadcast
 * operand they fit AVX2's 16 registers. GCC/clang vector types keep them in
 * registers (arrays of accumulators get spilled); the baseline clone
 * compiles the same code to SSE. Each row's sums run in the same order as
 * with one row, so the results do not depend on how rows are grouped. */
#define ROWS_PER_PASS 3
typedef float v8f __attribute__((vector_size(32)));
typedef float v8f_unaligned __attribute__((vector_size(32), aligned(4), may_alias));
#define LOAD8(p) (*(const v8f_unaligned *)(p))
#define STORE8(p, v) (*(v8f_unaligned *)(p) = (v))
#define PASS_WIDTH 32   /* floats of a row one pass holds: 4 vectors */

/* acc[r] += coef[r][index] * row[0..PASS_WIDTH) for r < R: the row is loaded
 * once for all R multiply-adds (scores: a key row by q[r][i]; value sums: a
 * value row by p[r][j]). */
static inline __attribute__((always_inline))
void add_scaled_row(v8f acc[][PASS_WIDTH / 8], const float *row, const float *const *coef, int index,
                    const int R)
{
    const v8f r0 = LOAD8(row), r1 = LOAD8(row + 8), r2 = LOAD8(row + 16), r3 = LOAD8(row + 24);
    for (int r = 0; r < R; r++) {
        const float c = coef[r][index];
        acc[r][0] += c * r0;
        acc[r][1] += c * r1;
        acc[r][2] += c * r2;
        acc[r][3] += c * r3;
    }
}

/* scores[r][0..KV_BLOCK) = scale * (q[r] . key) for the KV_BLOCK positions of one key block, r < R */
_Static_assert(KV_BLOCK == PASS_WIDTH, "score_block_rows holds one key block per pass");
static inline __attribute__((always_inline))
void score_block_rows(const float *const *q, const float *key_block, int hd, float scale,
                      float *const *scores, const int R)
{
    v8f acc[ROWS_PER_PASS][PASS_WIDTH / 8];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < PASS_WIDTH / 8; c++)
            acc[r][c] = (v8f){0};
    for (int i = 0; i < hd; i++)
        add_scaled_row(acc, key_block + (size_t)i * KV_BLOCK, q, i, R);
    for (int r = 0; r < R; r++)
        for (int c = 0; c < PASS_WIDTH / 8; c++)
            STORE8(scores[r] + 8 * c, acc[r][c] * scale);
}

QI_VECTORIZE
static void score_block(const float *const *q, const float *key_block, int hd, float scale,
                        float *const *scores, int rows)
{
    if (rows == 3)
        score_block_rows(q, key_block, hd, scale, scores, 3);
    else if (rows == 2)
        score_block_rows(q, key_block, hd, scale, scores, 2);
    else
        score_block_rows(q, key_block, hd, scale, scores, 1);
}

/* scores[0..last] <- softmax(scores[0..last]) */
QI_VECTORIZE
static void softmax(float *scores, int last)
{
    float max = scores[0];
    #pragma omp simd reduction(max:max)
    for (int j = 1; j <= last; j++)
        max = scores[j] > max ? scores[j] : max;
    float sum = 0.0f;
    #pragma omp simd reduction(+:sum)
    for (int j = 0; j <= last; j++) {
        scores[j] = exp_nonpositive(scores[j] - max);
        sum += scores[j];
    }
    const float inv = 1.0f / sum;
    #pragma omp simd
    for (int j = 0; j <= last; j++)
        scores[j] *= inv;
}

/* out[r] += sum_{j in [first, last]} p[r][j] * values[j], r < R. The sums
 * run over all j in registers, VALUE_CHUNK floats of a row at a time, and go
 * back to out once: summed through out itself, every j would load and store
 * the whole row (out may alias values, as far as the compiler knows). */
#define VALUE_CHUNK PASS_WIDTH
static inline __attribute__((always_inline))
void add_values_rows(const float *const *p, const float *values, int hd, int first, int last,
                     float *const *out, const int R)
{
    int i0 = 0;
    for (; i0 + VALUE_CHUNK <= hd; i0 += VALUE_CHUNK) {
        v8f acc[ROWS_PER_PASS][PASS_WIDTH / 8];
        for (int r = 0; r < R; r++)
            for (int c = 0; c < PASS_WIDTH / 8; c++)
                acc[r][c] = LOAD8(out[r] + i0 + 8 * c);
        for (int j = first; j <= last; j++)
            add_scaled_row(acc, values + (size_t)j * hd + i0, p, j, R);
        for (int r = 0; r < R; r++)
            for (int c = 0; c < PASS_WIDTH / 8; c++)
                STORE8(out[r] + i0 + 8 * c, acc[r][c]);
    }
    for (int r = 0; r < R; r++)                  /* a head_dim that is not a multiple of the chunk */
        for (int j = first; j <= last; j++)
            for (int i = i0; i < hd; i++)
                out[r][i] += p[r][j] * values[(size_t)j * hd + i];
}

QI_VECTORIZE
static void add_values(const float *const *p, const float *values, int hd, int first, int last,
                       float *const *out, int rows)
{
    if (rows == 3)
        add_values_rows(p, values, hd, first, last, out, 3);
    else if (rows == 2)
        add_values_rows(p, values, hd, first, last, out, 2);
    else
        add_values_rows(p, values, hd, first, last, out, 1);
}

/* A tile of queries: tokens t0..t0+nt-1 (at positions pos+t) times query heads h0..h0+nh-1,
 * all of one KV head. Row r of the tile is token t0 + r / nh, head h0 + r % nh. */
typedef struct {
    int t0, nt, h0, nh, kv_h;
} query_tile;

static inline size_t tile_offset(const weights *w, const query_tile *tile, int r)
{
    return ((size_t)(tile->t0 + r / tile->nh) * w->n_heads + tile->h0 + r % tile->nh) * w->head_dim;
}

static void attention_tile(const weights *w, run_state *s, int layer, int pos, const query_tile *tile,
                           float *scores, size_t row_len)
{
    const int hd = w->head_dim, rows = tile->nt * tile->nh;
    const float scale = 1.0f / sqrtf((float)hd);
    const float *keys = key_head(w, s, layer, tile->kv_h), *values = value_head(w, s, layer, tile->kv_h);
    const int last_of_tile = pos + tile->t0 + tile->nt - 1;
    /* Rows go token by token, so a pass's last row attends furthest. A pass
     * covers the positions its last row attends to; its earlier rows' scores
     * past their own last position are computed but never read, and their
     * probabilities there are set to 0, which adds nothing to their sums. */
#define LAST_OF_ROW(r) (pos + tile->t0 + (r) / tile->nh)   /* the row's query attends to 0..this */
#define PASS_ROWS(r0) (rows - (r0) < ROWS_PER_PASS ? rows - (r0) : ROWS_PER_PASS)
    const float *q[ROWS_PER_PASS];
    float *row_scores[ROWS_PER_PASS], *out[ROWS_PER_PASS];

    for (int b = 0; b * KV_BLOCK <= last_of_tile; b++)
        for (int r0 = 0; r0 < rows; r0 += ROWS_PER_PASS) {
            const int n = PASS_ROWS(r0);
            if (b * KV_BLOCK > LAST_OF_ROW(r0 + n - 1))
                continue;
            for (int r = 0; r < n; r++) {
                q[r] = s->q + tile_offset(w, tile, r0 + r);
                row_scores[r] = scores + (r0 + r) * row_len + (size_t)b * KV_BLOCK;
            }
            score_block(q, keys + (size_t)b * hd * KV_BLOCK, hd, scale, row_scores, n);
        }
    for (int r = 0; r < rows; r++) {
        float *p = scores + r * row_len;
        softmax(p, LAST_OF_ROW(r));
        for (int j = LAST_OF_ROW(r) + 1; j <= last_of_tile; j++)
            p[j] = 0.0f;
        memset(s->att + tile_offset(w, tile, r), 0, sizeof(float) * hd);
    }
    for (int first = 0; first <= last_of_tile; first += KV_BLOCK)
        for (int r0 = 0; r0 < rows; r0 += ROWS_PER_PASS) {
            const int n = PASS_ROWS(r0), pass_last = LAST_OF_ROW(r0 + n - 1);
            if (first > pass_last)
                continue;
            for (int r = 0; r < n; r++) {
                row_scores[r] = scores + (r0 + r) * row_len;
                out[r] = s->att + tile_offset(w, tile, r0 + r);
            }
            add_values((const float *const *)row_scores, values, hd, first,
                       pass_last < first + KV_BLOCK - 1 ? pass_last : first + KV_BLOCK - 1, out, n);
        }
#undef PASS_ROWS
#undef LAST_OF_ROW
}

/* One token (decode) has too few tiles to share out if a tile holds the whole group. */
static int heads_per_tile(const weights *w, int n)
{
    return n == 1 ? 1 : w->n_heads / w->n_kv_heads;
}

/* The query tiles attention() shares out among its threads. */
static int attention_jobs(const weights *w, int n)
{
    return (n + QUERY_TOKENS - 1) / QUERY_TOKENS * w->n_heads / heads_per_tile(w, n);
}

/* Query tile `job` of n new tokens at positions pos.., with a thread's `scores`. */
static void attention_job(const weights *w, run_state *s, int layer, int pos, int n, int job, float *scores)
{
    const int group = w->n_heads / w->n_kv_heads, nh = heads_per_tile(w, n), tiles_per_group = group / nh;
    const int token_tiles = (n + QUERY_TOKENS - 1) / QUERY_TOKENS;
    const int heads_job = job % (w->n_kv_heads * tiles_per_group);
    query_tile tile;
    /* later token tiles have longer rows: hand them out first */
    tile.t0 = (token_tiles - 1 - job / (w->n_kv_heads * tiles_per_group)) * QUERY_TOKENS;
    tile.nt = n - tile.t0 < QUERY_TOKENS ? n - tile.t0 : QUERY_TOKENS;
    tile.kv_h = heads_job / tiles_per_group;
    tile.nh = nh;
    tile.h0 = tile.kv_h * group + (heads_job % tiles_per_group) * nh;
    attention_tile(w, s, layer, pos, &tile, scores, (size_t)s->ctx_blocks * KV_BLOCK);
}

/* Thread `thread`'s block of attention scores. */
static float *thread_scores(const weights *w, const run_state *s, int thread)
{
    return s->scores + (size_t)thread * scores_per_thread(w, s);
}

/* Causal grouped-query attention of n new tokens at positions pos.. over the cache. */
static void attention(const weights *w, run_state *s, int layer, int pos, int n, int nthreads)
{
    int job;
    #pragma omp parallel for schedule(dynamic, 1) num_threads(thread_count(nthreads))
    for (job = 0; job < attention_jobs(w, n); job++) {
#ifdef _OPENMP
        float *scores = thread_scores(w, s, omp_get_thread_num());
#else
        float *scores = thread_scores(w, s, 0);
#endif
        attention_job(w, s, layer, pos, n, job, scores);
    }
}

/* x[dim] += y[dim] */
QI_VECTORIZE
static void add_row(float *x, const float *y, int dim)
{
    #pragma omp simd
    for (int i = 0; i < dim; i++)
        x[i] += y[i];
}

/* x[n][dim] += y[n][dim] */
static void add_rows(float *x, const float *y, int n, int dim, int nthreads)
{
    int t;
    #pragma omp parallel for schedule(static) if(n >= PARALLEL_ROWS) num_threads(thread_count(nthreads))
    for (t = 0; t < n; t++)
        add_row(x + (size_t)t * dim, y + (size_t)t * dim, dim);
}

/* silu(g) = g * sigmoid(g), with sigmoid from e = exp(-|g|) <= 1 so that the
 * branch-free exp_nonpositive serves both signs and the loop vectorizes:
 * sigmoid(g) = 1 / (1 + e) for g >= 0, e / (1 + e) below. */
static inline float silu(float g)
{
    const float e = exp_nonpositive(-fabsf(g));
    return g * (g >= 0.0f ? 1.0f : e) / (1.0f + e);
}

/* out = silu(gate) * up over one row of n values (out may be gate) */
QI_VECTORIZE
static void swiglu(float *out, const float *gate, const float *up, int n)
{
    #pragma omp simd
    for (int i = 0; i < n; i++)
        out[i] = silu(gate[i]) * up[i];
}

/* q, k, v = wq(xb), wk(xb), wv(xb): three kernel calls, or one call of the
 * stacked wqkv whose rows [q | k | v] are then copied apart. */
static int project_qkv(const weights *w, const layer_weights *lw, run_state *s, int n, int nthreads)
{
    const size_t q_dim = (size_t)w->n_heads * w->head_dim, kv_dim = (size_t)w->n_kv_heads * w->head_dim;
    if (!is_set(&lw->wqkv)) {
        int rc = matmul(&lw->wq, s->xb, n, s->q, nthreads);
        rc |= matmul(&lw->wk, s->xb, n, s->k, nthreads);
        rc |= matmul(&lw->wv, s->xb, n, s->v, nthreads);
        return rc;
    }
    if (!s->stacked || matmul(&lw->wqkv, s->xb, n, s->stacked, nthreads))
        return -1;
    int t;
    #pragma omp parallel for schedule(static) if(n >= PARALLEL_ROWS) num_threads(thread_count(nthreads))
    for (t = 0; t < n; t++) {
        const float *row = s->stacked + (size_t)t * (q_dim + 2 * kv_dim);
        memcpy(s->q + t * q_dim, row, sizeof(float) * q_dim);
        memcpy(s->k + t * kv_dim, row + q_dim, sizeof(float) * kv_dim);
        memcpy(s->v + t * kv_dim, row + q_dim + kv_dim, sizeof(float) * kv_dim);
    }
    return 0;
}

/* gate = silu(w_gate(xb)) * w_up(xb): two kernel calls, or one of the stacked w_gate_up. */
static int gated_hidden(const weights *w, const layer_weights *lw, run_state *s, int n, int nthreads)
{
    const int hidden = w->hidden_dim;
    const int stacked = is_set(&lw->w_gate_up);
    if (stacked) {
        if (!s->stacked || matmul(&lw->w_gate_up, s->xb, n, s->stacked, nthreads))
            return -1;
    } else if (matmul(&lw->w_gate, s->xb, n, s->gate, nthreads) | matmul(&lw->w_up, s->xb, n, s->up, nthreads)) {
        return -1;
    }
    int t;
    #pragma omp parallel for schedule(static) if(n >= PARALLEL_ROWS) num_threads(thread_count(nthreads))
    for (t = 0; t < n; t++) {
        float *gate = s->gate + (size_t)t * hidden;
        if (stacked) {
            const float *row = s->stacked + (size_t)t * 2 * hidden;
            swiglu(gate, row, row + hidden, hidden);
        } else {
            swiglu(gate, gate, s->up + (size_t)t * hidden, hidden);
        }
    }
    return 0;
}

/* ------------------------------------------------------------- forward */

/* Inputs of a layer's linear maps, copied out when a caller asks (GPTQ
 * calibration collects them); any pointer may be NULL. */
typedef struct {
    float *attn_in;   /* [n][dim]        input of q/k/v_proj */
    float *o_in;      /* [n][n_heads*hd] input of o_proj */
    float *mlp_in;    /* [n][dim]        input of gate/up_proj */
    float *down_in;   /* [n][hidden]     input of down_proj */
} layer_capture;

static void capture(float *dst, const float *src, size_t count)
{
    if (dst)
        memcpy(dst, src, sizeof(float) * count);
}

/* One transformer block on s->x (n tokens at positions pos..). */
static int layer_forward(const weights *w, run_state *s, int l, int pos, int n,
                         const layer_capture *cap, int nthreads)
{
    const layer_weights *lw = &w->layers[l];
    const int dim = w->dim, hd = w->head_dim, q_dim = w->n_heads * hd;
    int rc = 0;

    /* attention block: x += wo(attention(rope(q), cache += (rope(k), v))) */
    rmsnorm(s->x, lw->attn_norm, n, dim, w->eps, s->xb, nthreads);
    capture(cap ? cap->attn_in : NULL, s->xb, (size_t)n * dim);
    rc |= project_qkv(w, lw, s, n, nthreads);
    rope(s->q, n, w->n_heads, hd, s->cos_sin, nthreads);
    rope(s->k, n, w->n_kv_heads, hd, s->cos_sin, nthreads);
    store_kv(w, s, l, pos, n, nthreads);
    attention(w, s, l, pos, n, nthreads);
    capture(cap ? cap->o_in : NULL, s->att, (size_t)n * q_dim);
    rc |= matmul(&lw->wo, s->att, n, s->proj, nthreads);
    add_rows(s->x, s->proj, n, dim, nthreads);

    /* MLP block: x += w_down(silu(w_gate(x)) * w_up(x)) */
    rmsnorm(s->x, lw->ffn_norm, n, dim, w->eps, s->xb, nthreads);
    capture(cap ? cap->mlp_in : NULL, s->xb, (size_t)n * dim);
    rc |= gated_hidden(w, lw, s, n, nthreads);
    capture(cap ? cap->down_in : NULL, s->gate, (size_t)n * w->hidden_dim);
    rc |= matmul(&lw->w_down, s->gate, n, s->proj, nthreads);
    add_rows(s->x, s->proj, n, dim, nthreads);
    return rc ? -1 : 0;
}

/* ------------------------------------------------------- the decode team */

/* A decode step (one token) runs as one OpenMP thread team from the first
 * layer to the LM head, the threads waiting for each other at spinning
 * barriers between the steps, instead of a parallel region per kernel call
 * (five a layer): on a 2-core KVM guest libgomp's fork and join of a region
 * cost ~1.5 us (its join makes a futex system call every time), the barrier
 * of team.h ~0.1 us. Each kernel call is a qgemv_team_fn (qmatrix.h); the row-wise
 * steps between them are a few microseconds of work, done by thread 0 while
 * the others wait, and attention shares its heads out. Every number is
 * computed by the same functions as in the per-call path, so the results are
 * the same. */

static int team_ready_linear(const linear *l)
{
    return l->team != NULL;
}

/* Whether every linear map a decode step runs has a team kernel. */
static int team_ready(const weights *w)
{
    if (!team_ready_linear(&w->lm_head))
        return 0;
    for (int l = 0; l < w->n_layers; l++) {
        const layer_weights *lw = &w->layers[l];
        const int qkv = is_set(&lw->wqkv) ? team_ready_linear(&lw->wqkv)
            : team_ready_linear(&lw->wq) && team_ready_linear(&lw->wk) && team_ready_linear(&lw->wv);
        const int gate_up = is_set(&lw->w_gate_up) ? team_ready_linear(&lw->w_gate_up)
            : team_ready_linear(&lw->w_gate) && team_ready_linear(&lw->w_up);
        if (!qkv || !gate_up || !team_ready_linear(&lw->wo) || !team_ready_linear(&lw->w_down))
            return 0;
    }
    return 1;
}

static int team_matmul(const linear *l, const float *x, float *y, const team *tm)
{
    return l->team(l->q, x, y, tm);
}

/* One block on s->x for the token at position pos, by every thread of the team. */
static int layer_decode_team(const weights *w, run_state *s, int l, int pos, const team *tm)
{
    const layer_weights *lw = &w->layers[l];
    const int dim = w->dim, hd = w->head_dim, hidden = w->hidden_dim;
    const size_t q_dim = (size_t)w->n_heads * hd, kv_dim = (size_t)w->n_kv_heads * hd;
    const int lead = tm->thread == 0;
    int rc = 0;

    /* attention block: x += wo(attention(rope(q), cache += (rope(k), v))) */
    if (lead)
        rmsnorm_row(s->x, lw->attn_norm, dim, w->eps, s->xb);
    team_wait(tm);
    if (is_set(&lw->wqkv)) {
        rc |= team_matmul(&lw->wqkv, s->xb, s->stacked, tm);
    } else {
        rc |= team_matmul(&lw->wq, s->xb, s->q, tm);
        rc |= team_matmul(&lw->wk, s->xb, s->k, tm);
        rc |= team_matmul(&lw->wv, s->xb, s->v, tm);
    }
    team_wait(tm);
    if (lead) {
        if (is_set(&lw->wqkv)) {
            memcpy(s->q, s->stacked, sizeof(float) * q_dim);
            memcpy(s->k, s->stacked + q_dim, sizeof(float) * kv_dim);
            memcpy(s->v, s->stacked + q_dim + kv_dim, sizeof(float) * kv_dim);
        }
        rope_row(s->q, w->n_heads, hd, s->cos_sin);
        rope_row(s->k, w->n_kv_heads, hd, s->cos_sin);
        store_kv_row(w, s, l, 0, pos);
    }
    team_wait(tm);
    for (int job = tm->thread; job < attention_jobs(w, 1); job += tm->threads)
        attention_job(w, s, l, pos, 1, job, thread_scores(w, s, tm->thread));
    team_wait(tm);
    rc |= team_matmul(&lw->wo, s->att, s->proj, tm);
    team_wait(tm);

    /* MLP block: x += w_down(silu(w_gate(x)) * w_up(x)) */
    if (lead) {
        add_row(s->x, s->proj, dim);
        rmsnorm_row(s->x, lw->ffn_norm, dim, w->eps, s->xb);
    }
    team_wait(tm);
    if (is_set(&lw->w_gate_up)) {
        rc |= team_matmul(&lw->w_gate_up, s->xb, s->stacked, tm);
    } else {
        rc |= team_matmul(&lw->w_gate, s->xb, s->gate, tm);
        rc |= team_matmul(&lw->w_up, s->xb, s->up, tm);
    }
    team_wait(tm);
    if (lead) {
        if (is_set(&lw->w_gate_up))
            swiglu(s->gate, s->stacked, s->stacked + hidden, hidden);
        else
            swiglu(s->gate, s->gate, s->up, hidden);
    }
    team_wait(tm);
    rc |= team_matmul(&lw->w_down, s->gate, s->proj, tm);
    team_wait(tm);
    if (lead)
        add_row(s->x, s->proj, dim);   /* the next block's first step is thread 0's too */
    return rc;
}

/* forward() for one token, as one team of nthreads threads (team_ready(w)). */
static int decode_team(const weights *w, run_state *s, int token, int pos, float *logits, int nthreads)
{
    team_barrier barrier = {0, 0, 0};
    int failed = 0;
    embed(w, &token, 1, s->x);
    rope_tables(w, pos, 1, s->cos_sin);
    #pragma omp parallel num_threads(nthreads) reduction(|:failed)
    {
        team tm;
        tm.barrier = &barrier;
#ifdef _OPENMP
        tm.thread = omp_get_thread_num();
        tm.threads = omp_get_num_threads();   /* all the team's threads see the same count */
        tm.spins = team_spins(tm.threads, omp_get_num_procs());
#else
        tm.thread = 0;
        tm.threads = 1;
        tm.spins = 0;
#endif
        for (int l = 0; l < w->n_layers; l++)
            failed |= layer_decode_team(w, s, l, pos, &tm);
        if (tm.thread == 0)
            rmsnorm_row(s->x, w->final_norm, w->dim, w->eps, s->xb);
        team_wait(&tm);
        failed |= team_matmul(&w->lm_head, s->xb, logits, &tm);
    }
    return failed ? -1 : 0;
}

static int clamp_threads(const run_state *s, int nthreads)
{
    /* attention() keeps one scores block per thread: never more threads than blocks
     * (the Python side grows them first, grow_threads, when a call asks for more) */
    return (nthreads > 0 && nthreads < s->threads) ? nthreads : s->threads;
}

/* forward() with nthreads threads, or with the prefill governor's count for
 * each block when g is set (n > 1). */
static int forward_with(const weights *w, run_state *s, const int *tokens, int n, int pos,
                        float *logits, int all_logits, int nthreads, team_governor *g)
{
    const int dim = w->dim;
    if (n == 1 && nthreads > 1 && s->decode_team && team_ready(w))
        return decode_team(w, s, tokens[0], pos, logits, nthreads);
    embed(w, tokens, n, s->x);
    rope_tables(w, pos, n, s->cos_sin);
    if (g)
        governor_rows(g, n);
    int threads = nthreads;
    for (int l = 0; l < w->n_layers; l++) {
        const double t0 = g ? team_clock() : 0.0;
        if (g)
            threads = governor_threads(g, nthreads);
        if (layer_forward(w, s, l, pos, n, NULL, threads))
            return -1;
        if (g)
            governor_report(g, threads, t0, team_clock());
    }
    if (g)
        threads = g->use;

    /* final norm and LM head: every row, or just the last one for generation */
    const float *rows = all_logits ? s->x : s->x + (size_t)(n - 1) * dim;
    const int n_rows = all_logits ? n : 1;
    rmsnorm(rows, w->final_norm, n_rows, dim, w->eps, s->xb, threads);
    return matmul(&w->lm_head, s->xb, n_rows, logits, threads);
}

/* Whether forward() lets the governors (team.h) choose its thread count, of at
 * most the count asked for (kernels.set_adaptive_threads); 0: always that count. */
static int adapt_threads = 1;

/* Run n tokens at positions pos..pos+n-1 through the model, filling the KV
 * cache. logits gets [n][vocab] when all_logits, else the last row only.
 * Returns 0, or -1 when a kernel ran out of memory. With adapt_threads, a
 * decode step runs with the decode governor's count of threads and each block
 * of a prefill with the prefill governor's (the results are the same for any count). */
static int forward(const weights *w, run_state *s, const int *tokens, int n, int pos,
                   float *logits, int all_logits, int nthreads)
{
    nthreads = clamp_threads(s, nthreads);
    if (!adapt_threads || nthreads == 1)
        return forward_with(w, s, tokens, n, pos, logits, all_logits, nthreads, NULL);
    if (n > 1)
        return forward_with(w, s, tokens, n, pos, logits, all_logits, nthreads, &s->prefill_governor);
    const double t0 = team_clock();
    const int threads = governor_threads(&s->decode_governor, nthreads);
    const int rc = forward_with(w, s, tokens, n, pos, logits, all_logits, threads, NULL);
    governor_report(&s->decode_governor, threads, t0, team_clock());
    return rc;
}

/* One block on caller-given hidden states x[n][dim] (in place), for
 * layer-by-layer work such as GPTQ calibration. */
static int run_layer(const weights *w, run_state *s, int l, float *x, int n, int pos,
                     const layer_capture *cap, int nthreads)
{
    nthreads = clamp_threads(s, nthreads);
    memcpy(s->x, x, sizeof(float) * (size_t)n * w->dim);
    rope_tables(w, pos, n, s->cos_sin);
    const int rc = layer_forward(w, s, l, pos, n, cap, nthreads);
    memcpy(x, s->x, sizeof(float) * (size_t)n * w->dim);
    return rc;
}
    """
    ctypedef struct linear:
        const qmatrix *q
        qgemm_fn qgemm
        qgemm_fn qgemm_i8
        qgemv_team_fn team
        const float *w
        const uint16_t *w16
        int in_ "in"
        int out
    ctypedef struct layer_weights:
        const float *attn_norm
        linear wq, wk, wv, wo, wqkv
        const float *ffn_norm
        linear w_gate, w_up, w_down, w_gate_up
    ctypedef struct weights:
        int dim, hidden_dim, n_layers, n_heads, n_kv_heads, head_dim, vocab_size, ctx
        float eps
        const float *embedding
        const uint16_t *embedding16
        const qmatrix *embedding_q
        layer_weights *layers
        const float *final_norm
        linear lm_head
        const float *inv_freq
    ctypedef struct team_governor:
        int max, use, probes, switches
        double cost, work
    ctypedef struct run_state:
        int max_tokens
        int threads
        int decode_team
        team_governor decode_governor
        team_governor prefill_governor
        float *stacked
        float *key_cache
        float *value_cache
    int team_ready(const weights *w) nogil
    int adapt_threads
    int team_wait_mode
    int TEAM_WAIT_SLEEP, TEAM_WAIT_SPIN
    double team_probe_min_s, team_probe_max_s
    int alloc_state(run_state *s, const weights *w, int max_tokens, int threads) nogil
    int grow_threads(run_state *s, const weights *w, int threads) nogil
    void free_state(run_state *s) nogil
    int forward(const weights *w, run_state *s, const int *tokens, int n, int pos,
                float *logits, int all_logits, int nthreads) nogil
    ctypedef struct layer_capture:
        float *attn_in
        float *o_in
        float *mlp_in
        float *down_in
    int run_layer(const weights *w, run_state *s, int l, float *x, int n, int pos,
                  const layer_capture *cap, int nthreads) nogil


def set_thread_policy(bint adaptive, bint spin):
    """How forward() uses threads (qinfer.kernels sets this): adaptive, let the
    governors of pyx/team.h choose the count of each decode step and prefill
    block (at most the count asked for), else always run the count asked for;
    spin, make the decode team's barrier spin and yield until released (before
    issue 34) instead of sleeping on a futex after ~50 us."""
    global adapt_threads, team_wait_mode
    adapt_threads = adaptive
    team_wait_mode = TEAM_WAIT_SPIN if spin else TEAM_WAIT_SLEEP


def thread_policy():
    """(adaptive, spin) as set_thread_policy last set them."""
    return bool(adapt_threads), team_wait_mode == TEAM_WAIT_SPIN


def set_probe_interval(double shortest, double longest):
    """Seconds of work between the governors' periodic probes: `shortest` after a
    start or a switch, doubling after every probe that loses, up to `longest`
    (pyx/team.h: 1 and 8). Tests set 0: a probe whenever enough units have run.
    Returns the previous pair. Governors already running keep their current interval."""
    global team_probe_min_s, team_probe_max_s
    previous = team_probe_min_s, team_probe_max_s
    team_probe_min_s, team_probe_max_s = shortest, longest
    return previous


cdef dict governor_state(const team_governor *g):
    return dict(asked=g.max, threads=g.use if g.max else None, probes=g.probes, switches=g.switches,
                seconds=g.cost if g.max and g.cost >= 0 else None, work=g.work)


cdef const uint16_t *half_ptr(object array, Py_ssize_t size) except NULL:
    """Pointer into a C-contiguous float16 numpy array of `size` elements."""
    cdef const uint16_t[::1] view = array.reshape(-1).view("uint16")
    if view.shape[0] != size:
        raise ValueError(f"expected {size} float16 values, got {view.shape[0]}")
    return &view[0]


cdef bint is_half(object array):
    return getattr(array, "dtype", None) == "float16"


cdef const float *float_ptr(object array, Py_ssize_t size) except NULL:
    """Pointer into a C-contiguous float32 numpy array of `size` elements."""
    cdef const float[::1] view = array.reshape(-1)
    if view.shape[0] != size:
        raise ValueError(f"expected {size} floats, got {view.shape[0]}")
    return &view[0]


cdef class Transformer:
    """The C view of a model: pointers into arrays and packed layers owned by
    the Python objects passed in (kept alive here), plus the run state.

    `layers` is a list of dicts with keys attn_norm, ffn_norm (float32
    arrays) and wq, wk, wv, wo, w_gate, w_up, w_down; each linear is either a
    float32 [out, in] array or a tuple (matrix capsule, kernel capsule[, int8
    kernel capsule or None[, its team twin or None]]); the int8 kernel, when
    given, runs every step, and its team twin the decode steps (decode_team).
    A dict may instead give "wqkv" (wq, wk, wv stacked: [q_dim + 2*kv_dim, dim])
    for wq/wk/wv and "w_gate_up" ([2*hidden, dim]) for w_gate/w_up.
    `embedding` is a float32 or float16 [vocab, dim] array, or a quantized
    table: a linear spec tuple of a packed dim -> vocab layer (the caller
    checks its shape), whose rows are widened only when looked up.
    """
    cdef weights w
    cdef run_state s
    cdef bint has_state
    cdef object keep

    def __cinit__(self):
        self.w.layers = NULL
        self.has_state = False

    def __init__(self, dict config, embedding, list layers, final_norm, lm_head, inv_freq,
                 int max_tokens, int threads):
        cdef int i
        self.keep = [embedding, layers, final_norm, lm_head, inv_freq]
        self.w.dim = config["dim"]
        self.w.hidden_dim = config["hidden_dim"]
        self.w.n_layers = len(layers)
        self.w.n_heads = config["n_heads"]
        self.w.n_kv_heads = config["n_kv_heads"]
        self.w.head_dim = config["head_dim"]
        self.w.vocab_size = config["vocab_size"]
        self.w.ctx = config["ctx"]
        self.w.eps = config["eps"]
        dim, hd = self.w.dim, self.w.head_dim
        q_dim, kv_dim = self.w.n_heads * hd, self.w.n_kv_heads * hd
        self.w.embedding = NULL
        self.w.embedding16 = NULL
        self.w.embedding_q = NULL
        if isinstance(embedding, tuple):        # (matrix capsule, ...): a packed dim -> vocab layer
            self.w.embedding_q = <const qmatrix *>PyCapsule_GetPointer(embedding[0], b"qinfer.qmatrix")
        elif is_half(embedding):
            self.w.embedding16 = half_ptr(embedding, <Py_ssize_t>self.w.vocab_size * dim)
        else:
            self.w.embedding = float_ptr(embedding, <Py_ssize_t>self.w.vocab_size * dim)
        self.w.final_norm = float_ptr(final_norm, dim)
        self.w.inv_freq = float_ptr(inv_freq, hd // 2)
        self.set_linear_ptr(&self.w.lm_head, lm_head, dim, self.w.vocab_size)
        self.w.layers = <layer_weights *>calloc(len(layers), sizeof(layer_weights))
        if self.w.layers == NULL:
            raise MemoryError()
        for i, layer in enumerate(layers):
            self.w.layers[i].attn_norm = float_ptr(layer["attn_norm"], dim)
            self.w.layers[i].ffn_norm = float_ptr(layer["ffn_norm"], dim)
            for name, spec in layer.items():
                if name not in ("attn_norm", "ffn_norm"):
                    self.point(i, name, spec)
            for parts, stacked in ((("wq", "wk", "wv"), "wqkv"), (("w_gate", "w_up"), "w_gate_up")):
                if all(layer.get(p) is not None for p in parts) == (layer.get(stacked) is not None):
                    raise ValueError(f"layer {i}: give either {', '.join(parts)} or {stacked}")
            for name in ("wo", "w_down"):
                if layer.get(name) is None:
                    raise ValueError(f"layer {i}: {name} is missing")
        if alloc_state(&self.s, &self.w, max_tokens, threads) != 0:
            raise MemoryError("not enough memory for the KV cache and buffers "
                              f"(context {self.w.ctx}); try a smaller context")
        self.has_state = True

    def linear_shape(self, str name):
        """(in, out) of a block's linear map."""
        dim, hidden = self.w.dim, self.w.hidden_dim
        q_dim, kv_dim = self.w.n_heads * self.w.head_dim, self.w.n_kv_heads * self.w.head_dim
        shapes = {"wq": (dim, q_dim), "wk": (dim, kv_dim), "wv": (dim, kv_dim), "wo": (q_dim, dim),
                  "wqkv": (dim, q_dim + 2 * kv_dim), "w_gate": (dim, hidden), "w_up": (dim, hidden),
                  "w_gate_up": (dim, 2 * hidden), "w_down": (hidden, dim)}
        if name not in shapes:
            raise ValueError(f"no linear map named {name!r}")
        return shapes[name]

    cdef linear *linear_slot(self, int layer, str name) except NULL:
        cdef layer_weights *lw = &self.w.layers[layer]
        if name == "wq": return &lw.wq
        if name == "wk": return &lw.wk
        if name == "wv": return &lw.wv
        if name == "wo": return &lw.wo
        if name == "wqkv": return &lw.wqkv
        if name == "w_gate": return &lw.w_gate
        if name == "w_up": return &lw.w_up
        if name == "w_gate_up": return &lw.w_gate_up
        if name == "w_down": return &lw.w_down
        raise ValueError(f"no linear map named {name!r}")

    cdef int point(self, int layer, str name, object spec) except -1:
        n_in, n_out = self.linear_shape(name)
        return self.set_linear_ptr(self.linear_slot(layer, name), spec, n_in, n_out)

    cdef int set_linear_ptr(self, linear *l, object spec, int n_in, int n_out) except -1:
        """Point l at spec; None unsets it."""
        l.in_ = n_in
        l.out = n_out
        l.q = NULL
        l.qgemm = NULL
        l.qgemm_i8 = NULL
        l.team = NULL
        l.w = NULL
        l.w16 = NULL
        if spec is None:
            return 0
        if isinstance(spec, tuple):
            l.q = <const qmatrix *>PyCapsule_GetPointer(spec[0], b"qinfer.qmatrix")
            l.qgemm = <qgemm_fn>PyCapsule_GetPointer(spec[1], b"qinfer.qgemm_fn")
            if len(spec) > 2 and spec[2] is not None:
                l.qgemm_i8 = <qgemm_fn>PyCapsule_GetPointer(spec[2], b"qinfer.qgemm_fn")
            if len(spec) > 3 and spec[3] is not None:
                l.team = <qgemv_team_fn>PyCapsule_GetPointer(spec[3], b"qinfer.qgemv_team_fn")
        elif is_half(spec):
            l.w16 = half_ptr(spec, <Py_ssize_t>n_in * n_out)
        else:
            l.w = float_ptr(spec, <Py_ssize_t>n_in * n_out)
        return 0

    def __dealloc__(self):
        if self.has_state:
            free_state(&self.s)
        free(self.w.layers)

    @property
    def decode_team(self):
        """Whether a decode step runs as one thread team (when every layer has a team
        kernel: int8 activations on the AVX2 path) or as a parallel region per kernel
        call; both give the same numbers. On by default."""
        return bool(self.s.decode_team)

    @decode_team.setter
    def decode_team(self, bint on):
        self.s.decode_team = on

    def thread_governors(self):
        """What the thread governors (pyx/team.h) chose: for "decode" (steps) and
        "prefill" (blocks), the count asked for (0: none yet), the count in use, the
        probes and switches so far, the moving average of a unit's seconds (per
        token for prefill blocks) at that count and the seconds of work governed."""
        return {"decode": governor_state(&self.s.decode_governor),
                "prefill": governor_state(&self.s.prefill_governor)}

    @property
    def team_ready(self):
        """Whether every linear map of a decode step has a team kernel, so that
        decode steps with more than one thread run as one team."""
        return bool(team_ready(&self.w))

    @property
    def max_tokens(self):
        return self.s.max_tokens

    @property
    def threads(self):
        """Threads the run state has room for (it grows when a call asks for more)."""
        return self.s.threads

    cdef int ensure_threads(self, int nthreads) except -1:
        if grow_threads(&self.s, &self.w, nthreads) != 0:
            raise MemoryError(f"not enough memory for {nthreads} threads' attention scores")
        return 0

    def forward(self, const int32_t[::1] tokens, int pos, float[:, ::1] logits, bint all_logits,
                int nthreads):
        """Tokens at positions pos.. (the caller checks ids, lengths and the context)."""
        cdef int n = tokens.shape[0]
        cdef int rc
        if n < 1 or n > self.s.max_tokens or pos < 0 or pos + n > self.w.ctx:
            raise ValueError("forward: token count or position out of range")
        if logits.shape[1] != self.w.vocab_size or logits.shape[0] != (n if all_logits else 1):
            raise ValueError("forward: logits buffer has the wrong shape")
        self.ensure_threads(nthreads)
        with nogil:
            rc = forward(&self.w, &self.s, <const int *>&tokens[0], n, pos, &logits[0, 0],
                         all_logits, nthreads)
        if rc != 0:
            raise MemoryError("out of memory in the forward pass")

    def run_layer(self, int layer, float[:, ::1] x, int pos, dict captures=None, int nthreads=0):
        """Run block `layer` on hidden states x [n, dim] in place (positions pos..).

        captures: optional dict of float32 arrays to fill with the inputs of
        the linear maps: "attn_in" [n, dim], "o_in" [n, n_heads*head_dim],
        "mlp_in" [n, dim], "down_in" [n, hidden].
        """
        cdef layer_capture cap
        cdef int n = x.shape[0]
        cdef int rc
        if layer < 0 or layer >= self.w.n_layers:
            raise ValueError("no such layer")
        if n < 1 or n > self.s.max_tokens or pos < 0 or pos + n > self.w.ctx or x.shape[1] != self.w.dim:
            raise ValueError("run_layer: shape or position out of range")
        self.ensure_threads(nthreads)
        widths = {"attn_in": self.w.dim, "o_in": self.w.n_heads * self.w.head_dim,
                  "mlp_in": self.w.dim, "down_in": self.w.hidden_dim}
        cap.attn_in = capture_ptr(captures, "attn_in", n, widths["attn_in"])
        cap.o_in = capture_ptr(captures, "o_in", n, widths["o_in"])
        cap.mlp_in = capture_ptr(captures, "mlp_in", n, widths["mlp_in"])
        cap.down_in = capture_ptr(captures, "down_in", n, widths["down_in"])
        with nogil:
            rc = run_layer(&self.w, &self.s, layer, &x[0, 0], n, pos, &cap, nthreads)
        if rc != 0:
            raise MemoryError("out of memory in the forward pass")

    def set_linear(self, int layer, str name, spec):
        """Point one linear map of a block at new weights (the caller keeps them
        alive), or unset it (None). A stacked map (wqkv, w_gate_up) runs in place
        of its parts while set; unset it after setting the parts to undo it."""
        if layer < 0 or layer >= self.w.n_layers:
            raise ValueError("no such layer")
        if spec is None and name not in ("wqkv", "w_gate_up"):
            raise ValueError(f"only a stacked map can be unset, not {name!r}")
        if name in ("wqkv", "w_gate_up") and spec is not None and self.s.stacked == NULL:
            raise ValueError("stacked maps must be given when the model is built")
        self.point(layer, name, spec)
        self.keep.append(spec)


cdef float *capture_ptr(dict captures, str name, int n, int width) except? NULL:
    cdef float[:, ::1] view
    if captures is None or captures.get(name) is None:
        return NULL
    view = captures[name]
    if view.shape[0] != n or view.shape[1] != width:
        raise ValueError(f"capture {name!r} must have shape ({n}, {width})")
    return &view[0, 0]
