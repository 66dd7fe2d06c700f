/* qmatrix.h: the run-time form of one quantized linear layer, shared by the
 * generated kernel modules (qinfer._qgemm_b*) and the code that calls them.
 *
 * The words are the GPTQ words re-laid by qinfer/linear.py into tiles of
 * `tu` output columns, each tile holding all of its input rows contiguously,
 * so a thread streams memory front to back:
 *
 *   words [n_tiles][n_units][unit_words][tu]     (uint32)
 *   scales, zeros  [n_tiles][n_groups][tu]       (w = scale * (q - zero); float32, or
 *                                                 float16 when every value is exact in it)
 *   or zeros       [n_tiles][1][tu]              (zero_groups 1: the same zero in every group)
 *
 * A unit is the run of words that holds a whole number of values (one word
 * of 32/b values for b = 2, 4, 8; b words of 32 values for b = 3, 5, 6).
 * docs/FORMAT.md draws the bits.
 */
#ifndef QINFER_QMATRIX_H
#define QINFER_QMATRIX_H

#include <stdint.h>
#include <stddef.h>

typedef struct qmatrix {
    int bits;
    int in_features;      /* K: inputs, a multiple of 32 and of group_size */
    int out_features;     /* N: outputs, any size; tiles are zero-padded */
    int group_size;       /* rows per scale/zero group; == in_features for full columns */
    int n_groups;         /* in_features / group_size */
    int tu;               /* columns per tile */
    int n_tiles;          /* ceil(out_features / tu) */
    int segment_rows;     /* full columns (n_groups == 1): rows summed before the one scale is
                             applied (Eq. 1 per block). Fixed when the layer is built, so
                             tuning never changes qgemv's arithmetic. */
    /* Run-time kernel parameters (qinfer/tuning): the performance model's
     * choice unless the tuner measured a faster one on this CPU. Only the
     * AVX2 path reads them; changing them between calls is allowed. */
    int gemv_tiles;       /* nv: tiles qgemv walks side by side, 1..qkernels.max_gemv_tiles */
    int mb;               /* qgemm: input rows per row block; divides in_features */
    int rows_per_chunk;   /* nb: activation rows qgemm takes per pass over the weights */
    int tiles_per_block;  /* tb / tu: tiles qgemm finishes before moving on */
    int half_scales;      /* 1: scales and zeros are IEEE float16, 0: float32. qinfer/linear.py
                             stores float16 only when that is exact, so the kernels compute
                             the same numbers from half the scale bytes. */
    const uint32_t *words;
    const void *scales;   /* read through qm_scale / qm_scale_ptr (or load_scales8 in AVX2) */
    const void *zeros;
    int zero_groups;      /* groups of zeros: n_groups, or 1 when every group of a column has
                             the same zero (symmetric formats: Q4_0/Q5_0/Q8_0, GPTQ sym), which
                             is then held once per column, [n_tiles][1][tu]: fewer bytes to read */
    const int32_t *perm;  /* NULL, or act-order: kernel input k is x[perm[k]] */
} qmatrix;

/* A float16 as float32, exactly (the scalar kernels' reading of half-width
 * scales; the AVX2 kernels widen 8 at a time with F16C's vcvtph2ps). */
static inline float qm_half_to_float(uint16_t h)
{
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
    union { uint32_t u; float f; } v;
    if (exponent == 0x1f) {          /* inf, nan */
        v.u = sign | 0x7f800000u | (mantissa << 13);
    } else if (exponent != 0) {      /* normal: the exponent bias goes from 15 to 127 */
        v.u = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    } else {                         /* zero, subnormal: mantissa * 2^-24 */
        v.f = (float)mantissa * 0x1p-24f;
        v.u |= sign;
    }
    return v.f;
}

/* The scales (or zeros) from element i of `base` (m->scales or m->zeros) on. */
static inline const void *qm_scale_ptr(const qmatrix *m, const void *base, size_t i)
{
    return (const char *)base + i * (m->half_scales ? sizeof(uint16_t) : sizeof(float));
}

/* Tile `tile`'s scales or zeros: its [n_groups][tu] block. */
static inline const void *qm_tile_scales(const qmatrix *m, int tile)
{
    return qm_scale_ptr(m, m->scales, (size_t)tile * m->n_groups * m->tu);
}

static inline const void *qm_tile_zeros(const qmatrix *m, int tile)
{
    return qm_scale_ptr(m, m->zeros, (size_t)tile * m->zero_groups * m->tu);
}

/* Where group g's zeros start in a tile's zeros (all groups share row 0 when
 * zero_groups is 1), and the elements from one tile's zeros to the next's. */
static inline size_t qm_zero_group(const qmatrix *m, int g)
{
    return m->zero_groups == 1 ? 0 : (size_t)g * m->tu;
}

static inline size_t qm_tile_zero_count(const qmatrix *m)
{
    return (size_t)m->zero_groups * m->tu;
}

/* Element i of `base` (m->scales or m->zeros, or a qm_scale_ptr into them). */
static inline float qm_scale(const qmatrix *m, const void *base, size_t i)
{
    return m->half_scales ? qm_half_to_float(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}

/* Output column j of W (W[j][0..in_features), one row of the weight in Hugging
 * Face orientation) as float32: scale * (q - zero), as QuantizedLinear.dequantize
 * computes it. For a quantized embedding table, whose rows are looked up one
 * token at a time: the table is held as the LM head's packed matrix (output j =
 * token j), and only the looked-up rows are ever widened. */
static inline void qm_dequantize_column(const qmatrix *m, int j, float *out)
{
    const int b = m->bits;
    const int unit_words = 32 % b ? b : 1, unit_values = 32 * unit_words / b;
    const int tile = j / m->tu, c = j % m->tu;
    const size_t n_units = (size_t)(m->in_features / unit_values);
    const uint32_t *words = m->words + (size_t)tile * n_units * unit_words * m->tu + c;
    const void *scales = qm_tile_scales(m, tile), *zeros = qm_tile_zeros(m, tile);
    const uint64_t mask = (1u << b) - 1;
    for (int k = 0; k < m->in_features; k++) {
        /* value i of its unit sits at bits [b*i, b*i + b) of the unit's words read as one stream */
        const int i = k % unit_values, bit = b * i, word = bit / 32, offset = bit % 32;
        const uint32_t *unit = words + (size_t)(k / unit_values) * unit_words * m->tu;
        uint64_t stream = unit[(size_t)word * m->tu];
        if (offset + b > 32)
            stream |= (uint64_t)unit[(size_t)(word + 1) * m->tu] << 32;
        const float q = (float)((stream >> offset) & mask);
        const size_t g = (size_t)(k / m->group_size) * m->tu + c;
        const size_t gz = qm_zero_group(m, k / m->group_size) + c;
        out[m->perm ? m->perm[k] : k] = qm_scale(m, scales, g) * (q - qm_scale(m, zeros, gz));
    }
}

/* y[n][out_features] = x[n][in_features] @ W^T. Returns 0, or -1 when out of memory. */
typedef int (*qgemm_fn)(const qmatrix *m, const float *x, int n, float *y, int nthreads);

/* One row (decode) inside the caller's OpenMP thread team (team.h): every
 * thread of the enclosing parallel region calls it with the same arguments
 * but its own `tm`, and each computes its share of y[out_features] = W x; y
 * is whole once all of them have returned (the caller's barrier). The forward pass runs a decode step
 * as one team so, instead of starting the threads for every layer. Only for
 * layers of whole tiles (qm_whole_tiles). Returns 0, or -1 (out of memory in
 * this thread: its share of y is then missing). */
struct team;   /* team.h */
typedef int (*qgemv_team_fn)(const qmatrix *m, const float *x, float *y, const struct team *tm);

/* Several rows (a batched decode step of a server's sequences) inside the
 * caller's thread team, as qgemv_team_fn does one: y[n][out_features] =
 * x[n][in_features] @ W^T, each thread its share of the tiles, the same numbers
 * as the qgemm. */
typedef int (*qgemm_team_fn)(const qmatrix *m, const float *x, int n, float *y, const struct team *tm);

/* Whether out_features fills the last tile: the kernels then write y in
 * place, with no padded block to share. */
/* The head of a layer that is not packed GPTQ words (the lookup-table and int8-activation
 * layers, whose structs begin with a qmatrix): its shape, groups of `group` inputs, tiles
 * of `tu` outputs; no words, scales, zeros or permutation, kernel parameters unused. The
 * forward pass reads the shape, and passes the struct on to the layer's own entry points. */
static inline void qm_init_head(qmatrix *m, int bits, int in_features, int out_features, int group, int tu)
{
    m->bits = bits;
    m->in_features = in_features;
    m->out_features = out_features;
    m->group_size = group;
    m->n_groups = in_features / group;
    m->tu = tu;
    m->n_tiles = (out_features + tu - 1) / tu;
    m->segment_rows = group;
    m->gemv_tiles = m->mb = m->rows_per_chunk = m->tiles_per_block = 1;
    m->half_scales = 0;
    m->zero_groups = m->n_groups;
    m->words = NULL;
    m->scales = m->zeros = NULL;
    m->perm = NULL;
}

static inline int qm_whole_tiles(const qmatrix *m)
{
    return (size_t)m->n_tiles * m->tu == (size_t)m->out_features;
}

typedef struct qkernels {
    int bits;
    int unit_words;
    int unit_values;
    int max_gemv_tiles;   /* qgemv has a micro-kernel for 1..max_gemv_tiles tiles */
    qgemm_fn avx2;        /* NULL when the compiler could not build it */
    qgemm_fn scalar;
    qgemv_team_fn avx2_team;      /* avx2's team twin for one row (NULL with it) */
    /* Activations rounded to int8 per block of 32 rows (decode, one row at a
     * time): NULL where the bitwidth has no such path (3-bit). */
    qgemm_fn avx2_i8;
    qgemm_fn scalar_i8;
    qgemv_team_fn avx2_i8_team;   /* avx2_i8's team twin (NULL with it) */
    qgemm_team_fn avx2_i8_rows_team;   /* ... and avx2_i8's team twin for several rows */
} qkernels;

#define QINFER_KERNELS_CAPSULE "qinfer.qkernels"

#endif
