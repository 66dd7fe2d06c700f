/* The float qgemm on AMX tiles, part 1 of 2: when it runs, and x cut into
 * bf16 limbs. Plain C, the same for every bit width, included as text by
 * pyx/qgemm.pyx.tp in its AVX2 section where the module holds the AMX qgemm
 * (QINFER_HAVE_AMX; the rule is in qinfer/variants.py). It uses the module's
 * prepared, row_stride() and float_avx512_available(). Next come
 * amx_unpack_codes, rendered per bit width (pyx/snippets/amx_unpack_codes.c.tp),
 * and part 2, pyx/amx_gemm.h. */
/* ------------------------------------------------ qgemm: AMX tiles, bf16 limbs */
/* With many activation rows the float qgemm is bound by the float multiply-adds
 * (about numpy's sgemm rate). AMX multiplies 16 x 32 bf16 by 32 x 16 bf16 into a
 * 16 x 16 float32 tile in one instruction, 16 times the multiply-adds of an
 * AVX-512 FMA per cycle. Neither side loses a bit on the way:
 *
 *   weights: the codes q themselves (integers < 256: exact in bf16's 8-bit
 *            significand); Eq. (2) applies scale and zero per segment after:
 *            y += scale * (sum q x - zero * sum x), as the other float kernels do;
 *   x:       cut into three bf16 limbs, x = h + m + l: h is x with the low 16
 *            bits of its float32 pattern cleared, m the same of x - h, l = x - h - m
 *            (x's 24-bit significand, 8 bits a limb, each subtraction exact).
 *
 * Each product of a code and a limb is exact in float32; the tile sums them in
 * float32. So a row costs three tile products where float32 would take one,
 * still about five times the FMA rate. (Denormal limbs, |x| < 2^-110 or so,
 * count as zero on AMX.)
 *
 * Tile registers, per step of 32 input rows (k-step):
 *   tmm6, tmm7:      the codes of two qinfer tiles (16 columns each), rows paired
 *                    as AMX wants them: element (k/2, column) holds rows k, k+1;
 *   tmm4, tmm5:      16 activation rows each, one limb at a time;
 *   tmm0..3:         float32 sums, (activation rows 0-15 | 16-31) x (tile 0 | 1).
 * A segment's codes are unpacked once per thread into bf16 and reused by every
 * chunk of 32 activation rows; the next segment's are unpacked a slice at a
 * time between this one's tile products, so the vector units work while the
 * AMX unit does. */
#include "amx_config.h"
#define QI_AMX __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,amx-tile,amx-bf16")))
#define AMX_MIN_ROWS 16      /* fewer activation rows: the FMA kernels (a tile is 16 rows) */
/* Segments (scale groups) shorter than this keep the FMA kernels: the sums come out
 * of the tiles and are scaled once per segment, and for short groups that costs as
 * much as the products save. 4-bit, 2 threads, 64 and 512 rows, AMX over FMA rate:
 * g32 0.8-1.0x (576x576, 4096x4096); g64 0.75-2.3x (576x1536 and 1536x576 with 512 rows
 * lose); g128 1.2-1.8x and full columns 0.9-2.4x (the Eq. 1 segments are >= 512 rows). */
#define AMX_MIN_SEGMENT 128
#define AMX_LIMB_BYTES (768 * 1024)   /* the limbs a row chunk keeps in L2 over an input block ... */
#define AMX_K_BLOCK 2048     /* ... of this many input rows: 64 rows x 2048 x 3 limbs x 2 bytes */
#define AMX_MAX_ROW_CHUNK 256

/* Activation rows per chunk: as many (in 32s, 64 to AMX_MAX_ROW_CHUNK) as keep the
 * chunk's limbs over one input block within AMX_LIMB_BYTES; every chunk unpacks
 * the codes again, so short layers take more rows at a time. */
static inline int amx_row_chunk(int block_rows)
{
    const int rows = (int)(AMX_LIMB_BYTES / (3 * sizeof(uint16_t) * (size_t)block_rows)) / 32 * 32;
    return rows < 64 ? 64 : rows > AMX_MAX_ROW_CHUNK ? AMX_MAX_ROW_CHUNK : rows;
}
#ifndef AMX_PREFETCH_SEGMENTS   /* -DAMX_PREFETCH_SEGMENTS=... for experiments */
#define AMX_PREFETCH_SEGMENTS 1
#endif

/* Whether this CPU has AMX tiles with bf16 and the OS lets this process use
 * them (Linux hands out the 8 KiB of tile state on request, once per process). */
static int amx_cpu_and_os(void)
{
    return float_avx512_available() && amx_cpu_and_os_grant(AMX_CPUID_BF16 | AMX_CPUID_TILE);
}

/* -1 until asked; then whether the float qgemm uses AMX (set_float_amx can turn it off). */
static int float_amx = -1;
static int amx_present = -1;

static int amx_available(void)
{
    if (amx_present < 0)
        amx_present = amx_cpu_and_os();
    return amx_present;
}

static int use_amx(void)
{
    if (float_amx < 0)
        float_amx = amx_available();
    return float_amx;
}

/* x's limbs in bf16: [LIMB][rows][ld], rows padded with zeros to a multiple of 32. */
typedef struct {
    uint16_t *limb;
    size_t ld;           /* bf16 values from one row to the next */
    size_t limb_size;    /* from one limb's rows to the next */
    int rows;
} amx_limbs;

static inline QI_AMX __m256i bf16_bits(__m512 v)   /* the high halves of 16 floats */
{
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16));
}

static QI_AMX int amx_split(const prepared *p, int n, int K, amx_limbs *a)
{
    a->rows = (n + 31) / 32 * 32;
    a->ld = row_stride((size_t)K, sizeof(uint16_t));   /* rows 16 apart in other L1 sets */
    a->limb_size = a->ld * (size_t)a->rows;
    a->limb = (uint16_t *)calloc(3 * a->limb_size, sizeof(uint16_t));
    if (!a->limb)
        return -1;
    const __m512i top = _mm512_set1_epi32((int)0xFFFF0000u);
    for (int r = 0; r < n; r++) {
        const float *x = p->x + (size_t)r * p->ldx;
        uint16_t *h = a->limb + (size_t)r * a->ld;
        for (int k = 0; k < K; k += 16) {
            const __m512 v = _mm512_loadu_ps(x + k);
            const __m512 vh = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), top));
            const __m512 rest = _mm512_sub_ps(v, vh);
            const __m512 vm = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(rest), top));
            _mm256_storeu_si256((__m256i *)(h + k), bf16_bits(vh));
            _mm256_storeu_si256((__m256i *)(h + a->limb_size + k), bf16_bits(vm));
            _mm256_storeu_si256((__m256i *)(h + 2 * a->limb_size + k), bf16_bits(_mm512_sub_ps(rest, vm)));
        }
    }
    return 0;
}
