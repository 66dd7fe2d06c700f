/* runtime.h: what _runtime.pyx asks of the machine: the CPU's features, the
 * OpenMP runtime's thread count and settings, and a streaming read of a buffer
 * (benchmarks/common.py measures the memory bandwidth with it). Included by
 * _runtime.pyx only. */
#ifndef QINFER_RUNTIME_H
#define QINFER_RUNTIME_H

#include <stdint.h>
#include <stddef.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define QI_X86 1
#else
#define QI_X86 0
#endif

static int qi_cpu_has_avx2_fma(void)
{
#if QI_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

static int qi_openmp_threads(void)
{
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* OpenMP 5.1's omp_display_env (libgomp since GCC 11): the settings libgomp
 * read from the environment when it loaded, on stderr. Weak, so that an
 * older runtime leaves it NULL. */
#ifdef _OPENMP
extern void omp_display_env(int verbose) __attribute__((weak));
#endif

static int qi_display_omp_env(void)
{
#ifdef _OPENMP
    if (omp_display_env) {
        omp_display_env(1);
        return 1;
    }
#endif
    return 0;
}

static int qi_have_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Read every byte of buf once; the returned checksum keeps the compiler
 * from dropping the loads. Threads split the buffer in equal parts. */
static uint64_t qi_stream_read_scalar(const uint64_t *buf, size_t n_words, int nthreads)
{
    uint64_t total = 0;
    long i;
    #pragma omp parallel for reduction(^:total) num_threads(nthreads) schedule(static)
    for (i = 0; i < (long)n_words; i += 4)
        total ^= buf[i] + buf[i + 1] + buf[i + 2] + buf[i + 3];
    return total;
}

#if QI_X86
__attribute__((target("avx2")))
static uint64_t qi_stream_read_avx2(const uint64_t *buf, size_t n_words, int nthreads)
{
    uint64_t total = 0;
    #pragma omp parallel num_threads(nthreads) reduction(^:total)
    {
#ifdef _OPENMP
        const long t = omp_get_thread_num(), T = omp_get_num_threads();
#else
        const long t = 0, T = 1;
#endif
        const long blocks = (long)(n_words / 16);
        const __m256i *p = (const __m256i *)buf;
        __m256i a = _mm256_setzero_si256(), b = a, c = a, d = a;
        for (long i = blocks * t / T; i < blocks * (t + 1) / T; i++) {
            a = _mm256_xor_si256(a, _mm256_load_si256(p + 4 * i));
            b = _mm256_xor_si256(b, _mm256_load_si256(p + 4 * i + 1));
            c = _mm256_xor_si256(c, _mm256_load_si256(p + 4 * i + 2));
            d = _mm256_xor_si256(d, _mm256_load_si256(p + 4 * i + 3));
        }
        a = _mm256_xor_si256(_mm256_xor_si256(a, b), _mm256_xor_si256(c, d));
        total ^= (uint64_t)_mm256_extract_epi64(a, 0) ^ (uint64_t)_mm256_extract_epi64(a, 3);
    }
    return total;
}
#endif

static uint64_t qi_stream_read(const uint64_t *buf, size_t n_words, int nthreads, int avx2)
{
#if QI_X86
    if (avx2)
        return qi_stream_read_avx2(buf, n_words, nthreads);
#endif
    return qi_stream_read_scalar(buf, n_words, nthreads);
}

#endif
