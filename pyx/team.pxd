# team.h for Cython: the thread governor and the team's wait policy, cimported
# by _runtime.pyx (Governor, for tests) and _forward.pyx (set_thread_policy).
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
