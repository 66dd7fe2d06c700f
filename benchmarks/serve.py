"""`qinfer serve` under load: throughput and latency at 1, 4, 8 and 16 concurrent streams.

    python benchmarks/serve.py [--model PATH] [-t 2] [--parallel 16] [--streams 1,4,8,16]
                               [--max-tokens 128] [--rounds 2] [--seconds 8] [--activations float|int8]
                               [--stream-interval MS] [--pairs N] [--skip-llamacpp] [--json-out FILE]

Starts `python -m qinfer serve` (a child process, --parallel slots of --ctx
tokens, --activations as given: int8 by default, as the server's own default) and, for each concurrency N, N client threads
each send --rounds streamed completion requests (greedy, a different prompt
each, max_tokens tokens each: `ignore_eos`, which llama-server takes too, so
that no stream ends early at end of sequence; two of the eight prompts end at
once without it, and their clients then measure requests, not decoding), one
after another until --seconds have passed (and at least --rounds each). Printed per N: aggregate decode throughput, over the whole run
(completion tokens of all requests / wall time: its tail has fewer streams
than N, as clients finish their last requests) and while all N clients were
busy (tokens received in the first --seconds / --seconds), per-request time
to first token and total latency (p50/p95), and the ratio of the all-busy
aggregate to the single stream's. Then:

* a single stream through the server next to `qinfer generate` on the same
  prompt and activations (its "decode: X tokens/s" line), both decoding
  max_tokens tokens; the benchmark's clients run on the same machine as the
  server, and take CPU time from it;
* a chat's two turns: the time to first token of each, and how many prompt
  tokens the second turn found in the cache (usage.prompt_tokens_details).

With --pairs N, N more runs of 1 stream and of 8 streams, back to back, and
the median of the N ratios: on a shared machine whose speed drifts by 5-10%
over minutes the rows above, measured minutes apart, carry that drift into
their ratio; a pair's two runs are seconds apart.

Then the same load (streams, chat turns) against llama.cpp's `llama-server`
(built from the llama-cpp-python sdist by benchmarks/llamacpp.py) on the same
GGUF file, with the same threads, --parallel slots of --ctx tokens each
(-np, -c = parallel x ctx) and greedy sampling, and the two side by side.
The servers run one after the other, never together. A llama-server
stream without usage counts counts its text chunks (one token each).

Targets (issue 37): 8 streams >= 4x one stream (all busy); one stream
through the server within 10% of `qinfer generate`.
"""
import argparse
import concurrent.futures
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

PROMPTS = ["Write a long story about a dragon who learns to paint.", "Explain how a steam engine works, step by step.",
           "List the countries of Europe and describe each in a sentence.", "Describe a walk through a forest in autumn.",
           "Write a letter to a friend about your summer holidays.", "Explain the rules of chess in detail.",
           "Tell the history of the printing press.", "Describe how to bake bread at home, in many steps."]


def log(message):
    print(f"[serve] {message}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port):
    cmd = [sys.executable, "-m", "qinfer", "serve", "--port", str(port), "--parallel", str(args.parallel),
           "--ctx", str(args.ctx), "--threads", str(args.threads), "--model-name", "bench",
           "--activations", args.activations]
    if args.stream_interval is not None:
        cmd += ["--stream-interval", str(args.stream_interval)]
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    return healthy(proc, port, "the server")


def healthy(proc, port, name):
    """`proc` once its /health answers 200 (it exits or takes over 300 s: SystemExit naming `name`)."""
    import httpx
    deadline = time.time() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise SystemExit(f"{name} did not start in 300 s")
        time.sleep(0.2)


USAGE = re.compile(rb'"usage":\s*\{')                      # a chunk with the usage counts
TEXT = re.compile(rb'"(?:text|content)":\s*"(?:[^"\\]|\\.)')   # a chunk with some text


def stream_request(url, body):
    """(seconds to the first text, total seconds, completion tokens) of one streamed request.

    The client is http.client, reading whatever bytes have arrived (read1) and
    scanning each Server-Sent Event in them (only the chunk with the usage
    counts is parsed as JSON): it shares the machine's cores with the server it
    measures, and httpx with a json.loads of every chunk took ~0.6 ms of CPU a
    token (2-core KVM), as much as a decode step's share of a core; reading
    line by line, ~80 us. A chunk counts as text when its "text" (completions)
    or "content" (chat) is a non-empty string."""
    import http.client
    import urllib.parse
    start = time.perf_counter()
    first = None
    tokens = chunks = cached = 0
    times = []          # perf_counter() of every text chunk
    body = json.dumps(dict(body, stream=True, stream_options={"include_usage": True}))
    where = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=600)
    try:
        conn.request("POST", where.path, body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}: {r.read()[:500]!r}")
        pending = b""
        while True:
            data = r.read1(65536)
            if not data:
                break
            now = time.perf_counter()
            events = (pending + data).split(b"\n\n")
            pending = events.pop()          # an event not whole yet
            for event in events:
                if not event.startswith(b"data: ") or event.startswith(b"data: [DONE]"):
                    continue
                if USAGE.search(event):
                    usage = json.loads(event[6:])["usage"]
                    tokens = usage["completion_tokens"]
                    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
                if not TEXT.search(event):
                    continue
                if first is None:
                    first = now - start
                times.append(now)
                chunks += 1
    finally:
        conn.close()
    return dict(ttft=first, seconds=time.perf_counter() - start, tokens=tokens or chunks, cached=cached,
                times=times, end=time.perf_counter())


def concurrency(url, n, args):
    """n clients, each sending request after request (at least --rounds) until --seconds
    have passed: aggregate tokens/s and per-request latencies.

    Two aggregates: over the whole run (every request's completion tokens / wall
    time, which ends with fewer than n streams as clients finish their last
    requests), and over the first --seconds, while all n clients keep a request
    in flight (text chunks, one a token, received by then / --seconds)."""
    start = time.perf_counter()
    deadline = start + args.seconds

    def client(i):
        out, r = [], 0
        while r < args.rounds or time.perf_counter() < deadline:
            prompt = PROMPTS[(i + r * n) % len(PROMPTS)] + f" (request {i}.{r})"
            out.append(stream_request(url + "/v1/completions",
                                      dict(prompt=prompt, max_tokens=args.max_tokens, temperature=0,
                                           ignore_eos=True)))
            r += 1
        return out
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        results = [r for rs in pool.map(client, range(n)) for r in rs]
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    busy_chunks = sum(t <= deadline for r in results for t in r["times"])
    q = lambda xs, p: statistics.quantiles(xs, n=20)[p // 5 - 1] if len(xs) >= 2 else xs[0]
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    lat = [r["seconds"] for r in results]
    return dict(streams=n, requests=len(results), tokens=tokens, wall=wall, tokens_per_second=tokens / wall,
                all_busy_tokens_per_second=busy_chunks / args.seconds,
                ttft_p50=statistics.median(ttft), ttft_p95=q(ttft, 95), latency_p50=statistics.median(lat),
                latency_p95=q(lat, 95))


def generate_decode_rate(args, prompt):
    """`qinfer generate`'s decode tokens/s on `prompt` (its stats line)."""
    cmd = [sys.executable, "-m", "qinfer", "generate", "--prompt", prompt, "--max-new-tokens", str(args.max_tokens),
           "--threads", str(args.threads), "--ctx", str(args.ctx), "--activations", args.activations]
    if args.model:
        cmd += ["--model", args.model]
    err = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stderr
    return float(re.search(r"decode: ([0-9.]+) tokens/s", err).group(1))


def chat_turns(url):
    system = ("You are a helpful assistant. Answer in two sentences. " * 12).strip()
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "What is a prime number?"}]
    body = dict(model="bench", messages=messages, max_tokens=24, temperature=0)
    first = stream_request(url + "/v1/chat/completions", body)
    import httpx
    reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=600).json()["choices"][0]["message"]
    messages += [reply, {"role": "user", "content": "Give an example."}]
    second = stream_request(url + "/v1/chat/completions", dict(body, messages=messages))
    return first, second


def start_llama_server(args, port, gguf):
    from llamacpp import build
    server = build()["llama-server"]
    cmd = [server, "-m", gguf, "-t", str(args.threads), "-np", str(args.parallel), "-c", str(args.ctx * args.parallel),
           "--host", "127.0.0.1", "--port", str(port), "--no-webui", "--log-disable"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return healthy(proc, port, "llama-server")


def measure(url, args, streams, n_pairs=0):
    """One server under the whole load: the concurrency rows, the paired 1- and 8-stream runs
    (--pairs), a single stream, a chat's two turns."""
    stream_request(url + "/v1/completions", dict(prompt="Warm up.", max_tokens=8, temperature=0))
    rows = []
    for n in streams:
        log(f"{n} concurrent stream(s), {args.rounds} request(s) each")
        rows.append(concurrency(url, n, args))
    pairs = []
    for i in range(n_pairs):
        log(f"pair {i + 1}/{n_pairs}: 1 stream, then 8")
        one, eight = (concurrency(url, n, args)["all_busy_tokens_per_second"] for n in (1, 8))
        pairs.append((one, eight))
    single = stream_request(url + "/v1/completions", dict(prompt=PROMPTS[0], max_tokens=args.max_tokens,
                                                           temperature=0, ignore_eos=True))
    log("chat: two turns")
    turn1, turn2 = chat_turns(url)
    decode = (single["tokens"] - 1) / (single["seconds"] - single["ttft"])
    return dict(rows=rows, pairs=pairs, single_stream=single, server_decode=decode,
                chat=dict(turn1=turn1, turn2=turn2))


def stopped(proc):
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def print_rows(title, rows):
    """The table; returns the single stream's tokens/s (all busy) or None."""
    base = rows[0]["all_busy_tokens_per_second"] if rows and rows[0]["streams"] == 1 else None
    print(title)
    print(f"{'streams':>7} {'requests':>8} {'tokens':>7} {'tok/s':>8} {'all busy':>9} {'x one':>6} {'TTFT p50':>9} "
          f"{'p95':>7} {'latency p50':>12} {'p95':>7}")
    for r in rows:
        ratio = f"{r['all_busy_tokens_per_second'] / base:6.2f}" if base else "     -"
        print(f"{r['streams']:>7} {r['requests']:>8} {r['tokens']:>7} {r['tokens_per_second']:>8.1f} "
              f"{r['all_busy_tokens_per_second']:>9.1f} {ratio} "
              f"{r['ttft_p50']:>8.3f}s {r['ttft_p95']:>6.3f}s {r['latency_p50']:>11.3f}s {r['latency_p95']:>6.3f}s")
    print("  (tok/s: all requests' tokens / wall time; all busy: tokens received in the first --seconds, while "
          "every client kept a request in flight, / those seconds; x one: its ratio to one stream's)")
    return base


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model (default: qinfer's default GGUF)")
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=16)
    parser.add_argument("--ctx", type=int, default=512, help="context tokens per slot")
    parser.add_argument("--streams", default="1,4,8,16")
    parser.add_argument("--seconds", type=float, default=8.0,
                        help="seconds each concurrency keeps all its clients busy (default 8)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--activations", choices=("float", "int8"), default="int8",
                        help="the server's and generate's activations (default int8, qinfer serve's default)")
    parser.add_argument("--stream-interval", type=int, default=None, metavar="MS",
                        help="qinfer serve's --stream-interval (default: the server's)")
    parser.add_argument("--pairs", type=int, default=0, metavar="N",
                        help="then N more runs of 1 stream and 8 streams back to back, and the median of "
                             "their ratios (the machine's speed drifts less within a pair than over a run)")
    parser.add_argument("--skip-llamacpp", action="store_true", help="no llama-server rows")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    streams = [int(s) for s in args.streams.split(",")]
    sys.path.insert(0, HERE)
    sys.path.insert(0, ROOT)

    port = free_port()
    log(f"starting qinfer serve on port {port} ({args.parallel} slots of {args.ctx} tokens, {args.threads} threads)")
    proc = start_server(args, port)
    report = dict(threads=args.threads, parallel=args.parallel, max_tokens=args.max_tokens,
                  activations=args.activations, load=os.getloadavg())
    try:
        ours = measure(f"http://127.0.0.1:{port}", args, streams, args.pairs)
    finally:
        stopped(proc)
    log("qinfer generate on the same prompt")
    generate = generate_decode_rate(args, PROMPTS[0])

    theirs = None
    gguf = args.model
    if gguf is None:
        from qinfer.engine import default_model_path
        gguf = default_model_path()
    if args.skip_llamacpp:
        pass
    elif not (gguf and gguf.endswith(".gguf") and os.path.isfile(gguf)):
        log(f"no llama-server rows: {gguf} is not a GGUF file")
    else:
        port = free_port()
        log(f"starting llama-server on port {port} with {gguf}")
        proc = start_llama_server(args, port, gguf)
        try:
            theirs = measure(f"http://127.0.0.1:{port}", args, streams)
        finally:
            stopped(proc)

    what = (f"{args.threads} threads, {args.parallel} slots, greedy completions of up to {args.max_tokens} tokens, "
            f"{args.rounds} request(s) per client")
    base = print_rows(f"qinfer serve ({args.activations} activations), {what}", ours["rows"])
    server_decode = ours["server_decode"]
    print(f"\none stream through the server: {server_decode:.1f} tokens/s decoding; qinfer generate: "
          f"{generate:.1f} tokens/s (server / generate {server_decode / generate:.2f})")
    turn1, turn2 = ours["chat"]["turn1"], ours["chat"]["turn2"]
    print(f"chat: turn 1 time to first token {turn1['ttft']:.3f} s; turn 2 {turn2['ttft']:.3f} s "
          f"({turn2['cached']} prompt tokens from the cache)")
    if theirs:
        print()
        print_rows(f"llama.cpp llama-server, same file ({os.path.basename(gguf)}), {what}", theirs["rows"])
        t1, t2 = theirs["chat"]["turn1"], theirs["chat"]["turn2"]
        print(f"one stream: {theirs['server_decode']:.1f} tokens/s decoding; chat: turn 1 time to first token "
              f"{t1['ttft']:.3f} s, turn 2 {t2['ttft']:.3f} s")
        print("\nqinfer / llama-server:")
        print(f"{'streams':>7} {'tok/s':>7} {'TTFT p50':>9} {'latency p50':>12}")
        for a, b in zip(ours["rows"], theirs["rows"]):
            print(f"{a['streams']:>7} {a['all_busy_tokens_per_second'] / b['all_busy_tokens_per_second']:>7.2f} "
                  f"{b['ttft_p50'] / a['ttft_p50']:>8.2f}x {b['latency_p50'] / a['latency_p50']:>11.2f}x")
        print("  (tok/s: qinfer's over llama-server's; TTFT and latency: llama-server's over qinfer's, "
              "so above 1 is qinfer faster)")
    if ours["pairs"]:
        ratios = [eight / one for one, eight in ours["pairs"]]
        print("\npaired runs (1 stream, then 8; all-busy tokens/s): " +
              ", ".join(f"{one:.1f} / {eight:.1f} = {r:.2f}x" for (one, eight), r in zip(ours["pairs"], ratios)) +
              f"; median {statistics.median(ratios):.2f}x")
    print("\ntargets (issue 37):")
    eight = next((r for r in ours["rows"] if r["streams"] == 8), None)
    if eight and base:
        x = eight["all_busy_tokens_per_second"] / base
        print(f"  8 streams / 1 stream: {x:.2f} {'>=' if x >= 4 else '<'} 4.00: {'met' if x >= 4 else 'missed'}")
    if ours["pairs"]:
        x = statistics.median(ratios)
        print(f"  8 streams / 1 stream, median of {len(ratios)} pairs: {x:.2f} {'>=' if x >= 4 else '<'} 4.00: "
              f"{'met' if x >= 4 else 'missed'}")
    gap = server_decode / generate
    print(f"  one stream through the server / qinfer generate: {gap:.2f} "
          f"{'>=' if gap >= 0.9 else '<'} 0.90: {'met' if gap >= 0.9 else 'missed'}")
    report.update(ours, generate_decode=generate, llamacpp=theirs)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
