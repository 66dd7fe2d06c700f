/* attention.c: causal grouped-query attention over the KV cache (kv_cache.c has its
 * formats), a tile of queries at a time. Part of _forward.pyx's translation unit
 * (forward.h). */
#include "forward.h"
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define QI_HAVE_F16C 1
/* Whether this CPU converts halves in hardware (F16C, with the AVX2 the loops use). */
static int qi_f16c(void)
{
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        known = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    }
    return known;
}
/* Whether it also has AVX-512 (F and VL): the same 256-bit loops, built again with 32
 * vector registers where AVX2 has 16, hold all of a pass's sums in registers (AVX2's
 * build keeps some of the coded loops' on the stack). */
static int qi_avx512vl(void)
{
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        known = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
    }
    return known;
}
#else
#define QI_HAVE_F16C 0
#endif

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
typedef uint16_t v8u16_unaligned __attribute__((vector_size(16), aligned(2), may_alias));
typedef uint32_t v8u32 __attribute__((vector_size(32)));
#define LOAD8(p) (*(const v8f_unaligned *)(p))
#define STORE8(p, v) (*(v8f_unaligned *)(p) = (v))

/* 8 IEEE halves at p as floats, exactly (subnormals, infinities and NaNs too): the
 * half's exponent and mantissa shifted into a float's place read as a float 2^-112
 * of the value, and a multiply puts it right. In integer and float vector operations
 * (GCC 12 converts a _Float16 vector one element at a time, even with F16C). */
static inline __attribute__((always_inline)) v8f half8_to_float(const uint16_t *p)
{
    const v8u32 h = __builtin_convertvector(*(const v8u16_unaligned *)p, v8u32);
    const v8f magnitude = (v8f)((h & 0x7fff) << 13) * 0x1.0p112f;
    const v8u32 inf_nan = (v8u32)(magnitude >= 65536.0f) & (0xffu << 23);
    return (v8f)((v8u32)magnitude | inf_nan | ((h & 0x8000) << 16));
}

#define PASS_WIDTH 32   /* floats of a row one pass holds: 4 vectors */
#define VALUE_CHUNK PASS_WIDTH

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

/* The loops twice: reading halves portably (half8_to_float), and, on x86 CPUs with
 * F16C (every AVX2 one), with its conversion instruction, one per 8 values where the
 * portable way takes six: at depth, attention over a float16 cache reads half the
 * bytes of a float32 one and should not spend that on converting them. */
#define KV_NAME(name) name##_portable
#define KV_LOAD_HALF8(p) half8_to_float(p)
#define KV_ATTR QI_VECTORIZE
#include "attention_rows.h"
#undef KV_NAME
#undef KV_LOAD_HALF8
#undef KV_ATTR
#if QI_HAVE_F16C
#define KV_LOAD_HALF8(p) ((v8f)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p))))
#define KV_ATTR
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define KV_NAME(name) name##_f16c
#include "attention_rows.h"
#undef KV_NAME
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512vl")
#define KV_NAME(name) name##_avx512     /* the same with AVX-512's 32 registers */
#include "attention_rows.h"
#undef KV_NAME
#pragma GCC pop_options
#undef KV_LOAD_HALF8
#undef KV_ATTR
#endif

/* The score block and value sum loops for this cache: F16C's for a float16 cache where
 * the CPU has it, unless kv_hardware_halves is 0 (tests: the portable loops give the
 * same results bit for bit, both conversions being exact; _forward.set_kv_hardware_halves);
 * on a CPU with AVX-512 their build with its registers, unless kv_avx512 is 0
 * (QINFER_AVX512=0; _forward.set_kv_avx512). */
static int kv_hardware_halves = 1;
static int kv_avx512 = 1;

#if QI_HAVE_F16C
static int use_f16c(void)
{
    return kv_hardware_halves && qi_f16c();
}

static int use_avx512(void)
{
    return kv_avx512 && use_f16c() && qi_avx512vl();
}
#endif

static void score_block(const float *const *q, const void *keys, size_t at, int hd, float scale,
                        float *const *scores, int rows, int half)
{
#if QI_HAVE_F16C
    if (use_avx512()) {
        score_block_avx512(q, keys, at, hd, scale, scores, rows, half);
        return;
    }
    if (half && use_f16c()) {
        score_block_f16c(q, keys, at, hd, scale, scores, rows, half);
        return;
    }
#endif
    score_block_portable(q, keys, at, hd, scale, scores, rows, half);
}

static void widen_halves(const uint16_t *src, float *dst, size_t count)
{
#if QI_HAVE_F16C
    if (use_avx512()) {
        widen_halves_avx512(src, dst, count);
        return;
    }
    if (use_f16c()) {
        widen_halves_f16c(src, dst, count);
        return;
    }
#endif
    widen_halves_portable(src, dst, count);
}

static void add_values(const float *const *p, const void *values, int hd, int first, int last,
                       float *const *out, int rows, int half)
{
#if QI_HAVE_F16C
    if (use_avx512()) {
        add_values_avx512(p, values, hd, first, last, out, rows, half);
        return;
    }
    if (half && use_f16c()) {
        add_values_f16c(p, values, hd, first, last, out, rows, half);
        return;
    }
#endif
    add_values_portable(p, values, hd, first, last, out, rows, half);
}

/* A tile of queries: tokens t0..t0+nt-1 of one sequence, at positions pos.., times query
 * heads h0..h0+nh-1, all of one KV head. Row r of the tile is token t0 + r / nh, head
 * h0 + r % nh. */
typedef struct {
    int t0, nt, h0, nh, kv_h;
    int seq, pos;     /* the sequence whose cache the tile reads; token t0's position */
} query_tile;

static inline size_t tile_offset(const weights *w, const query_tile *tile, int r)
{
    return ((size_t)(tile->t0 + r / tile->nh) * w->n_heads + tile->h0 + r % tile->nh) * w->head_dim;
}

static void attention_tile(const weights *w, run_state *s, int layer, const query_tile *tile,
                           float *scores, size_t row_len)
{
    const int hd = w->head_dim, rows = tile->nt * tile->nh;
    const float scale = 1.0f / sqrtf((float)hd);
    const void *keys = key_head(w, s, tile->seq, layer, tile->kv_h);
    const void *values = value_head(w, s, tile->seq, layer, tile->kv_h);
    const int half = s->kv.format == KV_F16;
    const int last_of_tile = tile->pos + tile->nt - 1;
    /* Rows go token by token, so a pass's last row attends furthest. A pass
     * covers the positions its last row attends to; its earlier rows' scores
     * past their own last position are computed but never read, and their
     * probabilities there are set to 0, which adds nothing to their sums. */
#define LAST_OF_ROW(r) (tile->pos + (r) / tile->nh)   /* the row's query attends to 0..this */
#define PASS_ROWS(r0) (rows - (r0) < ROWS_PER_PASS ? rows - (r0) : ROWS_PER_PASS)
    const float *q[ROWS_PER_PASS];
    float *row_scores[ROWS_PER_PASS], *out[ROWS_PER_PASS];

    /* A float16 cache read by more than one pass of rows (a prefill's tile) is widened a
     * block at a time into floats after the thread's scores, once for all the passes
     * (each pass would convert it again); one pass (a decode step) reads the halves. */
    const int widen = half && rows > ROWS_PER_PASS;
    float *wide_keys = scores + tile_score_floats(w, s);
    float *wide_values = wide_keys + (size_t)KV_BLOCK * hd;
    for (int b = 0; b * KV_BLOCK <= last_of_tile; b++) {
        if (widen)
            widen_halves((const uint16_t *)keys + (size_t)b * hd * KV_BLOCK, wide_keys, (size_t)hd * KV_BLOCK);
        for (int r0 = 0; r0 < rows; r0 += ROWS_PER_PASS) {
            const int n = PASS_ROWS(r0);
            if (b * KV_BLOCK > LAST_OF_ROW(r0 + n - 1))
                continue;
            for (int r = 0; r < n; r++) {
                q[r] = s->q + tile_offset(w, tile, r0 + r);
                row_scores[r] = scores + (r0 + r) * row_len + (size_t)b * KV_BLOCK;
            }
            if (widen)
                score_block(q, wide_keys, 0, hd, scale, row_scores, n, 0);
            else
                score_block(q, keys, (size_t)b * hd * KV_BLOCK, hd, scale, row_scores, n, half);
        }
    }
    for (int r = 0; r < rows; r++) {
        float *p = scores + r * row_len;
        softmax(p, LAST_OF_ROW(r));
        for (int j = LAST_OF_ROW(r) + 1; j <= last_of_tile; j++)
            p[j] = 0.0f;
        memset(s->att + tile_offset(w, tile, r), 0, sizeof(float) * hd);
    }
    for (int first = 0; first <= last_of_tile; first += KV_BLOCK) {
        const int block_last = last_of_tile < first + KV_BLOCK - 1 ? last_of_tile : first + KV_BLOCK - 1;
        if (widen)   /* only the positions the tile attends to: the rest may never have been written */
            widen_halves((const uint16_t *)values + (size_t)first * hd, wide_values,
                         (size_t)(block_last - first + 1) * hd);
        for (int r0 = 0; r0 < rows; r0 += ROWS_PER_PASS) {
            const int n = PASS_ROWS(r0), pass_last = LAST_OF_ROW(r0 + n - 1);
            if (first > pass_last)
                continue;
            const int last = pass_last < first + KV_BLOCK - 1 ? pass_last : first + KV_BLOCK - 1;
            for (int r = 0; r < n; r++) {
                /* widened, the block's position `first` is row 0: the probabilities shift with it */
                row_scores[r] = scores + (r0 + r) * row_len + (widen ? first : 0);
                out[r] = s->att + tile_offset(w, tile, r0 + r);
            }
            if (widen)
                add_values((const float *const *)row_scores, wide_values, hd, 0, last - first, out, n, 0);
            else
                add_values((const float *const *)row_scores, values, hd, first, last, out, n, half);
        }
    }
#undef PASS_ROWS
#undef LAST_OF_ROW
}

/* The coded formats' loops (kv_kernels.h, rendered by the generator), twice like the
 * float16 ones: portable, and with AVX2's byte widening and F16C's conversions. */
typedef struct {
    int bits;
    /* codes as floats, rows of 32 (a prefill's tile widens a block once for its passes) */
    void (*widen)(const uint8_t *codes, float *dst, size_t rows);
    /* scores of one coded key block, from its codes or widened */
    void (*score_block)(const float *const *q, const uint8_t *codes, const uint16_t *params, int hd,
                        float scale, float *const *scores, int rows);
    void (*score_block_wide)(const float *const *q, const float *wide, const uint16_t *params, int hd,
                             float scale, float *const *scores, int rows);
    /* sums of coded values over positions first..last, from their codes or widened */
    void (*add_values)(const float *const *p, const uint8_t *codes, const uint16_t *params, int hd,
                       int group, int first, int last, float *const *out, int rows);
    void (*add_values_wide)(const float *const *p, const float *wide, const uint16_t *params, int hd,
                            int group, int first, int last, float *const *out, int rows);
} kv_loops;
typedef int32_t v8i32 __attribute__((vector_size(32)));
#define KV_MAX_HEAD_DIM 256   /* the coded formats' loops keep a row's coefficients on the stack */
typedef uint8_t v8u8_unaligned __attribute__((vector_size(8), aligned(1), may_alias));
typedef int8_t v8i8_unaligned __attribute__((vector_size(8), aligned(1), may_alias));

/* table[idx] for 8 indices, one at a time (the portable instance's table lookup) */
static inline __attribute__((always_inline)) v8f lookup8_portable(const float *table, v8i32 idx)
{
    v8f r;
    for (int i = 0; i < 8; i++)
        r[i] = table[idx[i]];
    return r;
}

#define KV_NAME(name) name##_portable
#define KV_LOOKUP8(table, idx) lookup8_portable(table, idx)
#define KV_LOOKUP16(table, idx) lookup8_portable(table, idx)
#define KV_U8x8(p) __builtin_convertvector(*(const v8u8_unaligned *)(p), v8i32)
#define KV_I8x8(p) __builtin_convertvector(*(const v8i8_unaligned *)(p), v8i32)
#define KV_LOAD_HALF8(p) half8_to_float(p)
#define KV_HALF(bits) from_half(bits)
#define KV_ATTR QI_VECTORIZE
#include "kv_kernels.h"
#undef KV_NAME
#undef KV_LOOKUP8
#undef KV_LOOKUP16
#undef KV_U8x8
#undef KV_I8x8
#undef KV_LOAD_HALF8
#undef KV_HALF
#undef KV_ATTR
#if QI_HAVE_F16C
/* AVX2's byte widening and F16C's conversions, built twice: for AVX2, and the same
 * source with AVX-512's 32 registers (the macros expand inside each target region) */
/* a table of up to 8 floats in one register, indexed per lane; 16: two, and bit 3 picks */
#define KV_LOOKUP8(table, idx) ((v8f)_mm256_permutevar8x32_ps(_mm256_loadu_ps(table), (__m256i)(idx)))
#define KV_LOOKUP16(table, idx) ((v8f)_mm256_blendv_ps(KV_LOOKUP8(table, idx), KV_LOOKUP8((table) + 8, idx), \
                                                        (__m256)((idx) << 28)))
#define KV_U8x8(p) ((v8i32)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
#define KV_I8x8(p) ((v8i32)_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
#define KV_LOAD_HALF8(p) ((v8f)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p))))
#define KV_HALF(bits) _cvtsh_ss(bits)
#define KV_ATTR
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define KV_NAME(name) name##_avx2
#include "kv_kernels.h"
#undef KV_NAME
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512vl")
#define KV_NAME(name) name##_avx512
#include "kv_kernels.h"
#undef KV_NAME
#pragma GCC pop_options
#undef KV_LOOKUP8
#undef KV_LOOKUP16
#undef KV_U8x8
#undef KV_I8x8
#undef KV_LOAD_HALF8
#undef KV_HALF
#undef KV_ATTR
#endif

/* The loops for this cache's codes: AVX2's where the CPU has it (and F16C), unless
 * kv_hardware_halves is 0 (tests). Their sums run in the same order, but the compiler
 * fuses multiplies and adds differently in each: results differ in float32 rounding. */
static const kv_loops *coded_loops(const run_state *s)
{
    const kv_loops *table = kv_loops_table_portable;
    size_t count = sizeof(kv_loops_table_portable) / sizeof(kv_loops);
#if QI_HAVE_F16C
    if (use_avx512()) {
        table = kv_loops_table_avx512;
        count = sizeof(kv_loops_table_avx512) / sizeof(kv_loops);
    } else if (use_f16c()) {
        table = kv_loops_table_avx2;
        count = sizeof(kv_loops_table_avx2) / sizeof(kv_loops);
    }
#endif
    for (size_t i = 0; i < count; i++)
        if (table[i].bits == s->kv.bits)
            return &table[i];
    return NULL;   /* alloc_state took only formats the table holds */
}

/* KIVI: the first key position a query at position p reads from the float16 window
 * (keys leave it a group at a time), and the first value position. */
static int first_window_key(const run_state *s, int p)
{
    const int from = p + 1 - s->kv.residual;
    return from <= 0 ? 0 : from / s->kv.group * s->kv.group;
}

static int first_window_value(const run_state *s, int p)
{
    const int from = p + 1 - s->kv.residual;
    return from < 0 ? 0 : from;
}

/* The coded tiles (attention_tile_coded, attention_tile_kvquant) give each token's rows
 * passes of their own: the heads of a pass starting at head h0, and the tile's row of
 * token t, head h. */
static inline int pass_heads(const query_tile *tile, int h0)
{
    return tile->nh - h0 < ROWS_PER_PASS ? tile->nh - h0 : ROWS_PER_PASS;
}

static inline int tile_row(const query_tile *tile, int t, int h)
{
    return t * tile->nh + h;
}

/* Each row's scores over its positions 0..its own as probabilities, its output zeroed. */
static void coded_tile_softmax(const weights *w, run_state *s, const query_tile *tile, float *scores, size_t row_len)
{
    for (int t = 0; t < tile->nt; t++)
        for (int h = 0; h < tile->nh; h++) {
            softmax(scores + tile_row(tile, t, h) * row_len, tile->pos + t);
            memset(s->att + tile_offset(w, tile, tile_row(tile, t, h)), 0, sizeof(float) * w->head_dim);
        }
}

/* attention_tile for a coded cache (KV_Q8, KV_KIVI). Each token's rows go in passes of
 * their own (up to ROWS_PER_PASS heads of one token): a token decides which of its
 * positions it reads through codes and which from the window, so a pass reads each
 * position one way for all its rows, and a row's sums are the same in a prefill as
 * when its token is decoded alone. A tile of several tokens (a prefill) widens each
 * block it reads, codes and window halves, to floats once after its scores, for all
 * its passes (exact conversions: the same sums). Scores past a row's own position are
 * computed and never read. */
static void attention_tile_coded(const weights *w, run_state *s, int layer, const query_tile *tile,
                                 float *scores, size_t row_len)
{
    const int hd = w->head_dim, windowed = s->kv.format == KV_KIVI;
    const float scale = 1.0f / sqrtf((float)hd);
    void *keys = key_head(w, s, tile->seq, layer, tile->kv_h);
    void *values = value_head(w, s, tile->seq, layer, tile->kv_h);
    const uint16_t *key_params = key_params_head(w, s, tile->seq, layer, tile->kv_h);
    const uint16_t *value_params = value_params_head(w, s, tile->seq, layer, tile->kv_h);
    uint16_t *key_window = windowed ? key_window_head(w, s, tile->seq, layer, tile->kv_h) : NULL;
    uint16_t *value_window = windowed ? value_window_head(w, s, tile->seq, layer, tile->kv_h) : NULL;
    const int last_of_tile = tile->pos + tile->nt - 1;
    const kv_loops *loops = coded_loops(s);
    const size_t params_step = value_params_per_position(w, s);
    const int widen = tile->nt > 1;
    float *wide_codes = scores + tile_score_floats(w, s);          /* a block: [hd][32] or [32][hd] */
    float *wide_window = wide_codes + (size_t)KV_BLOCK * hd;
    const float *q[ROWS_PER_PASS];
    float *row_scores[ROWS_PER_PASS], *out[ROWS_PER_PASS];
/* KIVI: whether the token at position p reads key block b from the window */
#define KEY_FROM_WINDOW(b, p) (windowed && ((b) + 1) * KV_BLOCK > first_window_key(s, p))

    for (int b = 0; b * KV_BLOCK <= last_of_tile; b++) {
        const uint16_t *params = key_params + key_params_before(w, s, b);
        if (widen) {
            int coded = 0, window = 0;
            for (int p = b * KV_BLOCK > tile->pos ? b * KV_BLOCK : tile->pos; p <= last_of_tile; p++)
                KEY_FROM_WINDOW(b, p) ? (window = 1) : (coded = 1);
            if (coded)
                loops->widen(key_codes(w, s, keys, b), wide_codes, hd);
            if (window)
                widen_halves(window_key_block(w, s, key_window, b * KV_BLOCK), wide_window, (size_t)hd * KV_BLOCK);
        }
        for (int t = 0; t < tile->nt; t++) {
            const int p = tile->pos + t;
            if (b * KV_BLOCK > p)
                continue;
            const int from_window = KEY_FROM_WINDOW(b, p);
            for (int h0 = 0; h0 < tile->nh; h0 += ROWS_PER_PASS) {
                const int n = pass_heads(tile, h0);
                for (int r = 0; r < n; r++) {
                    q[r] = s->q + tile_offset(w, tile, tile_row(tile, t, h0 + r));
                    row_scores[r] = scores + tile_row(tile, t, h0 + r) * row_len + (size_t)b * KV_BLOCK;
                }
                if (from_window && widen)
                    score_block(q, wide_window, 0, hd, scale, row_scores, n, 0);
                else if (from_window)
                    score_block(q, window_key_block(w, s, key_window, b * KV_BLOCK), 0, hd, scale, row_scores, n, 1);
                else if (widen)
                    loops->score_block_wide(q, wide_codes, params, hd, scale, row_scores, n);
                else
                    loops->score_block(q, key_codes(w, s, keys, b), params, hd, scale, row_scores, n);
            }
        }
    }
    coded_tile_softmax(w, s, tile, scores, row_len);
    for (int first = 0; first <= last_of_tile; first += KV_BLOCK) {
        const int block_last = last_of_tile < first + KV_BLOCK - 1 ? last_of_tile : first + KV_BLOCK - 1;
        /* a token at p reads [first, coded_last] through codes and [window_first, last] from the window */
#define LAST(p) ((p) < block_last ? (p) : block_last)
#define WINDOW_FROM(p) (windowed ? first_window_value(s, p) : (p) + 1)
#define CODED_LAST(p) (LAST(p) < WINDOW_FROM(p) - 1 ? LAST(p) : WINDOW_FROM(p) - 1)
#define WINDOW_FIRST(p) (first > WINDOW_FROM(p) ? first : WINDOW_FROM(p))
        int coded_hi = first - 1, window_lo = block_last + 1;   /* what the tile's tokens read, together */
        if (widen) {
            for (int p = first > tile->pos ? first : tile->pos; p <= last_of_tile; p++) {
                coded_hi = CODED_LAST(p) > coded_hi ? CODED_LAST(p) : coded_hi;
                if (WINDOW_FIRST(p) <= LAST(p) && WINDOW_FIRST(p) < window_lo)
                    window_lo = WINDOW_FIRST(p);
            }
            if (coded_hi >= first)
                loops->widen(value_codes(w, s, values, first), wide_codes, (size_t)(coded_hi - first + 1) * (hd / KV_BLOCK));
            if (window_lo <= block_last)
                widen_halves(window_value_row(w, s, value_window, window_lo), wide_window,
                             (size_t)(block_last - window_lo + 1) * hd);
        }
        for (int t = 0; t < tile->nt; t++) {
            const int p = tile->pos + t;
            if (first > p)
                continue;
            const int last = LAST(p), coded_last = CODED_LAST(p), window_first = WINDOW_FIRST(p);
            for (int h0 = 0; h0 < tile->nh; h0 += ROWS_PER_PASS) {
                const int n = pass_heads(tile, h0);
                for (int r = 0; r < n; r++)
                    out[r] = s->att + tile_offset(w, tile, tile_row(tile, t, h0 + r));
                if (first <= coded_last) {
                    for (int r = 0; r < n; r++)   /* widened, position `first` is row 0: shift the rest with it */
                        row_scores[r] = scores + tile_row(tile, t, h0 + r) * row_len + (widen ? first : 0);
                    if (widen)
                        loops->add_values_wide((const float *const *)row_scores, wide_codes, value_params + first * params_step,
                                               hd, s->kv.group, 0, coded_last - first, out, n);
                    else
                        loops->add_values((const float *const *)row_scores, (const uint8_t *)values, value_params,
                                          hd, s->kv.group, first, coded_last, out, n);
                }
                if (window_first <= last) {   /* a block's window rows are consecutive in the ring */
                    const int from = widen ? window_lo : window_first;
                    for (int r = 0; r < n; r++)
                        row_scores[r] = scores + tile_row(tile, t, h0 + r) * row_len + from;
                    if (widen)
                        add_values((const float *const *)row_scores, wide_window, hd, window_first - from, last - from,
                                   out, n, 0);
                    else
                        add_values((const float *const *)row_scores, window_value_row(w, s, value_window, from),
                                   hd, 0, last - from, out, n, 1);
                }
            }
        }
#undef LAST
#undef WINDOW_FROM
#undef CODED_LAST
#undef WINDOW_FIRST
    }
#undef KEY_FROM_WINDOW
}

/* ------------------------------------------------------------- KV_KVQUANT */

/* Rows of 32 kvquant codes as floats through tables (kv_kernels.h, kvq_rows): AVX2's
 * table lookups where the CPU has them (and F16C), else the portable ones. */
static void kvquant_rows(const run_state *s, const uint8_t *codes, int rows, const float *tables,
                         size_t table_step, float *dst)
{
#if QI_HAVE_F16C
    if (use_avx512()) {
        kvq_rows_avx512(s->kv.bits, codes, code_row_bytes(s), rows, tables, table_step, dst);
        return;
    }
    if (use_f16c()) {
        kvq_rows_avx2(s->kv.bits, codes, code_row_bytes(s), rows, tables, table_step, dst);
        return;
    }
#endif
    kvq_rows_portable(s->kv.bits, codes, code_row_bytes(s), rows, tables, table_step, dst);
}

/* Key block b of one head, floats [hd][32] before RoPE, rotated in place at its positions. */
QI_VECTORIZE
static void rotate_keys(const weights *w, const run_state *s, int b, float *wide)
{
    const int half = w->head_dim / 2;
    const float *rope = s->rope + rope_at(w, (size_t)b * KV_BLOCK, 0);   /* [hd][32]: cos, then sin */
    for (int i = 0; i < half; i++)             /* as rope_row rotates a query; in vectors: */
        for (int e = 0; e < KV_BLOCK; e += 8) {   /* written as scalars GCC left it scalar (wide may alias rope) */
            float *lo = wide + (size_t)i * KV_BLOCK + e, *hi = wide + (size_t)(half + i) * KV_BLOCK + e;
            const v8f x = LOAD8(lo), y = LOAD8(hi);
            const v8f c = LOAD8(rope + (size_t)i * KV_BLOCK + e), sn = LOAD8(rope + (size_t)(half + i) * KV_BLOCK + e);
            STORE8(lo, x * c - y * sn);
            STORE8(hi, y * c + x * sn);
        }
}

/* Key block b of one head as floats [hd][32]: each code through its channel's table
 * (center + half_range * level, kvquant_tables), the outliers put back, then RoPE at each
 * position (the keys are held before it); position 0 is the sink's key. */
QI_VECTORIZE
static void kvquant_keys(const weights *w, const run_state *s, int seq, int layer, int kv_h, int b, float *wide)
{
    const int hd = w->head_dim, slots = key_slots(w);
    const uint8_t *codes = key_codes(w, s, key_head(w, s, seq, layer, kv_h), b);
    const uint16_t *outliers = key_params_head(w, s, seq, layer, kv_h) + key_params_before(w, s, b);
    kvquant_rows(s, codes, hd, s->key_table + ((size_t)layer * w->n_kv_heads + kv_h) * hd * KVQ_TABLE, KVQ_TABLE,
                 wide);
    for (int e = 0; e < KV_BLOCK; e++)
        for (int i = 0; i < slots; i++) {
            const uint16_t channel = outliers[((size_t)e * slots + i) * 2 + 1];
            if (channel)
                wide[(channel - 1) * KV_BLOCK + e] = from_half(outliers[((size_t)e * slots + i) * 2]);
        }
    rotate_keys(w, s, b, wide);
    if (b == 0) {
        const uint16_t *sink = sink_head(w, s, seq, layer, kv_h);
        for (int c = 0; c < hd; c++)
            wide[c * KV_BLOCK] = from_half(sink[c]);
    }
}

/* Values of positions first..last of one head as floats [last - first + 1][hd]: each
 * position's codes through its own table (center + half_range * level). */
QI_VECTORIZE
static void kvquant_values(const weights *w, const run_state *s, int seq, int layer, int kv_h, int first, int last,
                           float *wide)
{
    const int hd = w->head_dim, n_out = value_outliers(w), n_levels = 1 << s->kv.bits;
    const float *levels = s->value_levels + (size_t)layer * n_levels;
    const uint16_t *params = value_params_head(w, s, seq, layer, kv_h);
    void *head = value_head(w, s, seq, layer, kv_h);
    float table[KVQ_TABLE] = {0};
    for (int j = first; j <= last; j++) {
        float *row = wide + (size_t)(j - first) * hd;
        if (j == 0) {
            const uint16_t *sink = sink_head(w, s, seq, layer, kv_h) + hd;
            for (int c = 0; c < hd; c++)
                row[c] = from_half(sink[c]);
            continue;
        }
        const uint16_t *p = params + (size_t)j * value_params_per_position(w, s);
        const float mid = from_half(p[0]), radius = from_half(p[1]);
        for (int k = 0; k < n_levels; k++)
            table[k] = mid + radius * levels[k];
        kvquant_rows(s, value_codes(w, s, head, j), hd / KV_BLOCK, table, 0, row);
        for (int i = 0; i < n_out; i++)
            if (p[3 + 2 * i])
                row[p[3 + 2 * i] - 1] = from_half(p[2 + 2 * i]);
    }
}

/* attention_tile for KV_KVQUANT: every block the tile reads is dequantized into floats
 * once (keys rotated), in a decode step as in a prefill, and read by the float loops;
 * a token's rows go in passes of their own, as in attention_tile_coded. With a window
 * (R > 0), a token at p reads positions >= first_window_value(p) from it instead: a
 * block that holds both kinds for a token is scored twice, the window's lanes taken
 * from the second. */
static void attention_tile_kvquant(const weights *w, run_state *s, int layer, const query_tile *tile,
                                   float *scores, size_t row_len)
{
    const int hd = w->head_dim, last_of_tile = tile->pos + tile->nt - 1;
    const float scale = 1.0f / sqrtf((float)hd);
    float *wide_codes = scores + tile_score_floats(w, s);          /* a block: [hd][32] or [32][hd] */
    float *wide_window = wide_codes + (size_t)KV_BLOCK * hd;
    uint16_t *key_window = s->window_blocks ? key_window_head(w, s, tile->seq, layer, tile->kv_h) : NULL;
    uint16_t *value_window = s->window_blocks ? value_window_head(w, s, tile->seq, layer, tile->kv_h) : NULL;
    const float *q[ROWS_PER_PASS];
    float *row_scores[ROWS_PER_PASS], *out[ROWS_PER_PASS];
    float window_scores[ROWS_PER_PASS][KV_BLOCK];
    /* the first position a token at p reads from the window (p + 1: none) */
#define WINDOW_FROM(p) (s->window_blocks ? first_window_value(s, p) : (p) + 1)

    for (int b = 0; b * KV_BLOCK <= last_of_tile; b++) {
        const int first = b * KV_BLOCK;
        int coded = 0, window = 0;              /* what the tile's tokens read of this block */
        for (int p = first > tile->pos ? first : tile->pos; p <= last_of_tile; p++) {
            coded |= first < WINDOW_FROM(p);
            window |= first + KV_BLOCK > WINDOW_FROM(p) && WINDOW_FROM(p) <= p;
        }
        if (coded)
            kvquant_keys(w, s, tile->seq, layer, tile->kv_h, b, wide_codes);
        if (window) {
            widen_halves(window_key_block(w, s, key_window, first), wide_window, (size_t)hd * KV_BLOCK);
            rotate_keys(w, s, b, wide_window);
        }
        for (int t = 0; t < tile->nt; t++) {
            const int p = tile->pos + t, from = WINDOW_FROM(p);
            if (first > p)
                continue;
            for (int h0 = 0; h0 < tile->nh; h0 += ROWS_PER_PASS) {
                const int n = pass_heads(tile, h0);
                for (int r = 0; r < n; r++) {
                    q[r] = s->q + tile_offset(w, tile, tile_row(tile, t, h0 + r));
                    row_scores[r] = scores + tile_row(tile, t, h0 + r) * row_len + first;
                }
                if (from >= first + KV_BLOCK || from > p) {          /* all through codes */
                    score_block(q, wide_codes, 0, hd, scale, row_scores, n, 0);
                } else if (from <= first) {                         /* all from the window */
                    score_block(q, wide_window, 0, hd, scale, row_scores, n, 0);
                } else {                                            /* codes, then the window from lane from - first */
                    float *in_window[ROWS_PER_PASS];
                    for (int r = 0; r < n; r++)
                        in_window[r] = window_scores[r];
                    score_block(q, wide_codes, 0, hd, scale, row_scores, n, 0);
                    score_block(q, wide_window, 0, hd, scale, in_window, n, 0);
                    for (int r = 0; r < n; r++)
                        memcpy(row_scores[r] + (from - first), window_scores[r] + (from - first),
                               sizeof(float) * (size_t)(first + KV_BLOCK - from));
                }
            }
        }
    }
    coded_tile_softmax(w, s, tile, scores, row_len);
    for (int first = 0; first <= last_of_tile; first += KV_BLOCK) {
        const int block_last = last_of_tile < first + KV_BLOCK - 1 ? last_of_tile : first + KV_BLOCK - 1;
        int coded_last = first - 1, window_first = block_last + 1;   /* what the tile's tokens read, together */
        for (int p = first > tile->pos ? first : tile->pos; p <= last_of_tile; p++) {
            const int last = p < block_last ? p : block_last, from = WINDOW_FROM(p);
            const int codes_to = from - 1 < last ? from - 1 : last, window_from = from > first ? from : first;
            coded_last = codes_to > coded_last ? codes_to : coded_last;
            if (window_from <= last)
                window_first = window_from < window_first ? window_from : window_first;
        }
        if (coded_last >= first)
            kvquant_values(w, s, tile->seq, layer, tile->kv_h, first, coded_last, wide_codes);
        if (window_first <= block_last)   /* a block's window rows are consecutive in the ring */
            widen_halves(window_value_row(w, s, value_window, window_first), wide_window,
                         (size_t)(block_last - window_first + 1) * hd);
        for (int t = 0; t < tile->nt; t++) {
            const int p = tile->pos + t;
            if (first > p)
                continue;
            const int last = p < block_last ? p : block_last, from = WINDOW_FROM(p);
            const int codes_to = from - 1 < last ? from - 1 : last, window_from = from > first ? from : first;
            for (int h0 = 0; h0 < tile->nh; h0 += ROWS_PER_PASS) {
                const int n = pass_heads(tile, h0);
                for (int r = 0; r < n; r++) {   /* position `first` is row 0 of the codes' block */
                    row_scores[r] = scores + tile_row(tile, t, h0 + r) * row_len + first;
                    out[r] = s->att + tile_offset(w, tile, tile_row(tile, t, h0 + r));
                }
                if (codes_to >= first)
                    add_values((const float *const *)row_scores, wide_codes, hd, 0, codes_to - first, out, n, 0);
                if (window_from <= last) {     /* the window's block starts at window_first */
                    for (int r = 0; r < n; r++)
                        row_scores[r] += window_first - first;
                    add_values((const float *const *)row_scores, wide_window, hd, window_from - window_first,
                               last - window_first, out, n, 0);
                }
            }
        }
    }
#undef WINDOW_FROM
}

/* One token (decode) has too few tiles to share out if a tile holds the whole group;
 * but a coded cache's tile unpacks each code once for all its rows, which outweighs
 * the threads' uneven shares. */
static int heads_per_tile(const weights *w, const run_state *s, int n)
{
    const int coded = s->kv.format != KV_F32 && s->kv.format != KV_F16;
    return n == 1 && !coded ? 1 : w->n_heads / w->n_kv_heads;
}

/* Tokens of one tile: rows of different sequences (a batched step) each have their own. */
static int tile_tokens(const run_state *s)
{
    return s->row_seq ? 1 : QUERY_TOKENS;
}

/* The query tiles attention() shares out among its threads. */
static int attention_jobs(const weights *w, const run_state *s, int n)
{
    return (n + tile_tokens(s) - 1) / tile_tokens(s) * w->n_heads / heads_per_tile(w, s, n);
}

/* Query tile `job` of the n new tokens first.. of a call at positions pos.. (run_state:
 * row_seq, row_pos), with a thread's `scores`. */
static void attention_job(const weights *w, run_state *s, int layer, int pos, int first, int n, int job,
                          float *scores)
{
    const int group = w->n_heads / w->n_kv_heads, nh = heads_per_tile(w, s, n), tiles_per_group = group / nh;
    const int per_tile = tile_tokens(s), token_tiles = (n + per_tile - 1) / per_tile;
    const int heads_job = job % (w->n_kv_heads * tiles_per_group);
    query_tile tile;
    /* later token tiles have longer rows: hand them out first */
    tile.t0 = first + (token_tiles - 1 - job / (w->n_kv_heads * tiles_per_group)) * per_tile;
    tile.nt = first + n - tile.t0 < per_tile ? first + n - tile.t0 : per_tile;
    tile.kv_h = heads_job / tiles_per_group;
    tile.nh = nh;
    tile.h0 = tile.kv_h * group + (heads_job % tiles_per_group) * nh;
    tile.seq = row_seq(s, tile.t0);
    tile.pos = row_pos(s, pos, tile.t0);
    if (s->kv.format == KV_F32 || s->kv.format == KV_F16)
        attention_tile(w, s, layer, &tile, scores, (size_t)s->ctx_blocks * KV_BLOCK);
    else if (s->kv.format == KV_KVQUANT)
        attention_tile_kvquant(w, s, layer, &tile, scores, (size_t)s->ctx_blocks * KV_BLOCK);
    else
        attention_tile_coded(w, s, layer, &tile, scores, (size_t)s->ctx_blocks * KV_BLOCK);
}

/* Thread `thread`'s block of attention scores. */
static float *thread_scores(const weights *w, const run_state *s, int thread)
{
    return s->scores + (size_t)thread * scores_per_thread(w, s);
}

/* Causal grouped-query attention of the n new tokens first.. of a call (positions
 * pos + first..) over the cache: the query tiles taken in turn by the team's threads
 * (exec_ctx), or by a parallel region's as each finishes one. */
static void attention(const weights *w, run_state *s, int layer, int pos, int first, int n, const exec_ctx *cx)
{
    if (cx->tm && s->row_seq) {
        /* a batched step's tiles, one per row and KV head, of rows at their own depths:
         * claimed as the linear maps' are (team_claim; a barrier precedes this call) */
        team_claims claims = team_claims_of(cx->tm, attention_jobs(w, s, n), 1);
        int a, b;
        while (team_claim(&claims, &a, &b))
            for (int job = a; job < b; job++)
                attention_job(w, s, layer, pos, first, n, job, thread_scores(w, s, cx->tm->thread));
        return;
    }
    if (cx->tm) {
        for (int job = cx->tm->thread; job < attention_jobs(w, s, n); job += cx->tm->threads)
            attention_job(w, s, layer, pos, first, n, job, thread_scores(w, s, cx->tm->thread));
        return;
    }
    int job;
    #pragma omp parallel for schedule(dynamic, 1) num_threads(team_thread_count(cx->nthreads))
    for (job = 0; job < attention_jobs(w, s, n); job++) {
#ifdef _OPENMP
        float *scores = thread_scores(w, s, omp_get_thread_num());
#else
        float *scores = thread_scores(w, s, 0);
#endif
        attention_job(w, s, layer, pos, first, n, job, scores);
    }
}
