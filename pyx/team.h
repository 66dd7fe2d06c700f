/* team.h: the thread team of a decode step (pyx/forward.c, team_forward),
 * which the kernels it calls (qgemv_team_fn, qmatrix.h) are given, and the
 * governor that chooses how many threads the forward pass runs with.
 *
 * A decode step runs as one OpenMP parallel region; between its steps the
 * threads meet at team_wait, a barrier that spins briefly (~0.1 us on a
 * 2-core KVM guest, where libgomp's fork and join of a region cost ~1.5 us),
 * then yields, then sleeps on a futex: a thread whose partner has lost its
 * core to another process must not keep its own core spinning for it.
 *
 * The governor (team_governor): on a busy machine (a laptop compiling, a
 * second program) a thread that shares its core with another process runs at
 * half speed or less, and every thread of a statically split kernel waits for
 * it: two threads then decode slower than one. The governor times each unit of
 * work (a decode step; one block of a prefill) at the thread count in use and
 * now and then runs a few units with one thread fewer (or more) as a probe,
 * keeping whichever is faster; a probe of fewer threads runs only while other
 * processes use the CPU (governor_contended). Thread counts do not change results: every
 * kernel's sums are the same for any split of its tiles.
 */
#ifndef QINFER_TEAM_H
#define QINFER_TEAM_H

#include <limits.h>
#include <math.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__linux__)
#include <fcntl.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#define TEAM_FUTEX 1
#else
#define TEAM_FUTEX 0
#endif

#if defined(__GNUC__)
#define TEAM_UNUSED __attribute__((unused))
#else
#define TEAM_UNUSED
#endif

/* The threads a kernel call's own parallel region runs with: the count asked
 * for, or OpenMP's default (nthreads 0). */
static inline int team_thread_count(int nthreads)
{
#ifdef _OPENMP
    return nthreads > 0 ? nthreads : omp_get_max_threads();
#else
    (void)nthreads;
    return 1;
#endif
}

/* Tiles claimed, not dealt (team_claim): a batched step's kernel calls (several rows)
 * give each thread its contiguous share of the tiles, which it takes from the front a
 * few at a time; a thread done with its own takes what is left of the others' from
 * their backs. In a server the event loop and the clients run on the forward pass's
 * cores: a thread that loses its core mid-call leaves its remaining tiles to its
 * partner, which with fixed shares waited for it at the next barrier (2-core KVM, 8
 * streams: an 8-row step took ~1.6 ms longer in the server than alone, for ~0.9 ms of
 * CPU the server's other threads used a step). Which thread computes a tile does not
 * change its numbers. Each thread's range lives in a cache line of its own, as units
 * of TEAM_CLAIM_UNITS per call (set at every barrier, before the next call's tile
 * count is known): every claiming call must follow a barrier (team_wait). */
#define TEAM_MAX_CLAIMS 64          /* more threads than this keep fixed shares */
#define TEAM_CLAIM_UNITS (1u << 24)
#define TEAM_OWN_TILES 4            /* tiles a thread takes of its own share at a time */
typedef struct {
    unsigned long long range;       /* (first unit << 32) | end unit still to take */
    char pad[64 - sizeof(unsigned long long)];
} __attribute__((aligned(64))) team_claim_slot;

typedef struct {
    int arrived;      /* threads at the barrier in this generation */
    int generation;   /* advanced by the last to arrive, which releases the others */
    int sleepers;     /* threads asleep (or about to be) on `generation` */
    int fixed_shares; /* claiming calls take their fixed shares instead (_forward.set_tile_claims) */
    team_claim_slot claims[TEAM_MAX_CLAIMS];   /* thread i's share of the next claiming call */
} team_barrier;

typedef struct team {
    team_barrier *barrier;
    int thread, threads;   /* this thread, of the team */
    int spins;             /* pauses a waiting thread spins through before it gives its core away */
} team;

/* Thread tm->thread's fixed share [*first, *last) of `count` tiles: an even split. */
static inline void team_share(const team *tm, int count, int *first, int *last)
{
    *first = (int)((long)count * tm->thread / tm->threads);
    *last = (int)((long)count * (tm->thread + 1) / tm->threads);
}

/* Every thread's share of the next claiming call, whole again: its own range of units. */
static inline void team_claims_reset(team_barrier *b, int threads)
{
    for (int i = 0; i < threads && i < TEAM_MAX_CLAIMS; i++) {
        const unsigned long long first = (unsigned long long)TEAM_CLAIM_UNITS * i / threads;
        const unsigned long long end = (unsigned long long)TEAM_CLAIM_UNITS * (i + 1) / threads;
        __atomic_store_n(&b->claims[i].range, first << 32 | end, __ATOMIC_RELAXED);
    }
}

/* One kernel call's claims, for one thread: `while (team_claim(&c, &first, &last))`.
 * A call not known to follow a barrier (claim 0: a decode step's) takes its fixed share. */
typedef struct {
    const team *tm;
    int count;         /* the call's tiles */
    int victim;        /* the thread whose range it takes from now: its own, then the others */
    int fixed;         /* no claims (see team_claims_of): its fixed share, once */
} team_claims;

static inline team_claims team_claims_of(const team *tm, int count, int claim)
{
    team_claims c = {tm, count, tm->thread,
                     !claim || tm->threads == 1 || tm->threads > TEAM_MAX_CLAIMS || tm->barrier->fixed_shares};
    return c;
}

/* The next tiles [*first, *last) this thread computes, or 0 when every tile is taken. */
static inline int team_claim(team_claims *c, int *first, int *last)
{
    const team *tm = c->tm;
    if (c->fixed) {
        c->fixed = 0;
        c->victim = -1;     /* and nothing more */
        team_share(tm, c->count, first, last);
        return 1;
    }
    if (c->victim < 0 || c->count <= 0)
        return 0;
    const unsigned long long units_per_tile = (TEAM_CLAIM_UNITS + (unsigned)c->count - 1) / (unsigned)c->count;
    for (;;) {
        unsigned long long *range = &tm->barrier->claims[c->victim].range;
        const int own = c->victim == tm->thread;
        const unsigned long long take = (own ? TEAM_OWN_TILES : 1) * units_per_tile;
        unsigned long long v = __atomic_load_n(range, __ATOMIC_ACQUIRE);
        for (;;) {
            const unsigned long long lo = v >> 32, hi = v & 0xffffffffu;
            if (lo >= hi)
                break;
            /* its own from the front, another's from the back */
            const unsigned long long a = own ? lo : (hi - lo > take ? hi - take : lo);
            const unsigned long long b = own ? (hi - lo > take ? lo + take : hi) : hi;
            const unsigned long long left = own ? (b << 32 | hi) : (lo << 32 | a);
            if (__atomic_compare_exchange_n(range, &v, left, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
                *first = (int)(a * (unsigned long long)c->count / TEAM_CLAIM_UNITS);
                *last = (int)(b * (unsigned long long)c->count / TEAM_CLAIM_UNITS);
                if (*first < *last)
                    return 1;
                v = __atomic_load_n(range, __ATOMIC_ACQUIRE);   /* units of no whole tile: take more */
            }
        }
        c->victim = (c->victim + 1) % tm->threads;      /* this range is empty: the next thread's */
        if (c->victim == tm->thread) {
            c->victim = -1;
            return 0;
        }
    }
}

/* Pauses a waiting thread spins through (~50 us at ~25 ns a pause) before it
 * starts giving its core away, when the team has a core per thread; with more
 * threads than cores it yields at once, or it would spin while the thread it
 * waits for waits for its core. */
#define TEAM_SPINS 2000
/* Then sched_yield()s (~0.5 us each when nothing else wants the core; a
 * thread of ours that shares it runs at once) before it sleeps on the futex. */
#define TEAM_YIELDS 64

/* How a waiting thread waits: TEAM_WAIT_SLEEP (spin, yield, then sleep) or
 * TEAM_WAIT_SPIN (spin, then yield for as long as it takes: before issue 34,
 * kept for A/B measurements, QINFER_WAIT=spin). Set once per extension module
 * that runs teams (pyx/_forward.pyx, set_thread_policy). */
#define TEAM_WAIT_SLEEP 0
#define TEAM_WAIT_SPIN 1
static int team_wait_mode TEAM_UNUSED = TEAM_WAIT_SLEEP;

static inline int team_spins(int threads, int cores)
{
    return threads <= cores ? TEAM_SPINS : 0;
}

static inline void team_cpu_pause(void)
{
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    __builtin_ia32_pause();
#endif
}

#if TEAM_FUTEX
static inline void team_futex_wait(int *word, int value)
{
    syscall(SYS_futex, word, FUTEX_WAIT_PRIVATE, value, NULL, NULL, 0);
}

static inline void team_futex_wake(int *word)
{
    syscall(SYS_futex, word, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}
#endif

static inline void team_wait(const team *tm)
{
    team_barrier *b = tm->barrier;
    if (tm->threads == 1)
        return;
    const int generation = __atomic_load_n(&b->generation, __ATOMIC_ACQUIRE);
    if (__atomic_add_fetch(&b->arrived, 1, __ATOMIC_ACQ_REL) == tm->threads) {
        __atomic_store_n(&b->arrived, 0, __ATOMIC_RELAXED);
        team_claims_reset(b, tm->threads);   /* published by the store of generation below */
        /* sequentially consistent with the sleepers' count below (a waiter adds
         * itself, then reads generation): either it sees the new generation or
         * the releaser sees it and wakes it */
        __atomic_store_n(&b->generation, generation + 1, __ATOMIC_SEQ_CST);
#if TEAM_FUTEX
        if (__atomic_load_n(&b->sleepers, __ATOMIC_SEQ_CST))
            team_futex_wake(&b->generation);
#endif
        return;
    }
    for (int spins = 0; spins < tm->spins; spins++) {
        if (__atomic_load_n(&b->generation, __ATOMIC_ACQUIRE) != generation)
            return;
        team_cpu_pause();
    }
    const int sleeps = TEAM_FUTEX && team_wait_mode == TEAM_WAIT_SLEEP;
    for (int i = 0; !sleeps || i < TEAM_YIELDS; i++) {
        if (__atomic_load_n(&b->generation, __ATOMIC_ACQUIRE) != generation)
            return;
        sched_yield();
    }
#if TEAM_FUTEX
    __atomic_add_fetch(&b->sleepers, 1, __ATOMIC_SEQ_CST);
    while (__atomic_load_n(&b->generation, __ATOMIC_SEQ_CST) == generation)
        team_futex_wait(&b->generation, generation);   /* returns at once if it has moved on */
    __atomic_sub_fetch(&b->sleepers, 1, __ATOMIC_RELAXED);
#endif
}

/* ------------------------------------------------------------ the governor */

/* A probe must be this much faster than the moving average of the count in
 * use to replace it: noise of a few percent does not make the count flap. A
 * probe of one thread more must win by TEAM_PROBE_MARGIN_UP / (threads in use)
 * more (15% from one thread to two): a lucky probe that adds a thread to a
 * contended core costs more, until noticed, than one that drops a thread. */
#define TEAM_PROBE_MARGIN 0.08
#define TEAM_PROBE_MARGIN_UP 0.07
/* Wins in a row a probe needs to replace the count: one that wins is run again as
 * soon as the count in use has run TEAM_MIN_UNITS units more. On a virtual machine
 * a vCPU the hypervisor holds back for a few milliseconds stalls the team at its
 * barriers, and a one-thread probe timed then wins against a quiet machine's two
 * threads; made to win twice, it rarely does (2-core KVM, quiet: 6 switches in 8-10
 * probes of SmolLM2's decode with one win, and the decode 7-20% slower than a
 * fixed count), while a core really taken by another process loses both. */
#define TEAM_PROBE_CONFIRM 2
/* The moving average's weight of the newest unit. */
#define TEAM_COST_WEIGHT 0.5
/* Units in a row this much slower than the moving average the last probe
 * ended with probe at once (another process took a core), without waiting for
 * the interval; one slow unit (an interrupt, a page fault) does not. */
#define TEAM_DEGRADED 1.25
#define TEAM_SLOW_UNITS 2
/* Seconds of work (the governor's units, not the wall clock: a program that
 * prefills once a minute is not probed on every call) between periodic
 * probes: the first a second after a start or a switch, then twice as long
 * after every probe that loses, up to TEAM_PROBE_MAX_S. */
#define TEAM_PROBE_MIN_S 1.0
#define TEAM_PROBE_MAX_S 8.0
/* The two in force in this extension module (tests set them to 0: a probe as
 * soon as TEAM_MIN_UNITS units allow; pyx/_forward.pyx, set_probe_interval). */
static double team_probe_min_s TEAM_UNUSED = TEAM_PROBE_MIN_S;
static double team_probe_max_s TEAM_UNUSED = TEAM_PROBE_MAX_S;
/* A periodic probe costs up to its own units' time again (with a thread fewer they
 * take up to twice as long), so once a probe has lost, the next periodic ones also
 * wait until the work since the last is at least the probe's units' time /
 * TEAM_PROBE_SHARE: with a 7B model's decode steps of ~0.15 s a probe every few
 * seconds would cost the decode several percent on a quiet machine; with SmolLM2's
 * 4 ms steps the interval above is the longer. The first probe after a start or a
 * switch does not wait for it (a count that starts on a busy machine is found out
 * after a second of work). A governor takes the share in force when it starts
 * (tests set 0: no such wait). */
#define TEAM_PROBE_SHARE 0.02
static double team_probe_share TEAM_UNUSED = TEAM_PROBE_SHARE;
/* Units at the count in use before any probe (the average must mean something). */
#define TEAM_MIN_UNITS 4
/* Units a probe runs before the ones it times: the first unit with more
 * threads than just before wakes threads that went to sleep (libgomp's and
 * the team's futexes; a halted virtual CPU takes long to wake), and would
 * make the probe lose on a machine where that count is the faster one. */
#define TEAM_PROBE_WARMUP 1
/* A unit that starts this long after the previous one ended (between two
 * prefills, before the first step of a generation) finds threads asleep and
 * caches cold: it counts as work, but neither in the moving average nor in a
 * probe, nor as a slow unit. */
#define TEAM_IDLE_S 0.01

/* The process's monotonic clock, in seconds (~25 ns a call through the vDSO). */
static inline double team_clock(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ------------------------------------------- the rest of the machine's load */

/* A probe with one thread fewer only wins when other processes want the cores
 * our threads run on; on a quiet machine it costs its units' extra time for
 * nothing (2-5% of SmolLM2's decode on the 2-core KVM guest, where a vCPU
 * stall now and then also makes units look slow). So before such a probe the
 * governor asks how many cores' worth of CPU time the rest of the machine used
 * since it last asked: /proc/stat's busy time (steal included: a hypervisor
 * that takes the vCPUs is contention too) less this process's CPU time. */
typedef struct {
    double wall;    /* team_clock() when taken; 0: none */
    double busy;    /* seconds all CPUs were busy since boot (/proc/stat) */
    double own;     /* seconds of CPU this process used (all its threads) */
    int cores;      /* CPUs it may run on, whose busy time `busy` counts */
} team_load_mark;

/* Shortest window worth measuring: the kernel counts busy time in ticks of
 * 10 ms per CPU. A probe asked for sooner waits until the window is this long. */
#define TEAM_LOAD_MIN_S 0.1
/* Cores of other load that leave room for our threads: daemons, interrupts. */
#define TEAM_LOAD_SLACK 0.25

/* Busy clock ticks of a "cpu" or "cpuN" line of /proc/stat (user nice system
 * idle iowait irq softirq steal ...): everything but idle and iowait, with N
 * in *cpu (-1 for the "cpu" line of all CPUs); -1 if the line is not one.
 * Guest time is already counted in user and nice. */
static inline double team_stat_busy_ticks(const char *line, int *cpu)
{
    if (line[0] != 'c' || line[1] != 'p' || line[2] != 'u')
        return -1.0;
    const char *p = line + 3;
    *cpu = -1;
    if (*p >= '0' && *p <= '9') {
        char *end;
        const unsigned long n = strtoul(p, &end, 10);
        if (n > INT_MAX)
            return -1.0;
        *cpu = (int)n;
        p = end;
    }
    if (*p != ' ')
        return -1.0;
    double total = 0.0, idle = 0.0;
    for (int field = 0; field < 8; field++) {
        char *end;
        const double v = (double)strtoull(p, &end, 10);
        if (end == p)
            return field >= 4 ? total - idle : -1.0;   /* old kernels stop after iowait */
        total += v;
        if (field == 3 || field == 4)
            idle += v;
        p = end;
    }
    return total - idle;
}

/* Bytes of /proc/stat read: its per-CPU lines come first (~100 bytes a CPU). */
#define TEAM_STAT_BYTES (1 << 17)

/* The mark now, over the CPUs this process may run on (its affinity mask: a
 * competitor on a CPU of ours matters, one on a CPU we may not use does not);
 * 0 where it cannot be read (not Linux, more CPUs than a cpu_set_t holds). */
static inline int team_load_read(team_load_mark *m)
{
#if defined(__linux__) && defined(CPU_ISSET) && defined(CPU_COUNT)
    static long ticks_per_s;
    if (!ticks_per_s)
        ticks_per_s = sysconf(_SC_CLK_TCK);
    cpu_set_t allowed;
    if (ticks_per_s <= 0 || sched_getaffinity(0, sizeof allowed, &allowed))
        return 0;
    char *text = malloc(TEAM_STAT_BYTES);
    if (!text)
        return 0;
    const int fd = open("/proc/stat", O_RDONLY | O_CLOEXEC);
    size_t have = 0;
    if (fd >= 0) {
        ssize_t got;
        while (have < TEAM_STAT_BYTES - 1 && (got = read(fd, text + have, TEAM_STAT_BYTES - 1 - have)) > 0)
            have += (size_t)got;
        close(fd);
    }
    text[have] = 0;
    double ticks = 0.0;
    int lines = 0;
    for (const char *line = text; *line; lines++) {
        int cpu;
        const double busy = team_stat_busy_ticks(line, &cpu);
        if (busy < 0.0)
            break;              /* the CPU lines are over */
        if (cpu >= 0 && cpu < CPU_SETSIZE && CPU_ISSET(cpu, &allowed))
            ticks += busy;
        const char *next = strchr(line, '\n');
        if (!next)
            break;
        line = next + 1;
    }
    free(text);
    struct timespec own;
    if (lines < 2 || clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &own))
        return 0;
    m->wall = team_clock();
    m->busy = ticks / (double)ticks_per_s;
    m->own = (double)own.tv_sec + 1e-9 * (double)own.tv_nsec;
    m->cores = CPU_COUNT(&allowed);
    return 1;
#else
    (void)m;
    return 0;
#endif
}

/* Whether governors that start from now on measure the load before a probe of
 * fewer threads (1) or run every probe as on a busy machine (0: tests, which
 * make the governor probe all the time; pyx/_forward.pyx, set_load_check). */
static int team_load_check TEAM_UNUSED = 1;

typedef struct {
    int max;            /* the thread count asked for; 0 before the first unit */
    int use;            /* threads units run with */
    int probe;          /* threads the running probe uses, 0 when none runs */
    int probe_left;     /* units the running probe has still to run (its warm-up too) */
    int probe_units;    /* units a probe runs */
    int direction;      /* the side the next probe tries: -1 one thread fewer, +1 one more */
    int units;          /* units at `use` since the last probe or rebase */
    int slow;           /* of which the last ones in a row TEAM_DEGRADED slower than `ref` */
    int rows;           /* rows of the units (governor_rows; 0: one) */
    int probes, switches;   /* counts since the start, for tests and diagnostics */
    int wins;           /* wins in a row of the probe being confirmed (TEAM_PROBE_CONFIRM) */
    double probe_sum;   /* cost of the running probe's units */
    double cost;        /* seconds a unit takes at `use`, per row (moving average); < 0 unknown */
    double ref;         /* `cost` when the last probe ended (or at a rebase) */
    double work;        /* seconds of all units so far: the governor's clock */
    double last_end;    /* clock (team_clock) when the last unit ended; 0 before the first */
    double next_probe;  /* `work` at the next periodic probe */
    double interval;    /* seconds of work between periodic probes */
    double share;       /* TEAM_PROBE_SHARE when it started */
    int losses;         /* probes lost since the start or the last switch */
    int skipped;        /* probes of fewer threads not run: the machine had room for ours */
    team_load_mark mark;    /* the machine's load when last asked (governor_contended) */
    double fixed_load;      /* tests: the other load to assume (>= 0), or < 0: measure */
    int fixed_cores;        /* tests: the cores to assume with fixed_load */
} team_governor;

static inline void governor_init(team_governor *g, int probe_units)
{
    g->max = 0;
    g->probe_units = probe_units > 0 ? probe_units : 1;
    g->share = team_probe_share;
    g->probes = g->switches = g->wins = g->skipped = 0;
    g->mark.wall = 0.0;
    g->fixed_load = team_load_check ? -1.0 : HUGE_VAL;
    g->fixed_cores = 0;
    g->rows = 0;
    g->work = g->last_end = 0.0;
}

/* Forget the cost (not the count in use, nor when to probe next): the units
 * that follow cost something else (a prefill of another length). */
static inline void governor_rebase(team_governor *g)
{
    g->probe = 0;
    g->units = g->slow = g->wins = 0;
    g->cost = g->ref = -1.0;
}

/* The units that follow have `rows` rows (a prefill block's tokens): their
 * cost is counted per row, and a change of more than a quarter makes it
 * another one. */
static inline void governor_rows(team_governor *g, int rows)
{
    if (4 * (rows > g->rows ? rows - g->rows : g->rows - rows) > g->rows)
        governor_rebase(g);
    g->rows = rows;
}

/* Whether the periodic probe is due: `interval` seconds of work since the last one
 * ended, and after a lost probe the probe's units' expected time / share
 * (TEAM_PROBE_SHARE). */
static inline int governor_probe_due(const team_governor *g)
{
    const double since = g->work - (g->next_probe - g->interval);
    const double probe = (TEAM_PROBE_WARMUP + g->probe_units) * g->cost * (g->rows > 1 ? g->rows : 1);
    return g->work >= g->next_probe && (g->share <= 0.0 || !g->losses || since * g->share >= probe);
}

/* Whether other processes want the cores `threads` threads of ours run on: 1
 * yes (or it cannot be told), 0 no, -1 not known yet (the window since the last
 * mark is shorter than TEAM_LOAD_MIN_S, or there was none: ask again later). */
static inline int governor_contended(team_governor *g, int threads)
{
    if (g->fixed_load >= 0.0)
        return g->fixed_load + threads > g->fixed_cores + TEAM_LOAD_SLACK;
    if (g->mark.wall > 0.0 && team_clock() - g->mark.wall < TEAM_LOAD_MIN_S)
        return -1;
    team_load_mark now;
    if (!team_load_read(&now))
        return 1;
    const team_load_mark then = g->mark;
    g->mark = now;
    if (then.wall <= 0.0)
        return -1;
    if (now.cores != then.cores)
        return -1;              /* the affinity changed: a new window */
    const double other = ((now.busy - then.busy) - (now.own - then.own)) / (now.wall - then.wall);
    return other + threads > now.cores + TEAM_LOAD_SLACK;
}

/* Threads for the next unit, of at most `nthreads` (the count asked for). */
static inline int governor_threads(team_governor *g, int nthreads)
{
    if (nthreads <= 1)
        return nthreads;
    if (g->max != nthreads) {   /* a new count asked for: start from it */
        g->max = g->use = nthreads;
        g->direction = -1;
        g->interval = team_probe_min_s;
        g->next_probe = g->work + g->interval;
        g->losses = 0;
        governor_rebase(g);
    }
    if (g->probe)
        return g->probe;
    if (g->cost >= 0.0 && g->units >= TEAM_MIN_UNITS && (governor_probe_due(g) || g->slow >= TEAM_SLOW_UNITS)) {
        if (g->use + g->direction < 1 || g->use + g->direction > g->max)
            g->direction = -g->direction;
        if (g->direction < 0) {
            const int contended = governor_contended(g, g->use);
            if (contended < 0)
                return g->use;          /* asked again at the next unit */
            if (!contended) {           /* room for our threads: the probe could only lose */
                g->skipped++;
                g->slow = 0;
                g->next_probe = g->work + g->interval;
                return g->use;
            }
        }
        g->probe = g->use + g->direction;
        g->probe_left = TEAM_PROBE_WARMUP + g->probe_units;
        g->probe_sum = 0.0;
        g->probes++;
        return g->probe;
    }
    return g->use;
}

/* A unit ran with `threads` threads (what governor_threads gave) from clock
 * `start` to `end` (team_clock). */
static inline void governor_report(team_governor *g, int threads, double start, double end)
{
    if (g->max <= 1)
        return;
    const double seconds = end - start;
    const int after_idle = g->last_end > 0.0 && start - g->last_end > TEAM_IDLE_S;
    g->work += seconds;
    g->last_end = end;
    if (after_idle) {
        /* the load while we were idle says nothing of the load we now run beside */
        if (g->fixed_load < 0.0 && g->mark.wall > 0.0 && !team_load_read(&g->mark))
            g->mark.wall = 0.0;
        return;
    }
    const double cost = g->rows > 1 ? seconds / g->rows : seconds;
    if (g->probe && threads == g->probe) {
        if (g->probe_left-- > g->probe_units)
            return;   /* a warm-up unit */
        g->probe_sum += cost;
        if (g->probe_left > 0)
            return;
        const double mean = g->probe_sum / g->probe_units;
        const double margin = TEAM_PROBE_MARGIN + (g->probe > g->use ? TEAM_PROBE_MARGIN_UP / g->use : 0.0);
        if (mean < (1.0 - margin) * g->cost && ++g->wins < TEAM_PROBE_CONFIRM) {
            g->probe = 0;        /* a first win: the same probe again once the count in use has run */
            g->units = g->slow = 0;
            g->next_probe = g->work;
            return;
        }
        if (mean < (1.0 - margin) * g->cost) {
            g->use = g->probe;   /* the probe won (again): keep going that way next time */
            g->cost = mean;
            g->interval = team_probe_min_s;
            g->losses = 0;
            g->switches++;
        } else {                 /* it lost: wait longer, then try the other side */
            g->direction = -g->direction;
            g->interval = 2 * g->interval < team_probe_max_s ? 2 * g->interval : team_probe_max_s;
            g->losses++;
        }
        g->wins = 0;
        g->probe = 0;
        g->ref = g->cost;
        g->units = g->slow = 0;
        g->next_probe = g->work + g->interval;
        return;
    }
    if (threads != g->use)
        return;
    g->cost = g->cost < 0.0 ? cost : g->cost + TEAM_COST_WEIGHT * (cost - g->cost);
    if (g->ref < 0.0)
        g->ref = g->cost;
    g->slow = cost > TEAM_DEGRADED * g->ref ? g->slow + 1 : 0;
    g->units++;
}

#endif
