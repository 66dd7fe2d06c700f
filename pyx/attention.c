/* attention.c: the KV cache (where a layer's keys and values sit) and causal
 * grouped-query attention over it, a tile of queries at a time. Part of
 * _forward.pyx's translation unit (forward.h).
 *
 * Cache formats (run_state.kv_format), each value in the same place:
 *   KV_F32  float32, 4 bytes a value
 *   KV_F16  IEEE float16 (round to nearest even when stored), 2 bytes a value:
 *           half the memory, and half the bytes attention reads at depth
 * Per layer and KV head of a sequence: keys in blocks of KV_BLOCK positions,
 * each block transposed, [ctx_blocks][head_dim][KV_BLOCK] (a score block reads
 * one row of KV_BLOCK positions per dimension); values [ctx][head_dim]. */
#include "forward.h"

/* Bytes of one cached value. */
static size_t kv_value_bytes(const run_state *s)
{
    return s->kv_format == KV_F16 ? 2 : 4;
}

/* Where sequence seq's keys and values of a layer's KV head start in the cache, in values. */
static size_t head_offset(const weights *w, const run_state *s, int seq, int layer, int kv_h)
{
    return (((size_t)seq * w->n_layers + layer) * w->n_kv_heads + kv_h) * s->ctx_blocks * KV_BLOCK * w->head_dim;
}

static void *key_head(const weights *w, const run_state *s, int seq, int layer, int kv_h)
{
    return (char *)s->key_cache + head_offset(w, s, seq, layer, kv_h) * kv_value_bytes(s);
}

static void *value_head(const weights *w, const run_state *s, int seq, int layer, int kv_h)
{
    return (char *)s->value_cache + head_offset(w, s, seq, layer, kv_h) * kv_value_bytes(s);
}

/* Move new token t's key and value (after RoPE) into sequence seq's cache at position p. */
static void store_kv_row(const weights *w, run_state *s, int seq, int layer, int t, int p)
{
    const int hd = w->head_dim, kv_dim = w->n_kv_heads * hd, block = p / KV_BLOCK, lane = p % KV_BLOCK;
    for (int h = 0; h < w->n_kv_heads; h++) {
        const float *k = s->k + (size_t)t * kv_dim + h * hd, *v = s->v + (size_t)t * kv_dim + h * hd;
        const size_t key0 = (size_t)block * hd * KV_BLOCK + lane, value0 = (size_t)p * hd;
        if (s->kv_format == KV_F16) {
            _Float16 *kb = (_Float16 *)key_head(w, s, seq, layer, h) + key0;
            _Float16 *vb = (_Float16 *)value_head(w, s, seq, layer, h) + value0;
            for (int i = 0; i < hd; i++) {
                kb[(size_t)i * KV_BLOCK] = (_Float16)k[i];
                vb[i] = (_Float16)v[i];
            }
            continue;
        }
        float *kb = (float *)key_head(w, s, seq, layer, h) + key0;
        for (int i = 0; i < hd; i++)
            kb[(size_t)i * KV_BLOCK] = k[i];
        memcpy((float *)value_head(w, s, seq, layer, h) + value0, v, sizeof(float) * hd);
    }
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
typedef _Float16 v8h_unaligned __attribute__((vector_size(16), aligned(2), may_alias));
#define LOAD8(p) (*(const v8f_unaligned *)(p))
#define STORE8(p, v) (*(v8f_unaligned *)(p) = (v))
/* 8 cached values from `base` (values, not bytes, from the start), as floats: `half`
 * is a constant in each caller (KV_F16), so each format gets its own loop. */
static inline __attribute__((always_inline)) v8f load_kv8(const void *base, size_t i, const int half)
{
    if (half)
        return __builtin_convertvector(*(const v8h_unaligned *)((const _Float16 *)base + i), v8f);
    return LOAD8((const float *)base + i);
}
#define LOAD_KV8(base, i, half) load_kv8(base, i, half)
#define PASS_WIDTH 32   /* floats of a row one pass holds: 4 vectors */

/* acc[r] += coef[r][index] * row[0..PASS_WIDTH) for r < R, the row at value `at` of
 * `base`: the row is loaded once for all R multiply-adds (scores: a key row by
 * q[r][i]; value sums: a value row by p[r][j]). */
static inline __attribute__((always_inline))
void add_scaled_row(v8f acc[][PASS_WIDTH / 8], const void *base, size_t at, const float *const *coef, int index,
                    const int R, const int half)
{
    const v8f r0 = LOAD_KV8(base, at, half), r1 = LOAD_KV8(base, at + 8, half);
    const v8f r2 = LOAD_KV8(base, at + 16, half), r3 = LOAD_KV8(base, at + 24, half);
    for (int r = 0; r < R; r++) {
        const float c = coef[r][index];
        acc[r][0] += c * r0;
        acc[r][1] += c * r1;
        acc[r][2] += c * r2;
        acc[r][3] += c * r3;
    }
}

/* scores[r][0..KV_BLOCK) = scale * (q[r] . key) for the KV_BLOCK positions of one key block
 * (at value `at` of `keys`), r < R */
_Static_assert(KV_BLOCK == PASS_WIDTH, "score_block_rows holds one key block per pass");
static inline __attribute__((always_inline))
void score_block_rows(const float *const *q, const void *keys, size_t at, int hd, float scale,
                      float *const *scores, const int R, const int half)
{
    v8f acc[ROWS_PER_PASS][PASS_WIDTH / 8];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < PASS_WIDTH / 8; c++)
            acc[r][c] = (v8f){0};
    for (int i = 0; i < hd; i++)
        add_scaled_row(acc, keys, at + (size_t)i * KV_BLOCK, q, i, R, half);
    for (int r = 0; r < R; r++)
        for (int c = 0; c < PASS_WIDTH / 8; c++)
            STORE8(scores[r] + 8 * c, acc[r][c] * scale);
}

QI_VECTORIZE
static void score_block(const float *const *q, const void *keys, size_t at, int hd, float scale,
                        float *const *scores, int rows, int half)
{
#define SCORE_BLOCK(R, H) score_block_rows(q, keys, at, hd, scale, scores, R, H)
    if (half)
        rows == 3 ? SCORE_BLOCK(3, 1) : rows == 2 ? SCORE_BLOCK(2, 1) : SCORE_BLOCK(1, 1);
    else
        rows == 3 ? SCORE_BLOCK(3, 0) : rows == 2 ? SCORE_BLOCK(2, 0) : SCORE_BLOCK(1, 0);
#undef SCORE_BLOCK
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
void add_values_rows(const float *const *p, const void *values, int hd, int first, int last,
                     float *const *out, const int R, const int half)
{
    int i0 = 0;
    for (; i0 + VALUE_CHUNK <= hd; i0 += VALUE_CHUNK) {
        v8f acc[ROWS_PER_PASS][PASS_WIDTH / 8];
        for (int r = 0; r < R; r++)
            for (int c = 0; c < PASS_WIDTH / 8; c++)
                acc[r][c] = LOAD8(out[r] + i0 + 8 * c);
        for (int j = first; j <= last; j++)
            add_scaled_row(acc, values, (size_t)j * hd + i0, p, j, R, half);
        for (int r = 0; r < R; r++)
            for (int c = 0; c < PASS_WIDTH / 8; c++)
                STORE8(out[r] + i0 + 8 * c, acc[r][c]);
    }
    for (int r = 0; r < R; r++)                  /* a head_dim that is not a multiple of the chunk */
        for (int j = first; j <= last; j++)
            for (int i = i0; i < hd; i++)
                out[r][i] += p[r][j] * (half ? (float)((const _Float16 *)values)[(size_t)j * hd + i]
                                             : ((const float *)values)[(size_t)j * hd + i]);
}

QI_VECTORIZE
static void add_values(const float *const *p, const void *values, int hd, int first, int last,
                       float *const *out, int rows, int half)
{
#define ADD_VALUES(R, H) add_values_rows(p, values, hd, first, last, out, R, H)
    if (half)
        rows == 3 ? ADD_VALUES(3, 1) : rows == 2 ? ADD_VALUES(2, 1) : ADD_VALUES(1, 1);
    else
        rows == 3 ? ADD_VALUES(3, 0) : rows == 2 ? ADD_VALUES(2, 0) : ADD_VALUES(1, 0);
#undef ADD_VALUES
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
    const int half = s->kv_format == KV_F16;
    const int last_of_tile = tile->pos + tile->nt - 1;
    /* Rows go token by token, so a pass's last row attends furthest. A pass
     * covers the positions its last row attends to; its earlier rows' scores
     * past their own last position are computed but never read, and their
     * probabilities there are set to 0, which adds nothing to their sums. */
#define LAST_OF_ROW(r) (tile->pos + (r) / tile->nh)   /* the row's query attends to 0..this */
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
            score_block(q, keys, (size_t)b * hd * KV_BLOCK, hd, scale, row_scores, n, half);
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
                       pass_last < first + KV_BLOCK - 1 ? pass_last : first + KV_BLOCK - 1, out, n, half);
        }
#undef PASS_ROWS
#undef LAST_OF_ROW
}

/* One token (decode) has too few tiles to share out if a tile holds the whole group. */
static int heads_per_tile(const weights *w, int n)
{
    return n == 1 ? 1 : w->n_heads / w->n_kv_heads;
}

/* Tokens of one tile: rows of different sequences (a batched step) each have their own. */
static int tile_tokens(const run_state *s)
{
    return s->row_seq ? 1 : QUERY_TOKENS;
}

/* The query tiles attention() shares out among its threads. */
static int attention_jobs(const weights *w, const run_state *s, int n)
{
    return (n + tile_tokens(s) - 1) / tile_tokens(s) * w->n_heads / heads_per_tile(w, n);
}

/* Query tile `job` of n new tokens at positions pos.. (run_state: row_seq, row_pos), with
 * a thread's `scores`. */
static void attention_job(const weights *w, run_state *s, int layer, int pos, int n, int job, float *scores)
{
    const int group = w->n_heads / w->n_kv_heads, nh = heads_per_tile(w, n), tiles_per_group = group / nh;
    const int per_tile = tile_tokens(s), token_tiles = (n + per_tile - 1) / per_tile;
    const int heads_job = job % (w->n_kv_heads * tiles_per_group);
    query_tile tile;
    /* later token tiles have longer rows: hand them out first */
    tile.t0 = (token_tiles - 1 - job / (w->n_kv_heads * tiles_per_group)) * per_tile;
    tile.nt = n - tile.t0 < per_tile ? n - tile.t0 : per_tile;
    tile.kv_h = heads_job / tiles_per_group;
    tile.nh = nh;
    tile.h0 = tile.kv_h * group + (heads_job % tiles_per_group) * nh;
    tile.seq = row_seq(s, tile.t0);
    tile.pos = row_pos(s, pos, tile.t0);
    attention_tile(w, s, layer, &tile, scores, (size_t)s->ctx_blocks * KV_BLOCK);
}

/* Thread `thread`'s block of attention scores. */
static float *thread_scores(const weights *w, const run_state *s, int thread)
{
    return s->scores + (size_t)thread * scores_per_thread(w, s);
}

/* Causal grouped-query attention of n new tokens at positions pos.. over the
 * cache: the query tiles taken in turn by the team's threads (exec_ctx), or
 * by a parallel region's as each finishes one. */
static void attention(const weights *w, run_state *s, int layer, int pos, int n, const exec_ctx *cx)
{
    if (cx->tm) {
        for (int job = cx->tm->thread; job < attention_jobs(w, s, n); job += cx->tm->threads)
            attention_job(w, s, layer, pos, n, job, thread_scores(w, s, cx->tm->thread));
        return;
    }
    int job;
    #pragma omp parallel for schedule(dynamic, 1) num_threads(thread_count(cx->nthreads))
    for (job = 0; job < attention_jobs(w, s, n); job++) {
#ifdef _OPENMP
        float *scores = thread_scores(w, s, omp_get_thread_num());
#else
        float *scores = thread_scores(w, s, 0);
#endif
        attention_job(w, s, layer, pos, n, job, scores);
    }
}
