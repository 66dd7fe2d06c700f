# cython: language_level=3
"""Choosing the next token from the logits, in C: one call per generated token.

Order of operations (as in Hugging Face's generate): repetition penalty on
tokens already seen, then temperature, top-k, top-p (nucleus), and a draw
from what is left; temperature 0 is greedy (argmax). The random stream is a
PCG32 generator seeded by the caller, so the same seed gives the same text.
"""
from libc.stdint cimport uint64_t, int32_t

cdef extern from *:
    """
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

typedef struct { uint64_t state, inc; } pcg32;

static uint32_t pcg32_next(pcg32 *r)
{
    uint64_t old = r->state;
    r->state = old * 6364136223846793005ULL + r->inc;
    uint32_t xorshifted = (uint32_t)(((old >> 18u) ^ old) >> 27u);
    uint32_t rot = (uint32_t)(old >> 59u);
    return (xorshifted >> rot) | (xorshifted << ((-rot) & 31));
}

static void pcg32_seed(pcg32 *r, uint64_t seed)
{
    r->state = 0u;
    r->inc = (seed << 1u) | 1u;
    pcg32_next(r);
    r->state += seed;
    pcg32_next(r);
}

/* uniform in [0, 1) with 24 random bits */
static float pcg32_float(pcg32 *r)
{
    return (pcg32_next(r) >> 8) * (1.0f / 16777216.0f);
}

typedef struct { float p; int id; } candidate;

static int by_probability_desc(const void *a, const void *b)
{
    const float pa = ((const candidate *)a)->p, pb = ((const candidate *)b)->p;
    if (pa > pb) return -1;
    if (pa < pb) return 1;
    return ((const candidate *)a)->id - ((const candidate *)b)->id;
}

/* Move the k most probable candidates to the front (unordered): quickselect. */
static void select_top(candidate *c, int n, int k)
{
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        const candidate pivot = c[(lo + hi) / 2];
        int i = lo, j = hi;
        while (i <= j) {
            while (by_probability_desc(&c[i], &pivot) < 0) i++;
            while (by_probability_desc(&c[j], &pivot) > 0) j--;
            if (i <= j) {
                const candidate t = c[i]; c[i] = c[j]; c[j] = t;
                i++; j--;
            }
        }
        if (k - 1 <= j) hi = j;
        else if (k - 1 >= i) lo = i;
        else break;
    }
}

/* The first index of the largest logit, as a scan keeping the first strictly larger
 * value finds it (NaNs never win; a NaN at 0 wins). Greedy decoding calls it once a
 * token: over 49152 logits the scan took 40 us (a compare-and-branch per value), the
 * maxima of blocks of 64, four SSE lanes at a time, then one block's scan take ~3. */
#if defined(__SSE2__)
#include <emmintrin.h>
#define ARGMAX_BLOCK 64
static float block_max(const float *x)
{
    __m128 a = _mm_set1_ps(-INFINITY), b = a, c = a, d = a;
    for (int j = 0; j < ARGMAX_BLOCK; j += 16) {     /* _mm_max_ps(v, acc) is acc when v is NaN */
        a = _mm_max_ps(_mm_loadu_ps(x + j), a);
        b = _mm_max_ps(_mm_loadu_ps(x + j + 4), b);
        c = _mm_max_ps(_mm_loadu_ps(x + j + 8), c);
        d = _mm_max_ps(_mm_loadu_ps(x + j + 12), d);
    }
    a = _mm_max_ps(_mm_max_ps(a, b), _mm_max_ps(c, d));
    float lanes[4];
    _mm_storeu_ps(lanes, a);
    float m = lanes[0];
    for (int i = 1; i < 4; i++)
        m = lanes[i] > m ? lanes[i] : m;
    return m;
}
#endif

static int argmax(const float *logits, int n)
{
    int start = 0, b = 0;       /* logits[0..b) are done by blocks */
    float best = logits[0];
#if defined(__SSE2__)
    if (best != best)
        return 0;
    for (; b + ARGMAX_BLOCK <= n; b += ARGMAX_BLOCK) {
        const float m = block_max(logits + b);
        if (m > best) {         /* a later block's equal maximum does not move it */
            best = m;
            start = b;
        }
    }
    for (int i = start; i < b; i++)     /* the block's first value equal to its maximum */
        if (logits[i] == best) {
            start = i;
            break;
        }
#endif
    for (int i = b; i < n; i++)         /* the rest (without SSE2: all), as the plain scan */
        if (logits[i] > best) {
            best = logits[i];
            start = i;
        }
    return start;
}

static void apply_repetition_penalty(float *logits, int n, const int32_t *seen, int n_seen, float penalty)
{
    for (int i = 0; i < n_seen; i++) {
        const int id = seen[i];
        if (id < 0 || id >= n)
            continue;
        float *l = &logits[id];      /* the caller passes each id once */
        *l = *l > 0 ? *l / penalty : *l * penalty;
    }
}

/* work: n candidates of scratch. Returns the chosen id, or -1 when out of memory. */
static int sample(float *logits, int n, float temperature, int top_k, float top_p,
                  pcg32 *rng, candidate *work)
{
    if (temperature <= 0.0f)
        return argmax(logits, n);
    const float max = logits[argmax(logits, n)];
    double total = 0.0;
    for (int i = 0; i < n; i++) {
        work[i].id = i;
        work[i].p = expf((logits[i] - max) / temperature);
        total += work[i].p;
    }
    int kept = n;
    if ((top_k > 0 && top_k < n) || top_p < 1.0f) {
        if (top_p < 1.0f && !(top_k > 0 && top_k < n)) {
            /* Without top-k: a token with probability below (1 - top_p) / (n - 1) can never be in
             * the nucleus (all of them together hold less than 1 - top_p): drop them
             * before sorting, which leaves a few hundred candidates, not the vocabulary. */
            const double cutoff = (1.0 - top_p) / (n - 1) * total;
            int m = 0;
            for (int i = 0; i < kept; i++)
                if (work[i].p >= cutoff)
                    work[m++] = work[i];
            kept = m > 0 ? m : 1;
        }
        if (top_k > 0 && top_k < kept)
            select_top(work, kept, top_k);
        const int sorted = (top_k > 0 && top_k < kept) ? top_k : kept;
        qsort(work, sorted, sizeof(candidate), by_probability_desc);
        kept = sorted;
        if (top_p < 1.0f) {
            double mass = 0.0, kept_total = 0.0;
            for (int i = 0; i < kept; i++)
                kept_total += work[i].p;
            for (int i = 0; i < kept; i++) {
                mass += work[i].p;
                if (mass >= top_p * kept_total) {   /* smallest prefix holding top_p of the mass */
                    kept = i + 1;
                    break;
                }
            }
        }
        total = 0.0;
        for (int i = 0; i < kept; i++)
            total += work[i].p;
    }
    const double u = pcg32_float(rng) * total;
    double acc = 0.0;
    for (int i = 0; i < kept; i++) {
        acc += work[i].p;
        if (u < acc)
            return work[i].id;
    }
    return work[kept - 1].id;
}
    """
    ctypedef struct pcg32:
        pass
    ctypedef struct candidate:
        pass
    void pcg32_seed(pcg32 *r, uint64_t seed) nogil
    void apply_repetition_penalty(float *logits, int n, const int32_t *seen, int n_seen, float penalty) nogil
    int sample(float *logits, int n, float temperature, int top_k, float top_p, pcg32 *rng,
               candidate *work) nogil

from libc.stdlib cimport malloc, free


cdef class Sampler:
    """Picks tokens; holds its random state and scratch for one vocabulary size."""
    cdef pcg32 rng
    cdef candidate *work
    cdef int vocab_size
    cdef public float temperature
    cdef public int top_k
    cdef public float top_p
    cdef public float repetition_penalty

    def __cinit__(self, int vocab_size, float temperature=0.0, int top_k=0, float top_p=1.0,
                  float repetition_penalty=1.0, seed=None):
        self.work = <candidate *>malloc(sizeof(candidate) * vocab_size)
        if self.work == NULL:
            raise MemoryError()
        self.vocab_size = vocab_size
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.repetition_penalty = repetition_penalty
        if seed is None:
            import os
            seed = int.from_bytes(os.urandom(8), "little")
        pcg32_seed(&self.rng, <uint64_t>(int(seed) & 0xFFFFFFFFFFFFFFFF))

    def __dealloc__(self):
        free(self.work)

    def __call__(self, float[::1] logits, const int32_t[::1] seen=None):
        """The next token id. `logits` is modified (penalty, scaling)."""
        cdef int token
        cdef int n_seen = 0 if seen is None else seen.shape[0]
        if logits.shape[0] != self.vocab_size:
            raise ValueError("logits have the wrong size")
        with nogil:
            if self.repetition_penalty != 1.0 and n_seen > 0:
                apply_repetition_penalty(&logits[0], self.vocab_size, &seen[0], n_seen,
                                         self.repetition_penalty)
            token = sample(&logits[0], self.vocab_size, self.temperature, self.top_k, self.top_p,
                           &self.rng, self.work)
        return token
