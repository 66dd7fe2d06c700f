/* attention_rows.h: attention's inner loops (score blocks, value sums, and widening a
 * block of halves to floats) for one way of reading float16 caches; included twice by
 * attention.c, whose comments say what the loops do. Before each inclusion: KV_NAME(name) names this instance's functions,
 * KV_LOAD_HALF8(p) turns 8 halves at p into a v8f, KV_ATTR is the entry points'
 * attribute (the portable instance: target clones; the F16C one sits in a
 * `#pragma GCC target` region and needs none). */

/* 8 cached values from `base` (values, not bytes, from the start), as floats: `half`
 * is a constant in each caller (KV_F16), so each format gets its own loop. */
static inline __attribute__((always_inline)) v8f KV_NAME(load_kv8)(const void *base, size_t i, const int half)
{
    if (half)
        return KV_LOAD_HALF8((const uint16_t *)base + i);
    return LOAD8((const float *)base + i);
}

/* acc[r] += coef[r][index] * row[0..PASS_WIDTH) for r < R, the row at value `at` of
 * `base`: the row is loaded once for all R multiply-adds (scores: a key row by
 * q[r][i]; value sums: a value row by p[r][j]). */
static inline __attribute__((always_inline))
void KV_NAME(add_scaled_row)(v8f acc[][PASS_WIDTH / 8], const void *base, size_t at, const float *const *coef, int index,
                    const int R, const int half)
{
    const v8f r0 = KV_NAME(load_kv8)(base, at, half), r1 = KV_NAME(load_kv8)(base, at + 8, half);
    const v8f r2 = KV_NAME(load_kv8)(base, at + 16, half), r3 = KV_NAME(load_kv8)(base, at + 24, half);
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
void KV_NAME(score_block_rows)(const float *const *q, const void *keys, size_t at, int hd, float scale,
                      float *const *scores, const int R, const int half)
{
    v8f acc[ROWS_PER_PASS][PASS_WIDTH / 8];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < PASS_WIDTH / 8; c++)
            acc[r][c] = (v8f){0};
    for (int i = 0; i < hd; i++)
        KV_NAME(add_scaled_row)(acc, keys, at + (size_t)i * KV_BLOCK, q, i, R, half);
    for (int r = 0; r < R; r++)
        for (int c = 0; c < PASS_WIDTH / 8; c++)
            STORE8(scores[r] + 8 * c, acc[r][c] * scale);
}

KV_ATTR
static void KV_NAME(score_block)(const float *const *q, const void *keys, size_t at, int hd, float scale,
                        float *const *scores, int rows, int half)
{
#define SCORE_BLOCK(R, H) KV_NAME(score_block_rows)(q, keys, at, hd, scale, scores, R, H)
    if (half)
        rows == 3 ? SCORE_BLOCK(3, 1) : rows == 2 ? SCORE_BLOCK(2, 1) : SCORE_BLOCK(1, 1);
    else
        rows == 3 ? SCORE_BLOCK(3, 0) : rows == 2 ? SCORE_BLOCK(2, 0) : SCORE_BLOCK(1, 0);
#undef SCORE_BLOCK
}

/* out[r] += sum_{j in [first, last]} p[r][j] * values[j], r < R. The sums
 * run over all j in registers, VALUE_CHUNK floats of a row at a time, and go
 * back to out once: summed through out itself, every j would load and store
 * the whole row (out may alias values, as far as the compiler knows). */
static inline __attribute__((always_inline))
void KV_NAME(add_values_rows)(const float *const *p, const void *values, int hd, int first, int last,
                     float *const *out, const int R, const int half)
{
    int i0 = 0;
    for (; i0 + VALUE_CHUNK <= hd; i0 += VALUE_CHUNK) {
        v8f acc[ROWS_PER_PASS][PASS_WIDTH / 8];
        for (int r = 0; r < R; r++)
            for (int c = 0; c < PASS_WIDTH / 8; c++)
                acc[r][c] = LOAD8(out[r] + i0 + 8 * c);
        for (int j = first; j <= last; j++)
            KV_NAME(add_scaled_row)(acc, values, (size_t)j * hd + i0, p, j, R, half);
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

KV_ATTR
static void KV_NAME(add_values)(const float *const *p, const void *values, int hd, int first, int last,
                       float *const *out, int rows, int half)
{
#define ADD_VALUES(R, H) KV_NAME(add_values_rows)(p, values, hd, first, last, out, R, H)
    if (half)
        rows == 3 ? ADD_VALUES(3, 1) : rows == 2 ? ADD_VALUES(2, 1) : ADD_VALUES(1, 1);
    else
        rows == 3 ? ADD_VALUES(3, 0) : rows == 2 ? ADD_VALUES(2, 0) : ADD_VALUES(1, 0);
#undef ADD_VALUES
}


/* dst[0..count) = the halves at src as floats. */
KV_ATTR
static void KV_NAME(widen_halves)(const uint16_t *src, float *dst, size_t count)
{
    size_t i = 0;
    for (; i + 8 <= count; i += 8)
        STORE8(dst + i, KV_LOAD_HALF8(src + i));
    if (i < count) {            /* a head_dim that is not a multiple of 8 */
        uint16_t tail[8] = {0};
        float wide[8];
        memcpy(tail, src + i, sizeof(uint16_t) * (count - i));
        STORE8(wide, KV_LOAD_HALF8(tail));
        memcpy(dst + i, wide, sizeof(float) * (count - i));
    }
}
