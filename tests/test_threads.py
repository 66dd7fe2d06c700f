"""Threads on a busy machine (issue 34): the thread governor of pyx/team.h on
made-up timings, the same logits whichever thread counts it picks, the
switches (QINFER_ADAPT_THREADS, QINFER_WAIT) as qinfer.kernels reports them,
and the OpenMP wait policy qinfer gives libgomp unless the user set one.
Speed figures are benchmarks/contention.py's, not these tests'.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import qinfer
from qinfer import _forward, _runtime, kernels
from qinfer.errors import UnsupportedError

SEQ = [1, 450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278, 17366, 11203, 29889, 13, 3492,
       338, 263, 1243, 29871, 31000]
LO, HI = _runtime.PROBE_MIN_SECONDS, _runtime.PROBE_MAX_SECONDS


@pytest.fixture(autouse=True)
def governor_on():
    """tests/conftest.py turns the governor off for the rest of the suite; these tests are about it."""
    with kernels.use_adaptive_threads(True):
        yield


# ---------------------------------------------------------------- the governor
def drive(gov, cost, seconds, start=0.0, asked=2, rows=None):
    """Run units for `seconds` of made-up work (the governor's clock is the seconds of
    the units it governs); cost(threads, now) is the seconds of a unit that starts
    at `now`. Returns [(start of the unit, its thread count)] and the end."""
    now, units = start, []
    while now < start + seconds:
        if rows is not None:
            gov.rows(rows)
        t = gov.threads(asked)
        c = cost(t, now)
        units.append((now, t))
        now += c
        gov.report(t, c)
    return units, now


def test_governor_keeps_the_faster_count_on_a_quiet_machine():
    """Two threads 1.8x as fast as one: the governor stays at two; its probes of one
    thread come a second of work after the start, then ever further apart (up to HI)."""
    gov = _runtime.Governor()
    units, _ = drive(gov, lambda t, now: 0.01 if t == 2 else 0.018, 60.0)
    counts = [t for _, t in units]
    assert gov.use == 2 and gov.switches == 0
    # probes at ~1, 3, 7, 15 s, then every HI seconds: a handful in a minute
    assert 4 <= gov.probes <= 4 + 60 / HI
    assert counts.count(1) == (_runtime.PROBE_WARMUP_UNITS + 2) * gov.probes   # two timed units a probe
    assert counts.count(1) / len(counts) < 0.01


def test_governor_skips_probes_of_fewer_threads_while_the_machine_has_room():
    """No other load on 2 cores for 2 threads: the probes of one thread are skipped
    (they could only lose), periodic and after slow units alike, so the quiet decode
    never runs a unit at one thread; with a core's worth of other load the same
    timings probe as before."""
    def cost(t, now):
        jitter = 0.02 if int(now * 10) % 7 == 0 else 0.01    # slow units now and then (vCPU stalls)
        return jitter if t == 2 else 0.018

    quiet = _runtime.Governor(load=0.0, cores=2)
    units, _ = drive(quiet, cost, 30.0)
    assert [t for _, t in units].count(1) == 0
    assert quiet.probes == 0 and quiet.skipped >= 4 and quiet.use == 2
    busy = _runtime.Governor(load=1.0, cores=2)
    units, _ = drive(busy, cost, 30.0)
    assert busy.probes >= 4 and busy.skipped == 0 and [t for _, t in units].count(1) > 0
    # room measured against the cores: 0.2 cores of other load on 2 cores leaves room for 2
    # threads (the slack), not for 3 on 3 cores with a core's worth
    assert drive_skips(load=0.2, cores=2) and not drive_skips(load=1.0, cores=3, asked=3)


def drive_skips(load, cores, asked=2):
    gov = _runtime.Governor(load=load, cores=cores)
    drive(gov, lambda t, now: 0.01 * asked / t, 10.0, asked=asked)
    return gov.probes == 0 and gov.skipped > 0


def test_governor_reads_busy_time_as_proc_stat_counts_it():
    """/proc/stat's "cpu" (all CPUs) and "cpuN" lines: user nice system idle iowait irq
    softirq steal guest guest_nice; busy is all but idle and iowait (guest time is inside
    user and nice). The governor sums the lines of the CPUs the process may run on."""
    assert _runtime.stat_busy_ticks(b"cpu  100 20 30 400 50 6 7 8 90 9\ncpu0 1 2 3") == (-1, 171)
    assert _runtime.stat_busy_ticks(b"cpu12 1 2 3 4 5 6 7 8 9 10\n") == (12, 27)
    assert _runtime.stat_busy_ticks(b"cpu  1 2 3 4 5\n") == (-1, 6)     # kernels before irq
    assert _runtime.stat_busy_ticks(b"intr 1 2 3") is None
    assert _runtime.stat_busy_ticks(b"cpu  1 2\n") is None
    assert _runtime.stat_busy_ticks(b"cpux 1 2 3 4 5\n") is None
    if os.path.exists("/proc/stat"):
        with open("/proc/stat", "rb") as f:
            lines = [line for line in f if line.startswith(b"cpu")]
        for line in lines[:3]:
            name, *fields = line.split()
            fields = [int(v) for v in fields]
            cpu = -1 if name == b"cpu" else int(name[3:])
            assert _runtime.stat_busy_ticks(line) == (cpu, sum(fields[:8]) - fields[3] - fields[4])


def test_governor_spaces_the_probes_of_long_units():
    """Units of 0.15 s (a 7B model's decode steps), two threads 1.5x as fast as one: after
    the first probe loses, periodic probes wait for their own units' time / PROBE_SHARE
    of work, so probing costs the run under 2% of its time, where the interval alone
    (share 0) would cost it ~3%."""
    def slow_seconds(share):
        gov = _runtime.Governor(probe_share=share)
        units, _ = drive(gov, lambda t, now: 0.15 if t == 2 else 0.225, 120.0)
        assert gov.use == 2 and gov.switches == 0
        probe_units = (_runtime.PROBE_WARMUP_UNITS + 2)
        gap = probe_units * 0.15 / _runtime.PROBE_SHARE
        return sum(0.225 - 0.15 for _, t in units if t == 1) / 120.0, gov.probes, gap

    spent, probes, gap = slow_seconds(_runtime.PROBE_SHARE)
    assert probes <= 2 + 120 / gap and spent < _runtime.PROBE_SHARE
    spent_without, probes_without, _ = slow_seconds(0.0)
    assert probes_without > 2 * probes and spent_without > 2 * spent and spent_without > 0.025


def test_governor_drops_a_thread_when_one_is_held_up_and_takes_it_back():
    """Another process takes a core at t=5 s (two threads now 3x slower than one):
    two slow units in a row probe at once and the governor drops to one thread; when
    the core is free again (t=20 s) a periodic probe finds it within HI seconds."""
    gov = _runtime.Governor()

    def cost(t, now):
        busy = 5.0 <= now < 20.0
        return (0.03 if busy else 0.01) if t == 2 else 0.018

    units, now = drive(gov, cost, 25.0 + HI)
    two_busy = [start for start, t in units if t == 2 and 5.0 <= start < 20.0]
    assert gov.switches == 2 and gov.use == 2
    assert len([s for s in two_busy if s < 6.0]) <= 8     # noticed within a few units
    # then only probes of two threads while busy: a small share of the time
    assert sum(cost(2, 10.0) for s in two_busy if s >= 6.0) < 0.05 * 14.0
    back = min(s for s, t in units if t == 2 and s >= 20.0 and
               all(t2 == 2 for s2, t2 in units if s < s2 < s + 0.5))
    assert back < 20.0 + HI + LO                          # two threads again within HI seconds


def test_governor_probes_after_slow_units_in_a_row_not_after_one():
    """Before the first periodic probe (a second of work): one slow unit (an
    interrupt) leaves the count alone; two in a row mean another process took a
    core, and it probes."""
    gov = _runtime.Governor()

    def unit(seconds):
        t = gov.threads(2)
        gov.report(t, seconds if t == 2 else 0.018)
        return t

    for _ in range(10):
        unit(0.01)
    unit(0.05)
    for _ in range(10):
        unit(0.01)
    assert gov.probes == 0
    unit(0.05), unit(0.05)
    assert unit(0.05) == 1 and gov.probes == 1


def test_governor_does_not_time_a_probes_first_unit():
    """The first unit with a thread more wakes a sleeping thread (slow on a virtual
    machine): a probe that would win but for that unit still wins."""
    gov = _runtime.Governor()
    drive(gov, lambda t, now: 0.01 if t == 1 else 0.05, 5.0)
    assert gov.use == 1
    last = None

    def cost(t, now):
        nonlocal last
        first = t == 2 and last != 2
        last = t
        return 0.01 if t == 1 else (0.05 if first else 0.005)

    drive(gov, cost, HI + 2 * LO)      # the next periodic probe comes within HI seconds of work
    assert gov.use == 2


def test_governor_ignores_the_unit_after_a_pause():
    """The first unit after a pause (threads asleep, caches cold) is slow whatever
    the count: it and a slow unit after it are not two slow units in a row."""
    gov = _runtime.Governor()
    for _ in range(20):
        t = gov.threads(2)
        gov.report(t, 0.01)
    for _ in range(5):                       # five short runs, each after a pause
        assert gov.threads(2) == 2
        gov.report(2, 0.05, idle=1.0)
        assert gov.threads(2) == 2
        gov.report(2, 0.05)
        for _ in range(3):
            t = gov.threads(2)
            gov.report(t, 0.01)
    assert gov.probes == 0 and gov.use == 2


def test_governor_counts_work_not_idle_time():
    """The interval between probes is seconds of work: units far apart in time (a
    prefill once a minute) are not each a probe."""
    gov = _runtime.Governor()
    counts = [t for _, t in drive(gov, lambda t, now: 0.01 if t == 2 else 0.018, 0.5)[0]]
    assert gov.probes == 0 and set(counts) == {2}


def test_governor_needs_a_clear_win_to_switch():
    """A probe only a little faster (within the margin) does not replace the count;
    one thread more must win by more than one thread fewer."""
    gov = _runtime.Governor()
    drive(gov, lambda t, now: 0.01 if t == 2 else 0.01 * (1 - _runtime.PROBE_MARGIN / 2), 30.0)
    assert gov.use == 2 and gov.switches == 0 and gov.probes > 0
    down = _runtime.Governor()
    drive(down, lambda t, now: 0.01 if t == 2 else 0.01 * (1 - 1.5 * _runtime.PROBE_MARGIN), 30.0)
    assert down.use == 1 and down.switches == 1
    # at one thread, a probe of two that wins by the down-margin alone stays a probe
    drive(down, lambda t, now: 0.01 if t == 1 else 0.01 * (1 - 1.5 * _runtime.PROBE_MARGIN), 30.0)
    assert down.use == 1 and down.switches == 1 and down.probes > 2
    drive(down, lambda t, now: 0.01 if t == 1 else 0.005, 30.0)
    assert down.use == 2 and down.switches == 2


def test_governor_needs_two_wins_in_a_row_to_switch():
    """A probe that wins once, by a moment's slowdown of the count in use (on a virtual
    machine, a vCPU the hypervisor holds back stalls the team), is run again at once; the
    count changes only if it wins again."""
    gov = _runtime.Governor()
    # one thread fewer wins only while the first probe runs
    drive(gov, lambda t, now: 0.01 if t == 2 else (0.005 if gov.probes == 1 else 0.018), 30.0)
    assert gov.use == 2 and gov.switches == 0 and gov.probes >= 2
    twice = _runtime.Governor()
    # ... and while the first two run: then it switches, right after the second
    units, _ = drive(twice, lambda t, now: 0.01 if t == 2 else (0.005 if twice.probes <= 2 else 0.018), 1.2)
    assert twice.switches == 1 and twice.probes == 2
    first_probe = next(s for s, t in units if t == 1)
    switched = next(s for s, t in units if t == 1 and all(t2 == 1 for s2, t2 in units if s2 >= s))
    assert switched - first_probe < 0.1


def test_governor_one_thread_and_a_new_count():
    gov = _runtime.Governor()
    assert gov.threads(1) == 1 and gov.probes == 0          # one thread asked: nothing to choose
    drive(gov, lambda t, now: 0.01 if t == 1 else 0.05, 10.0)
    assert gov.use == 1
    assert gov.threads(3) == 3                              # another count asked for: start from it
    drive(gov, lambda t, now: {1: 0.05, 2: 0.02, 3: 0.01}[t], 30.0, asked=3)
    assert gov.use == 3


def test_governor_rows_change_is_not_a_slowdown():
    """Prefill blocks of another length cost another time per row: a new length
    starts the moving average again instead of looking like a slowdown that calls
    for a probe."""
    gov = _runtime.Governor()
    drive(gov, lambda t, now: 0.256 if t == 2 else 0.46, 0.5, rows=256)
    probes = gov.probes
    drive(gov, lambda t, now: 0.08 if t == 2 else 0.144, 0.4, rows=16)   # 5x the cost per row
    assert gov.probes == probes and gov.use == 2


# -------------------------------------------------- the same logits, any count
@pytest.fixture(scope="module")
def six_layers(write_tiny):
    return write_tiny("six", seed=7, num_hidden_layers=6)[0]


@pytest.fixture
def probe_always():
    """Probe whenever enough units have run, so that short runs switch counts back and forth
    (as on a busy machine: a quiet one would skip the probes of fewer threads)."""
    previous = _forward.set_probe_interval(0.0, 0.0, 0.0)
    previous_check = _forward.set_load_check(False)
    try:
        yield
    finally:
        _forward.set_probe_interval(*previous)
        _forward.set_load_check(previous_check)


@pytest.mark.parametrize("wait", ["sleep", "spin"])
@pytest.mark.parametrize("activations", ["float", "int8"])
def test_governed_threads_give_the_logits_of_one_thread(six_layers, probe_always, wait, activations):
    """With the governor probing all the time, decode steps (the team at two threads)
    and prefill blocks run at one or two threads in turn: the logits are those of one
    thread and of a fixed two, bit for bit; with either waiting policy."""
    previous = _forward.thread_policy()
    _forward.set_thread_policy(True, wait == "spin")
    try:
        one = qinfer.Engine(six_layers, threads=1, quantize=4, group_size=32, activations=activations)
        two = qinfer.Engine(six_layers, threads=2, quantize=4, group_size=32, activations=activations)

        def run(engine, threads):
            engine.reset()
            prefills = [engine.logits(SEQ[:8], threads=threads) for _ in range(4)]
            engine.reset()
            engine.prefill(SEQ[:2], threads=threads)
            steps = [engine.decode_step(t, threads=threads) for t in SEQ[2:]]
            return np.concatenate([np.concatenate(prefills), np.stack(steps)])

        single = run(one, 1)
        governed = run(two, 2)
        g = two.model.transformer.thread_governors()
        assert g["decode"]["asked"] == 2 and g["decode"]["probes"] > 0
        assert g["prefill"]["asked"] == 2 and g["prefill"]["probes"] > 0
        with kernels.use_adaptive_threads(False):
            fixed = run(two, 2)
        assert np.array_equal(governed, single) and np.array_equal(fixed, single)
    finally:
        _forward.set_thread_policy(*previous)


def test_batched_steps_have_a_governor_of_their_own(six_layers, probe_always):
    """A server's batched decode steps (Model.forward_rows) are governed whole, by the
    "rows" governor, not layer by layer by the prefill's: with it probing all the time
    they still give the logits of one thread, bit for bit."""
    eng = qinfer.Engine(six_layers, threads=2, quantize=4, group_size=32)
    model = eng.model

    def run(threads):
        cache = model.new_cache(32, seqs=3)
        for seq in range(3):
            model.forward(SEQ[seq:seq + 4], 0, cache=cache, seq=seq, threads=threads)
        prefill = cache.transformer.thread_governors()["prefill"]["work"]
        steps = np.stack([model.forward_rows(SEQ[4 + step:7 + step], [0, 1, 2], [4 + step] * 3, cache,
                                             threads=threads) for step in range(12)])
        g = cache.transformer.thread_governors()
        return steps, g, g["prefill"]["work"] - prefill

    single, _, _ = run(1)
    governed, g, prefill_work = run(2)
    assert np.array_equal(governed, single)
    assert g["rows"]["asked"] == 2 and g["rows"]["probes"] > 0 and g["rows"]["work"] > 0
    assert prefill_work == 0          # the steps were not the prefill governor's


def test_fixed_count_leaves_the_governors_alone(six_layers):
    eng = qinfer.Engine(six_layers, threads=2, quantize=4, group_size=32)
    with kernels.use_adaptive_threads(False):
        assert not kernels.adaptive_threads()
        eng.prefill(SEQ[:8])
        eng.decode_step(SEQ[8])
    assert kernels.adaptive_threads()
    g = eng.model.transformer.thread_governors()
    assert g["decode"]["asked"] == 0 and g["prefill"]["asked"] == 0
    eng.decode_step(SEQ[9], threads=1)          # one thread asked: nothing to govern
    assert eng.model.transformer.thread_governors()["decode"]["asked"] == 0
    eng.decode_step(SEQ[10])
    assert eng.model.transformer.thread_governors()["decode"]["asked"] == 2


# ------------------------------------------------------ switches and libgomp
def run_python(code, **env):
    """Run code in a fresh interpreter (libgomp reads its environment once, when it
    loads) with the OpenMP and qinfer wait settings of this process removed."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "QINFER_WAIT", "QINFER_ADAPT_THREADS")}
    base.update(env)
    return subprocess.run([sys.executable, "-c", code], env=base, capture_output=True, text=True, check=True)


REPORT = """
import os, qinfer
from qinfer import kernels, _runtime
print(kernels.adaptive_threads(), kernels.wait_policy()["team"], "|", kernels.wait_policy()["openmp"], "|",
      os.environ.get("OMP_WAIT_POLICY"), os.environ.get("GOMP_SPINCOUNT"), flush=True)
_runtime.display_omp_env()
"""


def spincount(stderr):
    """GOMP_SPINCOUNT as libgomp's omp_display_env printed it, or None."""
    for line in stderr.splitlines():
        if line.strip().startswith("GOMP_SPINCOUNT"):
            return line.split("=", 1)[1].strip().strip("'")
    return None


def test_defaults_bounded_waits_and_adaptive_threads():
    r = run_python(REPORT)
    assert r.stdout.split() == ["True", "sleep", "|", "GOMP_SPINCOUNT=10000", "(qinfer)", "|", "None", "None"]
    if spincount(r.stderr) is not None:         # libgomp >= 11 prints its settings
        assert spincount(r.stderr) == "10000"   # what libgomp read; not left in os.environ


def test_qinfer_wait_spin_restores_the_old_waits():
    r = run_python(REPORT, QINFER_WAIT="spin")
    assert r.stdout.split()[:4] == ["True", "spin", "|", "libgomp's"]
    if spincount(r.stderr) is not None:
        assert spincount(r.stderr) == "300000"   # libgomp's own default


def test_qinfer_adapt_threads_0_fixes_the_count():
    assert run_python(REPORT, QINFER_ADAPT_THREADS="0").stdout.split()[:2] == ["False", "sleep"]


def test_a_bad_qinfer_wait_is_named_and_ignored():
    r = run_python(REPORT, QINFER_WAIT="sometimes")
    assert r.stdout.split()[:2] == ["True", "sleep"]
    assert "QINFER_WAIT ignored" in r.stderr


@pytest.mark.parametrize("name, value, effective, team", [("OMP_WAIT_POLICY", "passive", "0", "sleep"),
                                                          ("OMP_WAIT_POLICY", "active", None, "spin"),
                                                          ("GOMP_SPINCOUNT", "12345", "12345", "sleep")])
def test_a_users_openmp_wait_setting_is_respected(name, value, effective, team):
    """qinfer sets no spin count when the user chose a wait policy or spin count:
    libgomp runs the user's, the environment is as the user left it, and
    kernels.wait_policy() names it; OMP_WAIT_POLICY=active makes the decode team's
    barrier spin too."""
    r = run_python(REPORT, **{name: value})
    out = r.stdout.split("|")
    assert out[0].split() == ["True", team]
    assert out[1].strip() == f"{name}={value} (user)"
    env = out[2].split()
    assert env == ([value, "None"] if name == "OMP_WAIT_POLICY" else ["None", value])
    if effective is not None and spincount(r.stderr) is not None:
        assert spincount(r.stderr) == effective
    assert spincount(r.stderr) != "10000"


def test_set_adaptive_threads_in_process():
    before = kernels.adaptive_threads()
    kernels.set_adaptive_threads(False)
    try:
        assert not kernels.adaptive_threads()
        with kernels.use_adaptive_threads(True):
            assert kernels.adaptive_threads()
        assert not kernels.adaptive_threads()
    finally:
        kernels.set_adaptive_threads(before)
    assert kernels.wait_policy()["team"] in kernels.WAIT_POLICIES
    with pytest.raises(UnsupportedError):
        kernels.set_num_threads(0)      # thread counts are still checked as before


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_tile_claims_cover_every_tile_once_in_any_order(threads):
    """team_claim (pyx/team.h): however the threads of a batched step's kernel call
    interleave their claims, every tile is claimed exactly once, and a thread's first
    claim is the front of its own share."""
    from qinfer import _runtime
    rng = np.random.default_rng(threads)
    for count in (1, 2, 5, 16, 36, 192, 3072):
        for _ in range(20):
            weights = rng.random(threads) + 0.05          # some threads claim far more often
            order = list(rng.choice(threads, size=4 * count + 4 * threads, p=weights / weights.sum()))
            order += [t for t in range(threads) for _ in range(count + 1)]   # then everyone until dry
            claims = _runtime.claim_order(count, threads, order)
            got = sorted((first, last) for _, first, last in claims if first >= 0)
            assert all(first < last for first, last in got)
            flat = [tile for first, last in got for tile in range(first, last)]
            assert flat == list(range(count)), f"{count} tiles, {threads} threads"
            # the first claim of all is its thread's own share's front (the even split's,
            # up to a tile of rounding), a few tiles, not the share whole
            first_thread, first_tile, first_end = claims[0]
            assert abs(first_tile - count * first_thread // threads) <= 1
            assert first_end - first_tile <= max(5, -(-count // threads)) if threads > 1 else first_end == count
    with pytest.raises(ValueError):
        _runtime.claim_order(4, 2, [2])
