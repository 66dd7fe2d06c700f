/* w8a8_amx_loop.h: the AMX loop of pyx/w8a8_amx.h, included there twice with the
 * tile operations defined (TILE_CONFIG, TILE_ZERO, TILE_LOAD, TILE_STORE, TILE_DOT,
 * TILE_RELEASE; W8A8_TILES_STATE declares what they need), the function's attribute
 * (W8A8_AMX_ATTR) and its name (W8A8_AMX_NAME), which it undefines at its end, ready for
 * the next. No include guard, on purpose. */

/* Tiles first..last-1 of y[n][out] for the prepared input `in` of rows32 rows (n of them
 * real, the rest zero), two tiles and 32 rows at a time. work: w8a8_amx_work_bytes(M),
 * 64-byte aligned. */
static W8A8_AMX_ATTR void W8A8_AMX_NAME(w8a8_amx_share)(const w8a8_matrix *M, const w8a8_input *in, int rows32,
                                                        int n, int first, int last, float *y, uint8_t *work)
{
    W8A8_TILES_STATE
    const int K = M->head.in_features, G = M->head.group_size, n_groups = M->head.n_groups;
    const int bits = M->head.bits, out = M->head.out_features;
    const size_t tile_bytes = (size_t)K * W8A8_TU * bits / 8;
    int32_t *sums = (int32_t *)work;                       /* [4][16][16]: tmm0..3 */
    float *acc = (float *)(work + 4 * 1024);               /* [32][32]: rows x the two tiles' columns */
    uint8_t *unpacked = work + 8 * 1024;                   /* 4-bit: [2][K / 4][16][4], the two tiles' codes as bytes */
    const int8_t *xq = (const int8_t *)in->xq;
    amx_config cfg;
    amx_config_full_tiles(&cfg);
    TILE_CONFIG(&cfg);
    for (int tile = first; tile < last; tile += 2) {
        const int tiles = last - tile >= 2 ? 2 : 1;       /* one: tmm7 repeats tile 0, its sums unused */
        const uint8_t *codes0 = (const uint8_t *)M->codes + (size_t)tile * tile_bytes;
        const uint8_t *codes1 = tiles == 2 ? codes0 + tile_bytes : codes0;
        if (bits == 4) {   /* once for every row block */
            for (int k = 0; k < K; k += W8A8_AMX_K) {
                w8a8_unpack_nibbles(codes0 + (size_t)k / 2 * W8A8_TU, unpacked + (size_t)k * W8A8_TU);
                w8a8_unpack_nibbles(codes1 + (size_t)k / 2 * W8A8_TU, unpacked + (size_t)(K + k) * W8A8_TU);
            }
            codes0 = unpacked;
            codes1 = unpacked + (size_t)K * W8A8_TU;
        }
        for (int r0 = 0; r0 < rows32; r0 += 32) {
            const int rows = n - r0 < 32 ? n - r0 : 32;
            if (rows <= 0)
                break;
            memset(acc, 0, sizeof(float) * 32 * 32);
            for (int g = 0; g < n_groups; g++) {
                TILE_ZERO(0);
                TILE_ZERO(1);
                TILE_ZERO(2);
                TILE_ZERO(3);
                for (int k = g * G; k < (g + 1) * G; k += W8A8_AMX_K) {
                    TILE_LOAD(6, codes0 + (size_t)k * W8A8_TU, 64);
                    TILE_LOAD(7, codes1 + (size_t)k * W8A8_TU, 64);
                    TILE_LOAD(4, xq + (size_t)r0 * K + k, (size_t)K);
                    TILE_LOAD(5, xq + (size_t)(r0 + 16) * K + k, (size_t)K);
                    TILE_DOT(0, 4, 6, bits == 8);
                    TILE_DOT(1, 4, 7, bits == 8);
                    TILE_DOT(2, 5, 6, bits == 8);
                    TILE_DOT(3, 5, 7, bits == 8);
                }
                TILE_STORE(0, sums, 64);
                TILE_STORE(1, sums + 256, 64);
                TILE_STORE(2, sums + 512, 64);
                TILE_STORE(3, sums + 768, 64);
                /* the group's exact sums into the rows' float sums, as the other loops add them */
                for (int r = 0; r < rows; r++)
                    for (int t = 0; t < tiles; t++) {
                        const int32_t *dot = sums + ((r / 16) * 2 + t) * 256 + (r % 16) * 16;
                        const float *s = M->scales + ((size_t)(tile + t) * n_groups + g) * W8A8_TU;
                        const int32_t offset = bits == 4 ? 8 * in->qsum[(size_t)(r0 + r) * n_groups + g] : 0;
                        float *a = acc + r * 32 + t * 16;
                        for (int j = 0; j < W8A8_TU; j++) {
                            const float v = s[j] * (float)(dot[j] - offset);
                            a[j] = a[j] + v;
                        }
                    }
            }
            for (int r = 0; r < rows; r++)
                for (int t = 0; t < tiles; t++) {
                    const int col0 = (tile + t) * W8A8_TU;
                    const int valid = out - col0 < W8A8_TU ? out - col0 : W8A8_TU;
                    for (int j = 0; j < valid; j++)
                        y[(size_t)(r0 + r) * out + col0 + j] = acc[r * 32 + t * 16 + j] * in->d[r0 + r];
                }
        }
    }
    TILE_RELEASE();
}

#undef W8A8_TILES_STATE
#undef TILE_CONFIG
#undef TILE_ZERO
#undef TILE_LOAD
#undef TILE_STORE
#undef TILE_DOT
#undef TILE_RELEASE
#undef W8A8_AMX_ATTR
#undef W8A8_AMX_NAME
