/* qmatrix.h: the run-time form of one quantized linear layer, shared by the
 * generated kernel modules (qinfer._qgemm_b*) and the code that calls them.
 *
 * The words are the GPTQ words re-laid by qinfer/linear.py into tiles of
 * `tu` output columns, each tile holding all of its input rows contiguously,
 * so a thread streams memory front to back:
 *
 *   words [n_tiles][n_units][unit_words][tu]     (uint32)
 *   scales, zeros  [n_tiles][n_groups][tu]       (float32; w = scale * (q - zero))
 *
 * A unit is the run of words that holds a whole number of values (one word
 * of 32/b values for b = 2, 4, 8; three words of 32 values for b = 3).
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
    const uint32_t *words;
    const float *scales;
    const float *zeros;
    const int32_t *perm;  /* NULL, or act-order: kernel input k is x[perm[k]] */
} qmatrix;

/* y[n][out_features] = x[n][in_features] @ W^T. Returns 0, or -1 when out of memory. */
typedef int (*qgemm_fn)(const qmatrix *m, const float *x, int n, float *y, int nthreads);

typedef struct qkernels {
    int bits;
    int unit_words;
    int unit_values;
    int max_gemv_tiles;   /* qgemv has a micro-kernel for 1..max_gemv_tiles tiles */
    qgemm_fn avx2;        /* NULL when the compiler could not build it */
    qgemm_fn scalar;
    /* Activations rounded to int8 per block of 32 rows (decode, one row at a
     * time): NULL where the bitwidth has no such path (3-bit). */
    qgemm_fn avx2_i8;
    qgemm_fn scalar_i8;
} qkernels;

#define QINFER_KERNELS_CAPSULE "qinfer.qkernels"

#endif
