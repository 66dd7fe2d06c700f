/* w8a8_amx.h: the int8 x int8 qgemm (w8a8_gemm, 16 rows or more) on AMX-INT8 tiles.
 * Plain C included by pyx/w8a8.h after its loops; pyx/w8a8_amx_loop.h holds the loop,
 * included twice below: once on the tile instructions, once on a C model of them.
 *
 * One AMX tile product multiplies 16 rows x 64 int8 by 64 x 16 int8 into 16 x 16
 * int32 sums (TDPBSSD: both sides signed; TDPBSUD: the second unsigned), 16 times
 * the multiply-adds of one AVX-512 VNNI instruction. The layouts already fit:
 *
 *   A (tmm4, tmm5):  16 rows of the prepared input, int8 q (not q + 128: no offset to
 *                    take back), 64 bytes of each row: xq + row * K + k, stride K
 *   B (tmm6, tmm7):  16 steps of 4 inputs of one tile of 16 output rows: 8-bit codes as
 *                    they are laid out ([K / 4][16][4], pyx/w8a8.h), 1024 contiguous
 *                    bytes, stride 64; 4-bit codes unpacked first into the same layout
 *                    of u = c + 8 (low nibbles step 2s, high nibbles step 2s + 1), taken
 *                    as unsigned (TDPBSUD) and the group's sum is sum u q - 8 sum q
 *   C (tmm0..3):     int32 sums of rows (0-15 | 16-31) x (tile 0 | 1)
 *
 * A group's sums are exact integers, the same as the AVX-512 and portable loops'; the
 * float steps after them (s_g * dot added in group order, then times d) are the same
 * operations in the same order, so the results are the same bits (tests/test_w8a8.py).
 * The loop needs groups of a multiple of 64 inputs (a tile row); rows come in blocks of
 * 32, the input padded with zero rows. */
#ifndef QINFER_W8A8_AMX_H
#define QINFER_W8A8_AMX_H

#include "amx_config.h"

#if W8A8_X86 && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define W8A8_HAVE_AMX 1
#else
#define W8A8_HAVE_AMX 0
#endif

#define W8A8_AMX_MIN_ROWS 16   /* fewer rows: the vector loops (a tile is 16 rows) */
#define W8A8_AMX_K 64          /* inputs per tile product */

/* Int8Matrix.amx: off, the tile instructions, or the C model of them (tests on CPUs
 * without AMX: the same loop, its tiles in memory, slow). */
enum { W8A8_AMX_OFF = 0, W8A8_AMX_TILES = 1, W8A8_AMX_MODEL = 2 };

static int w8a8_amx_present = -1;

/* Whether this CPU has AMX tiles with int8 products, this build their loop, and the OS
 * lets this process use them. */
static int w8a8_amx_available(void)
{
    if (w8a8_amx_present < 0)
        w8a8_amx_present = W8A8_HAVE_AMX && amx_cpu_and_os_grant(AMX_CPUID_TILE | AMX_CPUID_INT8);
    return w8a8_amx_present;
}

/* Whether w8a8_gemm runs this call of n rows on the tiles (or their model). */
static inline int w8a8_amx_takes(const w8a8_matrix *M, int n)
{
    return M->amx != W8A8_AMX_OFF && n >= W8A8_AMX_MIN_ROWS && M->head.group_size % W8A8_AMX_K == 0;
}

/* 8 steps of 4-bit codes (512 bytes: [8][16][4], low nibbles inputs 0-3 of a step, high
 * ones 4-7) as 16 steps of unsigned bytes u (1024 bytes, the 8-bit layout). */
static inline void w8a8_unpack_nibbles(const uint8_t *src, uint8_t *dst)
{
    for (int s = 0; s < 8; s++)
        for (int i = 0; i < 64; i++) {
            dst[(2 * s) * 64 + i] = src[s * 64 + i] & 0x0F;
            dst[(2 * s + 1) * 64 + i] = src[s * 64 + i] >> 4;
        }
}

/* ------------------------------------------------ the C model of the tiles */

/* What the loop uses of AMX: 8 tiles of 16 x 64 bytes and the configuration's shapes. */
typedef struct {
    amx_config cfg;
    uint8_t t[8][16][64];
} w8a8_tile_model;

static void tile_model_load(w8a8_tile_model *s, int i, const void *base, size_t stride)
{
    for (int r = 0; r < s->cfg.rows[i]; r++)
        memcpy(s->t[i][r], (const uint8_t *)base + (size_t)r * stride, s->cfg.colsb[i]);
}

static void tile_model_store(const w8a8_tile_model *s, int i, void *base, size_t stride)
{
    for (int r = 0; r < s->cfg.rows[i]; r++)
        memcpy((uint8_t *)base + (size_t)r * stride, s->t[i][r], s->cfg.colsb[i]);
}

/* C[m][n] += sum over k, i < 4 of A[m][4k + i] * B[k][4n + i], int32 (wrapping, as the
 * instruction); b_signed: TDPBSSD, else TDPBSUD (B's bytes unsigned). */
static void tile_model_dot(w8a8_tile_model *s, int c, int a, int b, int b_signed)
{
    for (int m = 0; m < s->cfg.rows[c]; m++)
        for (int n = 0; n < s->cfg.colsb[c] / 4; n++) {
            uint32_t sum;
            memcpy(&sum, &s->t[c][m][4 * n], 4);
            for (int k = 0; k < s->cfg.colsb[a] / 4; k++)
                for (int i = 0; i < 4; i++) {
                    const int32_t x = (int8_t)s->t[a][m][4 * k + i];
                    const int32_t w = b_signed ? (int32_t)(int8_t)s->t[b][k][4 * n + i] : (int32_t)s->t[b][k][4 * n + i];
                    sum += (uint32_t)(x * w);
                }
            memcpy(&s->t[c][m][4 * n], &sum, 4);
        }
}

#define W8A8_TILES_STATE w8a8_tile_model tile_model_state; w8a8_tile_model *const tiles_ = &tile_model_state;
#define TILE_CONFIG(config) (tiles_->cfg = *(config))
#define TILE_ZERO(i) memset(tiles_->t[i], 0, sizeof tiles_->t[i])
#define TILE_LOAD(i, base, stride) tile_model_load(tiles_, i, base, stride)
#define TILE_STORE(i, base, stride) tile_model_store(tiles_, i, base, stride)
#define TILE_DOT(c, a, b, b_signed) tile_model_dot(tiles_, c, a, b, b_signed)
#define TILE_RELEASE() ((void)0)
#define W8A8_AMX_ATTR
#define W8A8_AMX_NAME(f) f##_model
#include "w8a8_amx_loop.h"   /* which undefines them */

/* ------------------------------------------------ the tile instructions */
#if W8A8_HAVE_AMX
#define W8A8_TILES_STATE
#define TILE_CONFIG(config) _tile_loadconfig(config)
#define TILE_ZERO(i) _tile_zero(i)
#define TILE_LOAD(i, base, stride) _tile_loadd(i, base, stride)
#define TILE_STORE(i, base, stride) _tile_stored(i, base, stride)
/* the tile numbers must be constants in the instruction: both forms spelled out */
#define TILE_DOT(c, a, b, b_signed) do { if (b_signed) _tile_dpbssd(c, a, b); else _tile_dpbsud(c, a, b); } while (0)
#define TILE_RELEASE() _tile_release()
#define W8A8_AMX_ATTR __attribute__((target("amx-tile,amx-int8")))
#define W8A8_AMX_NAME(f) f##_tiles
#include "w8a8_amx_loop.h"   /* which undefines them */
#endif

#endif
