/* team.h: the thread team of a decode step (pyx/_forward.pyx, decode_team),
 * which the kernels it calls (qgemv_team_fn, qmatrix.h) are given.
 *
 * A decode step runs as one OpenMP parallel region; between its steps the
 * threads meet at team_wait, a spinning barrier (~0.1 us on a 2-core KVM
 * guest, where libgomp's fork and join of a region cost ~1.5 us).
 */
#ifndef QINFER_TEAM_H
#define QINFER_TEAM_H

#include <sched.h>

typedef struct {
    int arrived;      /* threads at the barrier in this generation */
    int generation;   /* advanced by the last to arrive, which releases the others */
} team_barrier;

typedef struct team {
    team_barrier *barrier;
    int thread, threads;   /* this thread, of the team */
    int spins;             /* pauses a waiting thread spins through before it gives its core away */
} team;

/* Pauses a waiting thread spins through (~50 us) before it starts giving its
 * core away, when the team has a core per thread; with more threads than
 * cores it yields at once, or it would spin while the thread it waits for
 * waits for its core. */
#define TEAM_SPINS 2000

static inline int team_spins(int threads, int cores)
{
    return threads <= cores ? TEAM_SPINS : 0;
}

static inline void team_pause(const team *tm, int *spins)
{
    if (++*spins < tm->spins) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
        __builtin_ia32_pause();
#endif
    } else {
        sched_yield();
    }
}

static inline void team_wait(const team *tm)
{
    team_barrier *b = tm->barrier;
    if (tm->threads == 1)
        return;
    const int generation = __atomic_load_n(&b->generation, __ATOMIC_ACQUIRE);
    if (__atomic_add_fetch(&b->arrived, 1, __ATOMIC_ACQ_REL) == tm->threads) {
        __atomic_store_n(&b->arrived, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&b->generation, generation + 1, __ATOMIC_RELEASE);
        return;
    }
    int spins = 0;
    while (__atomic_load_n(&b->generation, __ATOMIC_ACQUIRE) == generation)
        team_pause(tm, &spins);
}

#endif
