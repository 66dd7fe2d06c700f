# team.h for Cython: the thread governor, the team's wait policy and its tile claims,
# cimported by _runtime.pyx (Governor and claim_order, for tests) and _forward.pyx
# (set_thread_policy).
# The variables are static in team.h: each module that cimports them gets its own.

cdef extern from "team.h":
    ctypedef struct team_governor:
        int max, use, probe, probes, switches, skipped, fixed_cores
        double cost, work, share, fixed_load
    void governor_init(team_governor *g, int probe_units)
    void governor_rows(team_governor *g, int rows)
    int governor_threads(team_governor *g, int nthreads)
    void governor_report(team_governor *g, int threads, double start, double end)
    double team_stat_busy_ticks(const char *line, int *cpu)
    double TEAM_PROBE_MIN_S, TEAM_PROBE_MAX_S, TEAM_PROBE_MARGIN, TEAM_PROBE_MARGIN_UP, TEAM_PROBE_SHARE
    int TEAM_PROBE_WARMUP
    int TEAM_WAIT_SLEEP, TEAM_WAIT_SPIN
    int team_wait_mode
    double team_probe_min_s, team_probe_max_s, team_probe_share
    int team_load_check
    ctypedef struct team_barrier:
        int fixed_shares
    ctypedef struct team_member "team":     # qmatrix.pxd's `team`, with its fields
        team_barrier *barrier
        int thread, threads, spins
    ctypedef struct team_claims:
        pass
    void team_claims_reset(team_barrier *b, int threads)
    team_claims team_claims_of(const team_member *tm, int count, int claim)
    int team_claim(team_claims *c, int *first, int *last)
    int TEAM_MAX_CLAIMS
