/* The float qgemm on AMX tiles, part 2 of 2: the tile products over a
 * thread's share of the tiles. Plain C, the same for every bit width,
 * included as text by pyx/qgemm.pyx.tp after pyx/amx_tiles.h and
 * amx_unpack_codes (pyx/snippets/amx_unpack_codes.c.tp). It uses the module's
 * UNIT_VALUES, UNIT_WORDS, TU, prepared and load_scales16(), and the qm_*
 * accessors of pyx/qmatrix.h. */

/* Ask for what a segment (`len` rows from row k0) of a tile reads: its codes and
 * its group's scales and zeros. Called for the next segment while this one's
 * tile products run: each is read in one short burst after a long stretch of
 * AMX work, too little for the hardware prefetcher to follow. */
static inline void amx_prefetch_segment(const qmatrix *m, int tile, int k0, int len)
{
    const size_t tile_words = (size_t)(m->in_features / UNIT_VALUES) * UNIT_WORDS * TU;
    const char *at = (const char *)(m->words + tile * tile_words + (size_t)(k0 / UNIT_VALUES) * UNIT_WORDS * TU);
    const size_t bytes = (size_t)len / UNIT_VALUES * UNIT_WORDS * TU * sizeof(uint32_t);
    for (size_t line = 0; line < bytes; line += 64)
        _mm_prefetch(at + line, _MM_HINT_T0);
    const size_t g = (size_t)(k0 / m->group_size) * TU;
    _mm_prefetch((const char *)qm_scale_ptr(m, qm_tile_scales(m, tile), g), _MM_HINT_T0);
    _mm_prefetch((const char *)qm_scale_ptr(m, qm_tile_zeros(m, tile), qm_zero_group(m, k0 / m->group_size)), _MM_HINT_T0);
}

/* acc[rows r0..r0+31][tiles] += Eq. (2) of one segment's tile sums (c: [row half][tile][16][16]);
 * acc: [row chunk][2 x 16] from row row0 of the chunk. */
static inline QI_AMX void amx_segment_out(const qmatrix *m, const prepared *p, int n, int row0, int r0, int tile0,
                                          int tiles, int seg, const float *c, float *acc)
{
    const int g = seg * p->seg_len / m->group_size;
    for (int t = 0; t < tiles; t++) {
        const __m512 sc = load_scales16(m, qm_tile_scales(m, tile0 + t), (size_t)g * TU);
        const __m512 zc = load_scales16(m, qm_tile_zeros(m, tile0 + t), qm_zero_group(m, g));
        for (int i = 0; i < 32 && r0 + i < n; i++) {
            const int r = r0 + i;
            const __m512 xs = _mm512_set1_ps(p->xsum[(size_t)r * p->n_segments + seg]);
            const __m512 dot = _mm512_loadu_ps(c + ((size_t)(i / 16) * 2 + t) * 256 + (i % 16) * 16);
            float *yp = acc + (size_t)(r - row0) * 32 + t * 16;
            _mm512_store_ps(yp, _mm512_fmadd_ps(sc, _mm512_fnmadd_ps(zc, xs, dot), _mm512_load_ps(yp)));
        }
    }
}

/* Tiles [first, last) of y for all n rows (every element stored: y need not be
 * zeroed): in chunks of amx_row_chunk() activation rows and blocks of about
 * AMX_K_BLOCK input rows (whole segments), whose limbs stay in L2; within them
 * two tiles at a time, segment by segment, summed in an L1 block and stored in
 * y once per input block (y's rows are far apart: read-modify-writes of them
 * every segment waited on memory). Each tile's sums do not depend on its
 * neighbour, so any split of the tiles between threads gives the same y. */
static QI_AMX int amx_gemm_share(const qmatrix *m, int first, int last, const amx_limbs *a, const prepared *p,
                                 int n, float *y, size_t ldy)
{
    const int L = p->seg_len;
    uint32_t *codes = NULL;           /* [2 segments][2 tiles][L/2][16]: this segment's codes and the next's */
    float *c = NULL;                  /* [2][2][16][16]: the four sum tiles */
    const int block_segs = AMX_K_BLOCK / L > 0 ? AMX_K_BLOCK / L : 1;
    const int chunk = amx_row_chunk(block_segs * L < m->in_features ? block_segs * L : m->in_features);
    float *acc = NULL;                /* [chunk][2][16]: y of a row chunk and tile pair */
    if (posix_memalign((void **)&codes, 64, sizeof(uint32_t) * 2 * (size_t)L * 16)
        || posix_memalign((void **)&c, 64, sizeof(float) * 4 * 256)
        || posix_memalign((void **)&acc, 64, sizeof(float) * (size_t)chunk * 32)) {
        free(codes);
        free(c);
        return -1;
    }
    amx_config cfg;
    amx_config_full_tiles(&cfg);
    _tile_loadconfig(&cfg);
    const size_t lda = a->ld * sizeof(uint16_t);
    for (int row0 = 0; row0 < a->rows; row0 += chunk) {
        for (int seg0 = 0; seg0 < p->n_segments; seg0 += block_segs) {
            const int row1 = row0 + chunk < a->rows ? row0 + chunk : a->rows;
            const int seg1 = seg0 + block_segs < p->n_segments ? seg0 + block_segs : p->n_segments;
            for (int tile = first; tile < last; tile += 2) {
                const int tiles = last - tile >= 2 ? 2 : 1;
                memset(acc, 0, sizeof(float) * (size_t)chunk * 32);
                for (int t = 0; t < tiles; t++)
                    amx_unpack_codes(m, tile + t, seg0 * L, L, codes + (size_t)t * L / 2 * 16);
                for (int seg = seg0; seg < seg1; seg++) {
                    const int k0 = seg * L;
                    /* this segment's codes; the next one's are unpacked between the tile
                     * products below, a slice per step, while the AMX unit works */
                    const uint32_t *b0 = codes + (size_t)((seg - seg0) & 1) * L * 16, *b1 = b0 + (size_t)L / 2 * 16;
                    uint32_t *next = codes + (size_t)((seg - seg0 + 1) & 1) * L * 16;
                    const int units = L / UNIT_VALUES, steps = (row1 - row0) / 32 * (L / 32);
                    int step = 0;
                    /* the segment AMX_PREFETCH_SEGMENTS on, in these tiles or the next two */
                    const int ahead = seg - seg0 + AMX_PREFETCH_SEGMENTS, span = seg1 - seg0;
                    const int next_tile = tile + 2 * (ahead / span);
                    for (int t = next_tile; t < next_tile + 2 && t < last; t++)
                        amx_prefetch_segment(m, t, (seg0 + ahead % span) * L, L);
                    for (int r0 = row0; r0 < row1; r0 += 32) {
                        const uint16_t *x0 = a->limb + (size_t)r0 * a->ld + k0;
                        const uint16_t *x1 = x0 + 16 * a->ld;
                        _tile_zero(0);
                        _tile_zero(1);
                        _tile_zero(2);
                        _tile_zero(3);
                        for (int k = 0; k < L; k += 32, step++) {
                            _tile_loadd(6, b0 + (size_t)k / 2 * 16, 64);
                            if (tiles == 2)
                                _tile_loadd(7, b1 + (size_t)k / 2 * 16, 64);
                            for (int j = 0; j < 3; j++) {
                                _tile_loadd(4, x0 + j * a->limb_size + k, lda);
                                _tile_loadd(5, x1 + j * a->limb_size + k, lda);
                                _tile_dpbf16ps(0, 4, 6);
                                _tile_dpbf16ps(2, 5, 6);
                                if (tiles == 2) {
                                    _tile_dpbf16ps(1, 4, 7);
                                    _tile_dpbf16ps(3, 5, 7);
                                }
                            }
                            if (seg + 1 < seg1) {   /* units [u0, u1) of the next segment's codes */
                                const int u0 = units * step / steps, u1 = units * (step + 1) / steps;
                                for (int t = 0; t < tiles && u1 > u0; t++)
                                    amx_unpack_codes(m, tile + t, k0 + L + u0 * UNIT_VALUES, (u1 - u0) * UNIT_VALUES,
                                                     next + (size_t)t * L / 2 * 16 + (size_t)u0 * UNIT_VALUES / 2 * 16);
                            }
                        }
                        _tile_stored(0, c, 64);
                        _tile_stored(1, c + 256, 64);
                        _tile_stored(2, c + 512, 64);
                        _tile_stored(3, c + 768, 64);
                        amx_segment_out(m, p, n, row0, r0, tile, tiles, seg, c, acc);
                    }
                }
                for (int r = row0; r < row1 && r < n; r++) {
                    float *yr = y + (size_t)r * ldy + (size_t)tile * TU;
                    const float *ar = acc + (size_t)(r - row0) * 32;
                    for (int v = 0; v < tiles; v++)     /* the first input block stores, the others add */
                        _mm512_storeu_ps(yr + 16 * v, seg0 == 0 ? _mm512_load_ps(ar + 16 * v)
                                         : _mm512_add_ps(_mm512_loadu_ps(yr + 16 * v), _mm512_load_ps(ar + 16 * v)));
                }
            }
        }
    }
    _tile_release();
    free(codes);
    free(c);
    free(acc);
    return 0;
}

/* Let the float qgemm use AMX (where amx_available()) or not. */
static void set_float_amx(int on)
{
    float_amx = on && amx_available();
}
