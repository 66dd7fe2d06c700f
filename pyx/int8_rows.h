/* The int8-activation qgemm (prefill: several rows), part 1 of 2: what every
 * instruction set's kernels share, the row blocking constants and the rounded
 * activations of all rows. Plain C included by the kernel modules that have
 * int8 kernels (pyx/snippets/int8_gemv.c.tp, after the quantize_i8_* functions, which it
 * calls, and after defining I8_CHUNK_BYTES from the build machine's L2); part 2,
 * the kernels, is pyx/snippets/int8_gemm.c.tp, rendered per instruction set. */
/* ------------------------------------------------ qgemm, int8 activations */
/* Several rows at once (a prompt): each row's activations are rounded to
 * int8 exactly as a qgemv call rounds them (quantize_i8_*, row by row),
 * then every unit of a tile is loaded and sliced once and multiplied by the
 * activation words of R rows (the instruction set's rows per call), so a
 * weight vector is read once per R rows instead of once per row. Per row
 * and column the integer dot products are the qgemv's, and the float
 * operations on them are the same ones in the same order: each output row
 * equals the qgemv of that row alone, bit for bit (tests/test_int8.py), so
 * prefill and decode agree.
 *
 * Registers: R x TV accumulators + TV slices (sliced from the codes in
 * memory) + one broadcast activation word + the lane mask. AVX2 (16 ymm,
 * 8 columns a vector): 4 x 2 + 2 + 1 + 1 = 12 for R = 4. AVX-512 (32 zmm,
 * 16 columns a vector, so TV = 1 for 16-column tiles): 8 x 1 + 1 + 1 + 1 = 11
 * for R = 8, each zmm multiply-add doing twice a ymm one's work.
 *
 * Blocking: rows come in chunks whose activation words (K bytes a row)
 * stay in L2 while the thread walks its tiles; a tile is taken in passes
 * of I8_PASS_BYTES of codes, which stay in L1 while every row group of the
 * chunk goes over them. A pass only reorders whole blocks of different
 * rows: each output still sees its blocks in order, so the result is the
 * same bit for bit. */
#define I8_PASS_BYTES (8 * 1024)
/* How far ahead of its codes a row block asks for the next ones, into L2 (prefetcht1). At
 * 8 rows an 8-bit layer takes 64 bytes of codes every 8 multiply-adds, more than memory
 * gives two cores: the layer streams at what the misses in flight allow. Into L1, 2 KiB
 * ahead, they were as many as L1 tracks; into L2, 16 KiB ahead, more are in flight.
 * SmolLM2's 8-row decode step (int8 activations, 2 threads, 2-core Zen 4 KVM; in-process
 * A/B, 40 rounds of 20 steps each): 0.89-0.95 of the time, most of it the 8-bit LM head's
 * (the 4-bit blocks alone 0.99); the 4-bit blocks alike 4 to 16 KiB ahead, the head no
 * faster 32 or 64 KiB ahead. */
#define I8_ROWS_PREFETCH_BYTES (16 * 1024)
/* An empty asm that takes and gives back v in a vector register: GCC must
 * then add each slice's products into the accumulator where the template
 * does. Left free, it summed the products of all slices first, holding them
 * all live at once, and spilled half of the accumulators to the stack.
 * ("x": xmm/ymm 0-15; "v": any of AVX-512's 32 registers.) */
#if defined(__GNUC__)
#define QI_KEEP_IN_REGISTER(v) __asm__("" : "+x"(v))
#define QI_KEEP_IN_ZMM(v) __asm__("" : "+v"(v))
#else
#define QI_KEEP_IN_REGISTER(v) ((void)0)
#define QI_KEEP_IN_ZMM(v) ((void)0)
#endif

typedef struct {
    uint32_t *xw;      /* [n][K / UNIT_VALUES][I8_SLICES] activation words of every row */
    float *d;          /* [n][n_blocks] */
    float *xsum;       /* [n][n_groups] */
    size_t xw_row;     /* words from one row's activation words to the next's (row_stride) */
    int block_len;
    int n_blocks;
} prepared_rows;

static void release_rows(prepared_rows *p)
{
    free(p->xw);
    free(p->d);
    free(p->xsum);
}

/* Every row's activation words, block scales and group sums: `quantize` (the
 * kernels' instruction set's quantize_i8_*) row by row into its own slice of
 * the arrays (bsum and the act-order gather are scratch shared by the rows). */
typedef void (*quantize_row_fn)(const qmatrix *m, const float *x, prepared_i8 *p);
static QI_AVX2 int quantize_rows(const qmatrix *m, const float *x, int n, prepared_rows *rows,
                                 quantize_row_fn quantize)
{
    prepared_i8 one;
    if (alloc_i8(m, &one, 1, 1))
        return -1;
    const int K = m->in_features;
    rows->block_len = one.block_len;
    rows->n_blocks = one.n_blocks;
    rows->xw_row = row_stride((size_t)(K / UNIT_VALUES) * I8_SLICES, sizeof(uint32_t));
    rows->xw = (uint32_t *)malloc(sizeof(uint32_t) * rows->xw_row * (size_t)n);
    rows->d = (float *)malloc(sizeof(float) * (size_t)one.n_blocks * n);
    rows->xsum = (float *)malloc(sizeof(float) * (size_t)m->n_groups * n);
    if (!rows->xw || !rows->d || !rows->xsum) {
        release_rows(rows);
        release_i8(&one);
        return -1;
    }
    for (int r = 0; r < n; r++) {   /* one's own arrays stay in one.memory, which release_i8 frees */
        one.xw = rows->xw + (size_t)r * rows->xw_row;
        one.d = rows->d + (size_t)r * one.n_blocks;
        one.xsum = rows->xsum + (size_t)r * m->n_groups;
        quantize(m, x + (size_t)r * K, &one);
    }
    release_i8(&one);
    return 0;
}

