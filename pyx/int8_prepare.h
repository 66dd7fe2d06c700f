/* The int8-activation qgemv's activations: x rounded to int8 per block, and
 * what both of its paths (scalar, AVX2) share. Plain C included by the kernel
 * modules that have int8 kernels (pyx/snippets/int8_gemv.c.tp, which defines
 * I8_SLICES first: activation words per unit of its bit width); it uses the
 * module's UNIT_VALUES, UNIT_WORDS and TU. */
#include <math.h>

/* Decode with activations rounded to int8, llama.cpp-style: x (gathered
 * through the act-order permutation) is cut into blocks of I8_BLOCK rows
 * (16 when groups are 16 rows); block b gets the scale d_b = max|x_b| / 127
 * and codes x_q = round(x * (1 / d_b)) in [-127, 127], rounded half to even.
 * The codes multiply the packed codes exactly in integer multiply-adds
 * (32 per instruction): dot_b = sum over the block's rows of q * x_q. Then
 * Eq. (2) on the rounded activations, y = sum_g scale * (sum_b d_b * dot_b
 * - zero * xsum_g), is summed into y term by term,
 *
 *     per block:  y += scale * (d_b * dot_b)
 *     per group:  y -= (scale * zero) * xsum_g,   xsum_g = sum_b d_b * sum(x_q_b),
 *
 * so no float accumulator has to stay in a register across blocks (y lives
 * in L1). The scalar twin does the same integer dot products and the same
 * float operations in the same order, so both paths agree exactly. */
#define I8_BLOCK 32

#if defined(__GNUC__) && !defined(__clang__)
#define QI_NO_CONTRACT __attribute__((optimize("fp-contract=off"), noinline))
#elif defined(__GNUC__)
#define QI_NO_CONTRACT __attribute__((noinline))
#else
#define QI_NO_CONTRACT
#endif

typedef struct {
    int8_t *xq;        /* [K] x_q in kernel row order (scalar path) */
    uint32_t *xw;      /* [K / UNIT_VALUES][I8_SLICES] activation words, one per slice of each unit (AVX2 path) */
    float *xg;         /* [K] x gathered through the act-order permutation (AVX2 path, act-order only) */
    float *d;          /* [n_blocks] d_b */
    int32_t *bsum;     /* [n_blocks] sum(x_q_b) */
    float *xsum;       /* [n_groups] sum over the group's blocks of d_b * sum(x_q_b) */
    int block_len;
    int n_blocks;
    int limbs;         /* activation words per slice of a unit: 1 (x_q), or LIMBS (the float qgemv below) */
    size_t limb_words; /* from one limb's activation words to the next: K / UNIT_VALUES * I8_SLICES */
    void *memory;      /* the one allocation all of the above live in */
} prepared_i8;

static void release_i8(prepared_i8 *p)
{
    free(p->memory);
}

/* Room for `bytes` at *offset, the next array starting 32 bytes aligned. */
static size_t i8_take(size_t *offset, size_t bytes)
{
    const size_t at = *offset;
    *offset += (bytes + 31) & ~(size_t)31;
    return at;
}

/* One malloc for all the arrays: decode calls this once per layer and token,
 * and six mallocs and frees each time kept the other threads waiting. An
 * array the path does not use takes no bytes and stays NULL. */
static int alloc_i8(const qmatrix *m, prepared_i8 *p, int avx2, int limbs)
{
    const int K = m->in_features;
    p->block_len = m->group_size < I8_BLOCK ? m->group_size : I8_BLOCK;
    p->n_blocks = K / p->block_len;
    p->limbs = limbs;
    p->limb_words = (size_t)(K / UNIT_VALUES) * I8_SLICES;
    const size_t xq_bytes = avx2 ? 0 : (size_t)K;
    const size_t xw_bytes = avx2 ? sizeof(uint32_t) * p->limb_words * limbs : 0;
    const size_t xg_bytes = avx2 && m->perm ? sizeof(float) * (size_t)K : 0;
    size_t size = 0;
    const size_t xq = i8_take(&size, xq_bytes), xw = i8_take(&size, xw_bytes), xg = i8_take(&size, xg_bytes);
    const size_t d = i8_take(&size, sizeof(float) * (size_t)p->n_blocks);
    const size_t bsum = i8_take(&size, sizeof(int32_t) * (size_t)p->n_blocks);
    const size_t xsum = i8_take(&size, sizeof(float) * (size_t)m->n_groups);
    char *memory = (char *)malloc(size);
    p->memory = memory;
    if (!memory)
        return -1;
    p->xq = xq_bytes ? (int8_t *)(memory + xq) : NULL;
    p->xw = xw_bytes ? (uint32_t *)(memory + xw) : NULL;
    p->xg = xg_bytes ? (float *)(memory + xg) : NULL;
    p->d = (float *)(memory + d);
    p->bsum = (int32_t *)(memory + bsum);
    p->xsum = (float *)(memory + xsum);
    return 0;
}

/* Bytes of packed codes one block of block_len rows holds in a tile. */
static inline size_t block_code_bytes(int block_len)
{
    return (size_t)block_len * UNIT_WORDS * TU * sizeof(uint32_t) / UNIT_VALUES;   /* 16 rows: half a 32-code unit */
}

/* Block b's scale from its largest |x|: d_b = amax / range, the codes in [-range, range]. */
static inline void block_scale(float amax, float range, float *d, float *id)
{
    *d = amax / range;
    *id = *d > 0.0f ? 1.0f / *d : 0.0f;
}

/* xsum of each group, sum of d_b * sum(x_q_b) over its blocks. Both paths
 * call this one function, compiled without fused multiply-adds, so they
 * agree bit for bit. */
QI_NO_CONTRACT
static void group_sums(const qmatrix *m, prepared_i8 *p)
{
    const int blocks_per_group = m->group_size / p->block_len;
    for (int g = 0, b = 0; g < m->n_groups; g++) {
        float sum = 0.0f;
        for (const int end = b + blocks_per_group; b < end; b++) {
            const float term = p->d[b] * (float)p->bsum[b];
            sum += term;
        }
        p->xsum[g] = sum;
    }
}

/* One row of x -> x_q, d, xsum. x * (1 / d_b) is rounded to float, then to
 * an integer half to even (adding and subtracting 1.5 * 2^23 does that for
 * |v| < 2^22), as the AVX2 twin's multiply and convert do. */
QI_NO_CONTRACT
static void quantize_i8(const qmatrix *m, const float *x, prepared_i8 *p)
{
    const int L = p->block_len;
    float xb[I8_BLOCK];
    for (int b = 0; b < p->n_blocks; b++) {
        float amax = 0.0f, d, id;
        for (int i = 0; i < L; i++) {
            const int k = b * L + i;
            xb[i] = m->perm ? x[m->perm[k]] : x[k];
            const float a = fabsf(xb[i]);
            amax = a > amax ? a : amax;
        }
        block_scale(amax, 127.0f, &d, &id);
        int sum = 0;
        for (int i = 0; i < L; i++) {
            const float v = xb[i] * id;
            const int q = (int)((v + 12582912.0f) - 12582912.0f);
            p->xq[b * L + i] = (int8_t)q;
            sum += q;
        }
        p->d[b] = d;
        p->bsum[b] = sum;
    }
    group_sums(m, p);
}

/* The two products the scalar twin rounds on their own, as the AVX2 path's
 * multiplies do (kept out of line: never fused into a multiply-add). */
QI_NO_CONTRACT
static float scaled_dot(int32_t dot, float d)
{
    return (float)dot * d;
}

QI_NO_CONTRACT
static float scale_zero(float scale, float zero)
{
    return scale * zero;
}
