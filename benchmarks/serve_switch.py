"""One server under load, one setting switched back and forth: which value runs the batched steps faster.

    python benchmarks/serve_switch.py --switch claims|stream-interval [--values A,B] [--streams 8]
                                      [--requests 16] [--period 0.5] [-t 2] [--model PATH]

On a shared machine whose speed drifts by 10-20% over minutes, two servers run one
after the other (benchmarks/serve.py's rows) measure the drift as much as the setting.
Here one server (`qinfer.server.build` with int8 activations, uvicorn on 127.0.0.1 in
this process) serves --streams clients (a child process running serve.py's streaming
client, each client sending --requests greedy completions of 128 tokens, one after
another, `ignore_eos`), and the setting switches every --period seconds between two
values:

    claims            a batched step's threads claim their tiles (pyx/team.h, team_claim),
                      or keep fixed shares (_forward.set_tile_claims)
    stream-interval   the server's --stream-interval in milliseconds (--values, default 0,20)

Every batched decode step of --streams rows (Model.forward_rows, timed in the
scheduler's thread) counts for the value in force when it started. Printed per value:
the steps, their median and mean milliseconds, and the event loop's CPU time a token
decoded (its thread's CPU time while the value was in force over the rows of the steps
that started then); then the ratio of the two medians.
"""
import argparse
import asyncio
import concurrent.futures
import os
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import serve  # noqa: E402  (the streaming client and the prompts)

MAX_TOKENS = 128


def client(port, streams, requests):
    """The load (child process): `streams` threads, each `requests` streamed completions."""
    url = f"http://127.0.0.1:{port}/v1/completions"

    def one(i):
        body = dict(model="bench", prompt=serve.PROMPTS[i % len(serve.PROMPTS)], max_tokens=MAX_TOKENS,
                    temperature=0, ignore_eos=True)
        return serve.stream_request(url, body)["tokens"]
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        print(sum(pool.map(one, range(streams * requests))), flush=True)


def switcher(args, app):
    """(the two values, a function that puts value i of them in force)."""
    if args.switch == "claims":
        from qinfer import _forward
        return ("fixed shares", "claims"), lambda i: _forward.set_tile_claims(bool(i))
    values = [float(v) for v in (args.values or "0,20").split(",")]
    if len(values) != 2 or min(values) < 0:
        raise SystemExit("--values: two intervals in milliseconds, as 0,20")

    def put(i):
        app.state.server.relay.interval = values[i] / 1000
    return tuple(f"{v:g} ms" for v in values), put


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--switch", choices=("claims", "stream-interval"))
    p.add_argument("--values", default=None, help="stream-interval: the two intervals, ms (default 0,20)")
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--requests", type=int, default=16, help="completions each client sends")
    p.add_argument("--period", type=float, default=0.5, help="seconds between switches")
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--model", default=None)
    p.add_argument("--client", nargs=3, type=int, metavar=("PORT", "STREAMS", "REQUESTS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.client:
        return client(*args.client)
    if not args.switch:
        p.error("--switch is required")

    import uvicorn

    import qinfer
    from qinfer import server
    engine = qinfer.Engine(args.model, threads=args.threads, ctx=1, activations="int8")
    app, scheduler = server.build(engine, parallel=max(args.streams, 1), ctx=1024, model_name="bench")
    names, put = switcher(args, app)

    steps = []                          # (start, seconds, rows) of each batched step
    forward_rows = scheduler.model.forward_rows

    def timed(tokens, *rest, **kw):
        start = time.perf_counter()
        out = forward_rows(tokens, *rest, **kw)
        steps.append((start, time.perf_counter() - start, len(tokens)))
        return out
    scheduler.model.forward_rows = timed

    port = serve.free_port()
    http = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    loops = []
    startup = http.startup

    async def remember_loop(*a, **kw):
        loops.append(asyncio.get_running_loop())
        return await startup(*a, **kw)
    http.startup = remember_loop
    switches, result = [], {}

    def on_loop(fn):                    # fn() run on the event loop's thread
        done = concurrent.futures.Future()
        loops[0].call_soon_threadsafe(lambda: done.set_result(fn()))
        return done.result()

    def drive():
        try:
            while not http.started:
                time.sleep(0.05)
            load = [sys.executable, os.path.abspath(__file__), "--client", str(port)]
            subprocess.run(load + [str(args.streams), "1"], check=True, stdout=subprocess.DEVNULL)   # warm-up
            proc = subprocess.Popen(load + [str(args.streams), str(args.requests)], stdout=subprocess.PIPE, text=True)
            i = 0
            while proc.poll() is None:
                put(i % 2)
                switches.append((time.perf_counter(), i % 2, on_loop(time.thread_time)))
                time.sleep(args.period)
                i += 1
            switches.append((time.perf_counter(), None, on_loop(time.thread_time)))
            result["tokens"] = int(proc.stdout.read().strip() or 0)
        finally:
            http.should_exit = True
    threading.Thread(target=drive, daemon=True).start()
    try:
        http.run()
    finally:
        scheduler.close()
    if not result.get("tokens"):
        raise SystemExit("the load did not run")

    by_value, rows, cpu = ([], []), [0, 0], [0.0, 0.0]
    for (start, value, cpu_then), (end, _, cpu_next) in zip(switches, switches[1:]):
        cpu[value] += cpu_next - cpu_then
        for step_start, seconds, n in steps:
            if start <= step_start < end:
                rows[value] += n
                if n == args.streams:
                    by_value[value].append(seconds * 1e3)
    print(f"qinfer serve, int8 activations, {args.threads} threads, {args.streams} streams x {args.requests} "
          f"completions of {MAX_TOKENS} tokens ({result['tokens']} decoded); {args.switch} switched every "
          f"{args.period:g} s")
    for name, ms, n, seconds in zip(names, by_value, rows, cpu):
        if ms:
            print(f"  {name:>14}: {len(ms):5d} steps of {args.streams} rows, median {statistics.median(ms):.2f} ms, "
                  f"mean {statistics.mean(ms):.2f} ms; event loop {seconds / n * 1e6:.1f} us of CPU a token")
    if all(by_value):
        print(f"  median step, {names[1]} / {names[0]}: "
              f"{statistics.median(by_value[1]) / statistics.median(by_value[0]):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
