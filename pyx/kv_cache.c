/* kv_cache.c: the KV cache, where each format keeps a layer's keys and values, and
 * how a new token's key and value go in. Part of _forward.pyx's translation unit
 * (forward.h); attention.c reads it.
 *
 * Every format keeps each (sequence, layer, KV head) in a "head" of its own, at
 * head_index(seq, layer, kv_h) times the head's size in each array. Positions go in
 * blocks of KV_BLOCK = 32; a block of keys is transposed, [head_dim][32], so a
 * score block is 32-wide vector multiply-adds with no horizontal sums. hd is the
 * head size, C the context in blocks (ctx_blocks), W the KIVI window in blocks.
 *
 *   KV_F32   keys   float [C][hd][32]      values float [C*32][hd]
 *   KV_F16   the same in IEEE float16 (rounded to nearest even)
 *   KV_Q8    keys   int8 codes [C][hd][32], key_params: float16 scales [C][hd/32][32]
 *            (one per 32 channels of a position);
 *            values int8 codes [C*32][hd], value_params: float16 scales [C*32][hd/32].
 *            Scale d = max|x| / 127 over the 32 values, code = rint(x / d), x ~ code * d.
 *   KV_KIVI  b-bit codes (b = 4 or 2), asymmetric: x ~ code * scale + min, scale =
 *            (max - min) / (2^b - 1) and min in float16, code = rint((x - min) / scale).
 *            keys   per channel over a group of G positions:
 *                   codes [C][hd][32 b/8 bytes], key_params [C*32/G][2][hd] (scales, then mins)
 *            values per position over a group of G channels:
 *                   codes [C*32][hd b/8 bytes],  value_params [C*32][hd/G][2] (scale, min)
 *            window: key_window float16 [W][hd][32], value_window float16 [W*32][hd],
 *                   position p at ring block (p / 32) % W, lane p % 32 (row p % (W*32)).
 *   KV_KVQUANT b-bit codes (b = 4, 3 or 2) indexing a layer's 2^b levels in [-1, 1]
 *            (qinfer/kv_calibration.py has the scheme and its calibration):
 *            keys   before RoPE, per channel: x ~ center_c + half_range_c * level, center
 *                   and half_range calibrated; |x - center_c| > half_range_c is an outlier.
 *                   codes [C][hd][32 b/8 bytes]; key_params: outliers [C*32][S][2]
 *                   (float16 value, channel + 1; 0: none), S = max(2, hd/32) per position,
 *                   the largest beyond their range first (more are clipped to the range)
 *            values per position: its (hd + 99) / 100 largest |x| are outliers, the rest
 *                   x ~ center + half_range * level with the inliers' own (min + max) / 2
 *                   and (max - min) / 2 in float16. codes [C*32][hd/32][32 b/8 bytes];
 *                   value_params [C*32][2 + 2 (hd + 99) / 100]: center, half_range, then
 *                   the outliers as (float16 value, channel + 1)
 *            sink:  position 0's key (after RoPE) and value in float16, [2][hd] per head
 *            window (R > 0): the newest R positions' keys (before RoPE) and values in float16
 *                   as well, laid out as KIVI's; W holds R + 2 KV_BLOCK positions (a query at p
 *                   reads positions >= p + 1 - R from it, keys and values alike: a position is
 *                   coded when stored and needs nothing of its neighbours to leave the window)
 *            Attention dequantizes a block (and rotates its keys) into floats, then reads those.
 *            3-bit codes are two planes: the low 2 bits as 2-bit codes (8 bytes), then the
 *            high bit of value e in byte 8 + e / 8, bit e % 8 (4 bytes).
 *            key_table: each channel's 2^b dequantized levels, center + half_range * level,
 *            [layers][kv_heads][hd][16] floats, made at load (attention looks them up).
 *
 * Codes of b bits fill a 32-value row (32 positions of a key channel, 32 channels of a
 * value) in 32 b/8 bytes: value e sits in byte e % (32 b/8), at bit b * (e / (32 b/8)).
 * An unpacked 8-value vector is then one load of 8 bytes, a shift and a mask.
 *
 * KIVI's window: a query at position p reads the values of positions >= p + 1 - R and
 * the keys of the groups that end after p + 1 - R at float16, the rest through their
 * codes (keys leave the window a whole group at a time: a per-channel scale over one
 * new position would be meaningless). Every value is coded when stored (per position,
 * it needs nothing more); a key group is coded when its last position is stored
 * (close_key_group). The ring holds R + G + KV_BLOCK positions: all that the queries of
 * one block of a call's tokens can still read at float16, and the block's own tokens
 * (a prompt goes in a block at a time: forward.c, cache_and_attend). */

/* KV_KVQUANT: outlier slots of a key position, and outliers of a value position. */
static int key_slots(const weights *w)
{
    return w->head_dim / 32 > 2 ? w->head_dim / 32 : 2;
}

static int value_outliers(const weights *w)
{
    return (w->head_dim + 99) / 100;
}

/* KV_KVQUANT: where position p's cos (i < hd/2) or sin (i >= hd/2) of pair i % (hd/2)
 * sits in s->rope: blocks of 32 positions, transposed like the keys ([C][hd][32]), so a
 * block's rotation is 32-wide vector arithmetic. */
static size_t rope_at(const weights *w, size_t p, int i)
{
    return ((p / KV_BLOCK) * w->head_dim + i) * KV_BLOCK + p % KV_BLOCK;
}

/* Bytes of one (sequence, layer, KV head)'s keys or values, codes included. */
static size_t head_bytes(const weights *w, const run_state *s)
{
    const size_t values = (size_t)s->ctx_blocks * KV_BLOCK * w->head_dim;
    switch (s->kv.format) {
    case KV_F32: return values * 4;
    case KV_F16: return values * 2;
    default:     return values * s->kv.bits / 8;
    }
}

/* Halves of key parameters from a head's start to key block b's (q8: its scales; KIVI:
 * its group's scales and minimums; kvquant: its positions' outlier slots). */
static size_t key_params_before(const weights *w, const run_state *s, size_t b)
{
    switch (s->kv.format) {
    case KV_Q8:      return b * (w->head_dim / KV_BLOCK) * KV_BLOCK;
    case KV_KIVI:    return b * KV_BLOCK / s->kv.group * 2 * w->head_dim;
    case KV_KVQUANT: return b * KV_BLOCK * key_slots(w) * 2;
    default:         return 0;
    }
}

/* Halves of value parameters per position (q8: scales; KIVI: a scale and minimum per
 * group; kvquant: center, half-range and the outliers). */
static size_t value_params_per_position(const weights *w, const run_state *s)
{
    switch (s->kv.format) {
    case KV_Q8:      return w->head_dim / KV_BLOCK;
    case KV_KIVI:    return (size_t)(w->head_dim / s->kv.group) * 2;
    case KV_KVQUANT: return 2 + 2 * (size_t)value_outliers(w);
    default:         return 0;
    }
}

/* Halves of one head's key and value parameters. */
static size_t key_param_halves(const weights *w, const run_state *s)
{
    if (s->kv.format == KV_KIVI)     /* a last group may run past the context's blocks */
        return key_params_before(w, s, (size_t)(s->ctx_blocks * KV_BLOCK + s->kv.group - 1) / s->kv.group
                                           * s->kv.group / KV_BLOCK);
    return key_params_before(w, s, (size_t)s->ctx_blocks);
}

static size_t value_param_halves(const weights *w, const run_state *s)
{
    return (size_t)s->ctx_blocks * KV_BLOCK * value_params_per_position(w, s);
}

static size_t window_halves(const weights *w, const run_state *s)
{
    return (size_t)s->window_blocks * KV_BLOCK * w->head_dim;
}

static size_t head_index(const weights *w, int seq, int layer, int kv_h)
{
    return ((size_t)seq * w->n_layers + layer) * w->n_kv_heads + kv_h;
}

/* Bytes the cache of one sequence holds per position (keys and values, every layer). */
static size_t kv_bytes_per_token(const weights *w, const run_state *s)
{
    const size_t positions = (size_t)s->ctx_blocks * KV_BLOCK;
    const size_t per_head = 2 * head_bytes(w, s) + 2 * (key_param_halves(w, s) + value_param_halves(w, s));
    return (size_t)w->n_layers * w->n_kv_heads * per_head / positions;
}

/* calloc: the pages of a large block are mapped on first touch, so a cache takes
 * memory as its positions fill, not all at once. */
static int alloc_kv_cache(const weights *w, run_state *s)
{
    const size_t heads = (size_t)s->seqs * w->n_layers * w->n_kv_heads;
    if (s->kv.format == KV_KIVI)       /* the positions a block of a call's tokens reads, cache_and_attend */
        s->window_blocks = (s->kv.residual + s->kv.group + KV_BLOCK + KV_BLOCK - 1) / KV_BLOCK;
    else if (s->kv.format == KV_KVQUANT && s->kv.residual > 0)   /* the same, with no group to wait for */
        s->window_blocks = (s->kv.residual + 2 * KV_BLOCK + KV_BLOCK - 1) / KV_BLOCK;
    s->key_cache = calloc(heads, head_bytes(w, s));
    s->value_cache = calloc(heads, head_bytes(w, s));
    if (!s->key_cache || !s->value_cache)
        return -1;
    if (key_param_halves(w, s)) {
        s->key_params = calloc(heads * key_param_halves(w, s), sizeof(uint16_t));
        s->value_params = calloc(heads * value_param_halves(w, s), sizeof(uint16_t));
        if (!s->key_params || !s->value_params)
            return -1;
    }
    if (s->window_blocks) {
        s->key_window = calloc(heads * window_halves(w, s), sizeof(uint16_t));
        s->value_window = calloc(heads * window_halves(w, s), sizeof(uint16_t));
        if (!s->key_window || !s->value_window)
            return -1;
    }
    if (s->kv.format == KV_KVQUANT) {
        const size_t positions = (size_t)s->ctx_blocks * KV_BLOCK;
        s->sink = calloc(heads * 2 * w->head_dim, sizeof(uint16_t));
        s->rope = malloc(sizeof(float) * positions * w->head_dim);
        if (!s->sink || !s->rope)
            return -1;
        const int half = w->head_dim / 2;
        for (size_t p = 0; p < positions; p++)      /* as rope_tables computes a query's */
            for (int i = 0; i < half; i++) {
                const float angle = (float)p * w->inv_freq[i];
                s->rope[rope_at(w, p, i)] = cosf(angle);
                s->rope[rope_at(w, p, half + i)] = sinf(angle);
            }
    }
    return 0;
}

static void free_kv_cache(run_state *s)
{
    free(s->key_cache); free(s->value_cache); free(s->key_params); free(s->value_params);
    free(s->key_window); free(s->value_window); free(s->sink); free(s->rope); free(s->key_table);
}

/* ------------------------------------------------- where a head's data is */

static void *key_head(const weights *w, const run_state *s, int seq, int layer, int kv_h)
{
    return (char *)s->key_cache + head_index(w, seq, layer, kv_h) * head_bytes(w, s);
}

static void *value_head(const weights *w, const run_state *s, int seq, int layer, int kv_h)
{
    return (char *)s->value_cache + head_index(w, seq, layer, kv_h) * head_bytes(w, s);
}

static uint16_t *key_params_head(const weights *w, const run_state *s, int seq, int layer, int kv_h)
{
    return s->key_params + head_index(w, seq, layer, kv_h) * key_param_halves(w, s);
}

static uint16_t *value_params_head(const weights *w, const run_state *s, int seq, int layer, int kv_h)
{
    return s->value_params + head_index(w, seq, layer, kv_h) * value_param_halves(w, s);
}

static uint16_t *key_window_head(const weights *w, const run_state *s, int seq, int layer, int kv_h)
{
    return s->key_window + head_index(w, seq, layer, kv_h) * window_halves(w, s);
}

static uint16_t *value_window_head(const weights *w, const run_state *s, int seq, int layer, int kv_h)
{
    return s->value_window + head_index(w, seq, layer, kv_h) * window_halves(w, s);
}

/* KV_KVQUANT: each key channel's table of dequantized levels, center + half_range * level
 * (16 floats, the unused ones 0), made once the calibration is in (the caller keeps it). */
#define KVQ_TABLE 16
static int kvquant_tables(const weights *w, run_state *s)
{
    const int hd = w->head_dim, n_levels = 1 << s->kv.bits;
    free(s->key_table);
    s->key_table = calloc((size_t)w->n_layers * w->n_kv_heads * hd * KVQ_TABLE, sizeof(float));
    if (!s->key_table)
        return -1;
    for (int l = 0; l < w->n_layers; l++)
        for (int h = 0; h < w->n_kv_heads; h++)
            for (int c = 0; c < hd; c++) {
                const size_t at = ((size_t)l * w->n_kv_heads + h) * hd + c;
                for (int k = 0; k < n_levels; k++)
                    s->key_table[at * KVQ_TABLE + k] = s->key_center[at] + s->key_half_range[at] *
                                                       s->key_levels[(size_t)l * n_levels + k];
            }
    return 0;
}

/* KV_KVQUANT: position 0's key and value of a head, float16 [2][hd]. */
static uint16_t *sink_head(const weights *w, const run_state *s, int seq, int layer, int kv_h)
{
    return s->sink + head_index(w, seq, layer, kv_h) * 2 * w->head_dim;
}

/* Bytes of a row of 32 codes (32 positions of a key channel, or 32 channels of a value). */
static size_t code_row_bytes(const run_state *s)
{
    return (size_t)KV_BLOCK * s->kv.bits / 8;
}

/* Key block b's codes: [hd][code_row_bytes]. */
static uint8_t *key_codes(const weights *w, const run_state *s, void *head, int b)
{
    return (uint8_t *)head + (size_t)b * w->head_dim * code_row_bytes(s);
}

/* Position p's value codes: [hd / 32][code_row_bytes]. */
static uint8_t *value_codes(const weights *w, const run_state *s, void *head, int p)
{
    return (uint8_t *)head + (size_t)p * (w->head_dim / KV_BLOCK) * code_row_bytes(s);
}

/* The window's key block holding position p, and its value row of position p. */
static uint16_t *window_key_block(const weights *w, const run_state *s, uint16_t *head, int p)
{
    return head + (size_t)(p / KV_BLOCK % s->window_blocks) * w->head_dim * KV_BLOCK;
}

static uint16_t *window_value_row(const weights *w, const run_state *s, uint16_t *head, int p)
{
    return head + (size_t)(p % (s->window_blocks * KV_BLOCK)) * w->head_dim;
}

/* ------------------------------------------------------------ quantizing */

/* Conversions to and from float16 by the compiler's _Float16: the stores' AVX2/F16C clone
 * makes them one vcvtps2ph / vcvtph2ps each (qmatrix.h's qm_half_to_float is the scalar
 * kernels' bit manipulation, and there is no float-to-half beside it). */
static inline uint16_t to_half(float x)
{
    const _Float16 h = (_Float16)x;
    uint16_t bits;
    memcpy(&bits, &h, sizeof(bits));
    return bits;
}

static inline float from_half(uint16_t bits)
{
    _Float16 h;
    memcpy(&h, &bits, sizeof(h));
    return (float)h;
}

/* A code row holds 32 codes of `bits` bits: with bits 2, 4 or 8, place e in byte
 * e % per (per = 4 * bits bytes) at bit bits * (e / per); with 3 bits, its low two bits
 * so (per = 8) and its high bit in byte 8 + e / 8 at bit e % 8. */
/* Put codes[r] in place e of rows row + r * stride, r < n: the codes of one position
 * across a key block's channels. Other threads may be putting other places of the same
 * rows at once when shared (KV_KVQUANT's keys: a byte holds places of several positions,
 * and a prefill's threads store different positions): then each byte's bits are cleared
 * and set atomically; a decode step alone in its block writes plainly (the atomics cost
 * a decode step at depth 0 some 5%). */
static inline void put_place(const run_state *s, uint8_t *row, size_t stride, int n, int e,
                             const uint8_t *codes, int shared)
{
    const int bits = s->kv.bits == 3 ? 2 : s->kv.bits, per = KV_BLOCK * bits / 8;
    const unsigned low = (1u << bits) - 1, shift = (unsigned)(bits * (e / per));
    const uint8_t clear = (uint8_t)~(low << shift), high_bit = (uint8_t)(1u << (e % 8));
    for (int r = 0; r < n; r++) {
        uint8_t *byte = row + (size_t)r * stride + e % per;
        const uint8_t set = (uint8_t)((codes[r] & low) << shift);
        uint8_t *high = row + (size_t)r * stride + 8 + e / 8;     /* 3 bits: the high bit's byte */
        const uint8_t high_set = (codes[r] >> 2) ? high_bit : 0;
        if (shared) {
            __atomic_fetch_and(byte, clear, __ATOMIC_RELAXED);
            __atomic_fetch_or(byte, set, __ATOMIC_RELAXED);
            if (s->kv.bits == 3) {
                __atomic_fetch_and(high, (uint8_t)~high_bit, __ATOMIC_RELAXED);
                __atomic_fetch_or(high, high_set, __ATOMIC_RELAXED);
            }
        } else {
            *byte = (uint8_t)((*byte & clear) | set);
            if (s->kv.bits == 3)
                *high = (uint8_t)((*high & ~high_bit) | high_set);
        }
    }
}

/* A whole row of 32 codes of `bits` (2, 4 or 8) bits, from the low bits of codes[]. */
static inline void pack_bits(const uint8_t *codes, uint8_t *row, const int bits)
{
    const int per = KV_BLOCK * bits / 8;
    for (int j = 0; j < per; j++) {
        unsigned byte = 0;
        for (int k = 0; k < 8 / bits; k++)
            byte |= (unsigned)(codes[j + k * per] & ((1u << bits) - 1)) << (bits * k);
        row[j] = (uint8_t)byte;
    }
}

/* A whole row of 32 codes, written by one thread: the bytes at once. */
static inline void pack_code_row(const run_state *s, const uint8_t *codes, uint8_t *row)
{
    switch (s->kv.bits) {                   /* constant widths, so that each loop unrolls */
    case 2: pack_bits(codes, row, 2); break;
    case 4: pack_bits(codes, row, 4); break;
    case 8: pack_bits(codes, row, 8); break;
    case 3:
        pack_bits(codes, row, 2);
        for (int j = 0; j < 4; j++) {
            unsigned byte = 0;
            for (int k = 0; k < 8; k++)
                byte |= (unsigned)(codes[8 * j + k] >> 2) << k;
            row[8 + j] = (uint8_t)byte;
        }
        break;
    }
}

/* q8: x[i * stride], i < 32, as codes and a float16 scale (d = max|x| / 127). */
static inline uint16_t quantize_q8(const float *x, size_t stride, int8_t *codes, size_t code_stride)
{
    float amax = 0.0f;
    for (int i = 0; i < KV_BLOCK; i++)
        amax = fabsf(x[i * stride]) > amax ? fabsf(x[i * stride]) : amax;
    const float d = fminf(amax / 127.0f, 65504.0f);   /* the largest finite half */
    for (int i = 0; i < KV_BLOCK; i++)
        codes[i * code_stride] = (int8_t)(d > 0.0f ? rintf(x[i * stride] / d) : 0.0f);
    return to_half(d);
}

/* KIVI: x[0..n) as b-bit codes, whole rows of 32 (row, row + row_step, ...), and the float16
 * scale and minimum; the codes are rounded against the float16 parameters they are
 * read with. */
static inline void quantize_kivi(const run_state *s, const float *x, int n, uint8_t *row, int row_step,
                                 uint16_t *scale, uint16_t *min)
{
    float lo = x[0], hi = x[0];
    for (int i = 1; i < n; i++) {
        lo = x[i] < lo ? x[i] : lo;
        hi = x[i] > hi ? x[i] : hi;
    }
    const float top = (float)((1 << s->kv.bits) - 1);
    *scale = to_half(fminf((hi - lo) / top, 65504.0f));   /* the largest finite half */
    *min = to_half(lo);
    const float d = from_half(*scale), m = from_half(*min);
    uint8_t codes[KV_BLOCK * 4];
    for (int i = 0; i < n; i++) {
        float c = d > 0.0f ? rintf((x[i] - m) / d) : 0.0f;
        codes[i] = (uint8_t)(c < 0.0f ? 0.0f : c > top ? top : c);
    }
    for (int r = 0; r < n / KV_BLOCK; r++)
        pack_code_row(s, codes + r * KV_BLOCK, row + (size_t)r * row_step);
}

/* ---------------------------------------------------------------- storing */

/* Key k and value v of KV head h at position p into the float16 window (KIVI, kvquant). */
static inline void store_window(const weights *w, const run_state *s, int seq, int layer, int h, int p,
                                const float *k, const float *v)
{
    uint16_t *wk = window_key_block(w, s, key_window_head(w, s, seq, layer, h), p) + p % KV_BLOCK;
    uint16_t *wv = window_value_row(w, s, value_window_head(w, s, seq, layer, h), p);
    for (int i = 0; i < w->head_dim; i++) {
        wk[(size_t)i * KV_BLOCK] = to_half(k[i]);
        wv[i] = to_half(v[i]);
    }
}

/* KV_KVQUANT: codes[i] = the index of the level nearest x[i], i < n (levels ascending;
 * midway: the lower). Level by level over all of x, so that the loop vectorizes. */
static inline void nearest_levels(const float *levels, int n_levels, const float *x, int n, uint8_t *codes)
{
    float best[256];
    int32_t index[256];
    for (int i = 0; i < n; i++) {
        best[i] = fabsf(x[i] - levels[0]);
        index[i] = 0;
    }
    for (int j = 1; j < n_levels; j++)
        for (int i = 0; i < n; i++) {
            const float d = fabsf(x[i] - levels[j]);
            index[i] = d < best[i] ? j : index[i];
            best[i] = d < best[i] ? d : best[i];
        }
    for (int i = 0; i < n; i++)
        codes[i] = (uint8_t)index[i];
}

/* KV_KVQUANT: the pre-RoPE key k and value v of KV head h into position p (this file's
 * top comment has the layout); position 0 also goes whole into the sink. shared: other
 * threads may be storing other positions of the same key block (put_place). */
QI_VECTORIZE
static void store_kvquant(const weights *w, run_state *s, int seq, int layer, int h, int p,
                          const float *k, const float *v, int shared)
{
    const int hd = w->head_dim, n_levels = 1 << s->kv.bits, slots = key_slots(w), n_out = value_outliers(w);
    const size_t at = ((size_t)layer * w->n_kv_heads + h) * hd;
    const float *center = s->key_center + at, *half_range = s->key_half_range + at;
    const float *key_levels = s->key_levels + (size_t)layer * n_levels;
    const float *value_levels = s->value_levels + (size_t)layer * n_levels;
    uint8_t *keys = key_codes(w, s, key_head(w, s, seq, layer, h), p / KV_BLOCK);
    uint16_t *key_out = key_params_head(w, s, seq, layer, h) + key_params_before(w, s, p / KV_BLOCK) +
                        (size_t)(p % KV_BLOCK) * slots * 2;
    float x[256];
    uint8_t codes[256];

    /* keys: codes of the values clipped to their channel's range; the largest beyond it kept */
    memset(key_out, 0, sizeof(uint16_t) * slots * 2);
    float kept[KV_BLOCK] = {0};                    /* the kept outliers' excess, slots <= 8 */
    for (int c = 0; c < hd; c++) {
        x[c] = (k[c] - center[c]) / half_range[c];
        const float excess = fabsf(x[c]);
        if (excess > 1.0f) {
            int slot = 0;                          /* the kept outlier of least excess, or an empty slot */
            for (int i = 1; i < slots; i++)
                if (kept[i] < kept[slot])
                    slot = i;
            if (excess > kept[slot]) {
                kept[slot] = excess;
                key_out[2 * slot] = to_half(k[c]);
                key_out[2 * slot + 1] = (uint16_t)(c + 1);
            }
            x[c] = x[c] > 0.0f ? 1.0f : -1.0f;
        }
    }
    nearest_levels(key_levels, n_levels, x, hd, codes);
    put_place(s, keys, code_row_bytes(s), hd, p % KV_BLOCK, codes, shared);

    /* values: the n_out largest |v| aside, the rest against their own range */
    uint16_t *value_out = value_params_head(w, s, seq, layer, h) + (size_t)p * value_params_per_position(w, s);
    int out_channel[4];                            /* n_out <= 3 for hd <= 256 */
    for (int i = 0; i < n_out; i++) {
        int best = -1;
        for (int c = 0; c < hd; c++) {
            int taken = 0;
            for (int j = 0; j < i; j++)
                taken |= out_channel[j] == c;
            if (!taken && (best < 0 || fabsf(v[c]) > fabsf(v[best])))
                best = c;
        }
        out_channel[i] = best;
        value_out[2 + 2 * i] = to_half(v[best]);
        value_out[3 + 2 * i] = (uint16_t)(best + 1);
    }
    float lo = INFINITY, hi = -INFINITY;
    for (int c = 0; c < hd; c++) {
        int outlier = 0;
        for (int j = 0; j < n_out; j++)
            outlier |= out_channel[j] == c;
        if (!outlier) {
            lo = v[c] < lo ? v[c] : lo;
            hi = v[c] > hi ? v[c] : hi;
        }
    }
    value_out[0] = to_half((hi + lo) / 2.0f);
    value_out[1] = to_half(fminf((hi - lo) / 2.0f, 65504.0f));
    const float mid = from_half(value_out[0]), radius = from_half(value_out[1]);
    for (int c = 0; c < hd; c++) {
        const float y = radius > 0.0f ? (v[c] - mid) / radius : 0.0f;
        x[c] = y < -1.0f ? -1.0f : y > 1.0f ? 1.0f : y;
    }
    nearest_levels(value_levels, n_levels, x, hd, codes);
    /* a position's value codes are rows of their own: written whole */
    uint8_t *rows = value_codes(w, s, value_head(w, s, seq, layer, h), p);
    for (int r = 0; r < hd / KV_BLOCK; r++)
        pack_code_row(s, codes + r * KV_BLOCK, rows + (size_t)r * code_row_bytes(s));

    if (p == 0) {       /* the sink, whole: its key rotated as attention rotates the others */
        uint16_t *sink = sink_head(w, s, seq, layer, h);
        for (int i = 0; i < hd / 2; i++) {
            const float cos_ = s->rope[rope_at(w, p, i)], sin_ = s->rope[rope_at(w, p, hd / 2 + i)];
            sink[i] = to_half(k[i] * cos_ - k[hd / 2 + i] * sin_);
            sink[hd / 2 + i] = to_half(k[hd / 2 + i] * cos_ + k[i] * sin_);
        }
        for (int c = 0; c < hd; c++)
            sink[hd + c] = to_half(v[c]);
    }
    if (s->window_blocks)     /* the window, whole: the key before RoPE, as the codes hold it */
        store_window(w, s, seq, layer, h, p, k, v);
}

/* Move KV head h of new token t's key (after RoPE; KV_KVQUANT: before) and value into sequence
 * seq's cache at position p. (Cloned for AVX2 and F16C: elsewhere each conversion to and
 * from float16 is a call.) */
QI_VECTORIZE
static void store_kv_head(const weights *w, run_state *s, int seq, int layer, int t, int p, int h, int shared)
{
    const int hd = w->head_dim, kv_dim = w->n_kv_heads * hd, block = p / KV_BLOCK, lane = p % KV_BLOCK;
    const size_t key0 = (size_t)block * hd * KV_BLOCK + lane;
    const float *k = s->k + (size_t)t * kv_dim + h * hd, *v = s->v + (size_t)t * kv_dim + h * hd;
    void *keys = key_head(w, s, seq, layer, h), *values = value_head(w, s, seq, layer, h);
    switch (s->kv.format) {
    case KV_F32:
        for (int i = 0; i < hd; i++)
            ((float *)keys)[key0 + (size_t)i * KV_BLOCK] = k[i];
        memcpy((float *)values + (size_t)p * hd, v, sizeof(float) * hd);
        break;
    case KV_F16:
        for (int i = 0; i < hd; i++) {
            ((uint16_t *)keys)[key0 + (size_t)i * KV_BLOCK] = to_half(k[i]);
            ((uint16_t *)values)[(size_t)p * hd + i] = to_half(v[i]);
        }
        break;
    case KV_Q8: {
        uint16_t *key_scales = key_params_head(w, s, seq, layer, h) + key_params_before(w, s, block);
        uint16_t *value_scales = value_params_head(w, s, seq, layer, h) + (size_t)p * value_params_per_position(w, s);
        int8_t *key_row = (int8_t *)key_codes(w, s, keys, block) + lane;
        int8_t *value_row = (int8_t *)value_codes(w, s, values, p);
        for (int g = 0; g < hd / KV_BLOCK; g++) {
            key_scales[g * KV_BLOCK + lane] = quantize_q8(k + g * KV_BLOCK, 1, key_row + (size_t)g * KV_BLOCK * KV_BLOCK, KV_BLOCK);
            value_scales[g] = quantize_q8(v + g * KV_BLOCK, 1, value_row + g * KV_BLOCK, 1);
        }
        break;
    }
    case KV_KVQUANT:
        store_kvquant(w, s, seq, layer, h, p, k, v, shared);
        break;
    case KV_KIVI: {
        /* keys wait in the window for their group (close_key_group); values are coded now */
        store_window(w, s, seq, layer, h, p, k, v);
        const uint16_t *wv = window_value_row(w, s, value_window_head(w, s, seq, layer, h), p);
        uint8_t *codes = value_codes(w, s, values, p);
        uint16_t *params = value_params_head(w, s, seq, layer, h) + (size_t)p * value_params_per_position(w, s);
        float x[KV_BLOCK * 4];
        const int G = s->kv.group;
        for (int g = 0; g < hd / G; g++) {
            for (int i = 0; i < G; i++)
                x[i] = from_half(wv[g * G + i]);   /* the window's float16 value, like the keys */
            quantize_kivi(s, x, G, codes + (size_t)g * (G / KV_BLOCK) * code_row_bytes(s),
                          (int)code_row_bytes(s), &params[2 * g], &params[2 * g + 1]);
        }
        break;
    }
    }
}

/* All KV heads of new token t (store_kv_head). */
static void store_kv_row(const weights *w, run_state *s, int seq, int layer, int t, int p, int shared)
{
    for (int h = 0; h < w->n_kv_heads; h++)
        store_kv_head(w, s, seq, layer, t, p, h, shared);
}

/* KIVI: if position p ends a key group, code the group's keys (now all in the window)
 * per channel. The group's positions must all have been stored (forward.c runs this
 * as a step of its own after store_kv_row's). */
QI_VECTORIZE
static void close_key_group(const weights *w, run_state *s, int seq, int layer, int p)
{
    const int G = s->kv.group, hd = w->head_dim;
    if (s->kv.format != KV_KIVI || (p + 1) % G)
        return;
    const int first = p + 1 - G;
    float x[KV_BLOCK * 4];
    for (int h = 0; h < w->n_kv_heads; h++) {
        uint16_t *window = key_window_head(w, s, seq, layer, h);
        uint16_t *params = key_params_head(w, s, seq, layer, h) + key_params_before(w, s, first / KV_BLOCK);
        void *keys = key_head(w, s, seq, layer, h);
        for (int c = 0; c < hd; c++) {
            for (int i = 0; i < G; i++)
                x[i] = from_half(window_key_block(w, s, window, first + i)[(size_t)c * KV_BLOCK + (first + i) % KV_BLOCK]);
            /* place i of the group: block first/32 + i/32, lane i % 32 of channel c's row */
            quantize_kivi(s, x, G, key_codes(w, s, keys, first / KV_BLOCK) + (size_t)c * code_row_bytes(s),
                          (int)(hd * code_row_bytes(s)), &params[c], &params[hd + c]);
        }
    }
}
