/* amx_config.h: what qinfer's AMX loops share (the float qgemm's, pyx/amx_tiles.h and
 * pyx/amx_gemm.h; the int8 x int8 qgemm's, pyx/w8a8_amx.h): the tile configuration they
 * load, and whether the CPU has the tiles and the OS grants them. Plain C. */
#ifndef QINFER_AMX_CONFIG_H
#define QINFER_AMX_CONFIG_H

#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif
#ifdef __linux__
#include <sys/syscall.h>
#include <unistd.h>
#endif

/* CPUID.(7, 0):EDX bits of the AMX features */
#define AMX_CPUID_BF16 (1u << 22)
#define AMX_CPUID_TILE (1u << 24)
#define AMX_CPUID_INT8 (1u << 25)

/* The layout ldtilecfg reads (palette 1). */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config;

/* Every tile register 16 rows of 64 bytes, as all of qinfer's AMX loops use them. */
static inline void amx_config_full_tiles(amx_config *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg->rows[t] = 16;
        cfg->colsb[t] = 64;
    }
}

/* Whether the CPU has every AMX feature of `features` (AMX_CPUID_*) and the OS lets this
 * process use the tiles (Linux hands out the 8 KiB of tile state on request; asking again
 * when it is granted succeeds). */
static inline int amx_cpu_and_os_grant(unsigned features)
{
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || (d & features) != features)
        return 0;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
#else
    (void)features;
    return 0;
#endif
}

#endif
