"""Structure-aware fuzzing of the model readers, tokenizers and chat templates (issue 41).

Not part of the default test run. From small seeds built here (a tiny GGUF, a
tiny Hugging Face directory, a tiny GPTQ checkpoint, chat templates) it makes
malformed cases by mutation: truncating files, flipping bytes, and replacing
metadata / config values with wrong types, huge or non-finite values. Each
case runs through `python -m qinfer generate` under a time limit (subprocess
timeout) and an address-space limit (RLIMIT_AS), and is classified:

    ok        exit 1 with exactly one `qinfer: error:` line on stderr
    accepted  exit 0: the mutation loaded (fine for benign mutations such as a
              flipped weight byte, suspicious for a wrong-typed field)
    BAD       a traceback, a timeout, a signal, or any other exit / stderr

    python benchmarks/fuzz_readers.py --cases 200 --seed 1 --timeout 20 --mem-mb 4096

Exit status 1 when any case is BAD; each BAD case is kept under --keep DIR.
"""
import argparse
import json
import os
import random
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

WRONG_VALUES = [None, True, -1, 0, 2 ** 31, 2 ** 63, 1e300, -1e300, 0.5, "x", "", [], [1], {"a": 1},
                [[[[]]]], "1e9", float("nan"), float("inf")]
EVIL_TEMPLATES = [
    "{{ 'a' * 10**9 }}", "{{ [0] * 10**9 }}", "{{ 2 ** 100000000 }}", "{{ '%0999999999d' % 1 }}",
    "{{ '{:>999999999}'.format(1) }}", "{{ 'a'.center(10**9) }}", "{{ 'a' | center(10**9) }}",
    "{{ 'a' | indent(10**9) }}", "{% for i in range(10**5) %}{% for j in range(10**5) %}{% endfor %}{% endfor %}",
    "{{ 1/0 }}", "{{ 1 + 'a' }}", "{% include 'x' %}", "{% extends 'x' %}", "{% import 'x' as y %}",
    "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "{{ 'abc' | truncate(-5) }}", "{{ 'a b' | wordwrap(0) }}",
    "{{ '\\ud800' }}", "{% for %}", "{{ messages[99] }}", "{{ messages.__class__ }}", "{{ ().__class__.__base__ }}",
    "{{ raise_exception('no') }}", "{% set ns = namespace(s='a') %}{% for i in range(40) %}"
    "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}",
]


# ------------------------------------------------------------------ seeds
def seed_gguf(directory, rng, **override):
    from gguf import GGUFValueType as VT
    from test_readers import build_gguf, tiny_kvs, tiny_tensors
    # tiny_kvs has no unknown token, which the llama tokenizer refuses before anything else is read
    override = {"tokenizer.ggml.unknown_token_id": (VT.UINT32, 0), **override}
    data, marks = build_gguf(tiny_kvs(**override), tiny_tensors(seed=rng.randrange(100)))
    path = directory / "model.gguf"
    path.write_bytes(data)
    return path, marks


def seed_hf(directory, rng, chat_template=None):
    import llama_reference as ref
    ref.write_tiny_llama(directory, seed=rng.randrange(100),
                         chat_template=chat_template or "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    return directory


def seed_gptq(directory, rng):
    from test_quant import write_autogptq
    write_autogptq(directory, rng.choice([3, 4]), 32, rng.random() < 0.5, rng.random() < 0.5,
                   rng.choice(["gptq", "gptq_v2"]), seed=rng.randrange(100))
    return directory


# ------------------------------------------------------------------ mutations
def flip_bytes(path, rng, start=0):
    data = bytearray(path.read_bytes())
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(start, len(data))
        data[i] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return f"flip bytes of {path.name}"


def truncate(path, rng):
    data = path.read_bytes()
    n = rng.randrange(len(data))
    path.write_bytes(data[:n])
    return f"truncate {path.name} to {n} bytes"


def gguf_wrong_value(rng):
    from gguf import GGUFValueType as VT
    key = rng.choice(["llama.context_length", "llama.block_count", "llama.embedding_length",
                      "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
                      "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size", "tokenizer.ggml.model",
                      "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.scores",
                      "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
                      "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                      "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"])
    value = rng.choice([
        (VT.UINT64, rng.choice([0, 2 ** 31, 2 ** 40, 2 ** 64 - 1])), (VT.INT32, -1),
        (VT.FLOAT64, rng.choice([1e300, float("nan"), float("inf"), -0.0])),
        (VT.FLOAT32, float("inf")), (VT.STRING, rng.choice(["", "llama", "gpt2", "\x00"])), (VT.BOOL, True),
        (VT.ARRAY, (VT.STRING, ["a", "b"])), (VT.ARRAY, (VT.FLOAT64, [1e300] * 64)),
        (VT.ARRAY, (VT.FLOAT32, [float("nan")] * 64)), (VT.ARRAY, (VT.INT32, [7] * 64)),
        (VT.ARRAY, (VT.UINT8, [])), (VT.ARRAY, (VT.STRING, [EVIL_TEMPLATES[0]])),
    ])
    if key == "tokenizer.chat_template" and rng.random() < 0.7:
        value = (VT.STRING, rng.choice(EVIL_TEMPLATES))
    return key, value


def _walk_set(obj, rng, value):
    """Replace one random leaf (or add a key) of a JSON object."""
    keys = list(obj)
    key = rng.choice(keys) if keys else "x"
    if isinstance(obj.get(key), dict) and obj[key] and rng.random() < 0.6:
        return f"{key}." + _walk_set(obj[key], rng, value)
    obj[key] = value
    return f"{key} = {json.dumps(value)[:60]}"


def mutate_json(path, rng, keys=None):
    obj = json.loads(path.read_text())
    value = rng.choice(WRONG_VALUES)
    if keys and rng.random() < 0.7:
        key = rng.choice(keys)
        target = obj
        for part in key.split(".")[:-1]:
            target = target.setdefault(part, {})
        target[key.split(".")[-1]] = value
        what = f"{key} = {json.dumps(value)[:60]}"
    else:
        what = _walk_set(obj, rng, value)
    path.write_text(json.dumps(obj))       # NaN/Infinity written as JSON extensions on purpose
    return f"{path.name}: {what}"


HF_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
           "rope_scaling", "tie_word_embeddings", "bos_token_id", "eos_token_id", "torch_dtype"]
GPTQ_KEYS = [f"quantization_config.{k}" for k in ("bits", "group_size", "desc_act", "sym", "checkpoint_format",
                                                    "dynamic", "quant_method", "format", "pack_dtype")]
TOKCFG_KEYS = ["added_tokens_decoder", "bos_token", "eos_token", "add_bos_token", "chat_template",
               "additional_special_tokens"]


def make_case(directory, rng):
    """Build one malformed case in `directory`: -> (model path, description, extra CLI args)."""
    kind = rng.choice(["gguf_bytes", "gguf_truncate", "gguf_value", "hf_config", "hf_tokcfg", "hf_st",
                       "hf_template", "gptq_config", "tok_json"])
    args = []
    if kind.startswith("gguf"):
        if kind == "gguf_value":
            key, value = gguf_wrong_value(rng)
            path, _ = seed_gguf(directory, rng, **{key: value})
            what = f"GGUF {key} = {value[0].name} {str(value[1])[:60]}"
            if key == "tokenizer.chat_template":
                args = ["--chat"]
        else:
            path, marks = seed_gguf(directory, rng)
            what = (flip_bytes(path, rng, 0 if rng.random() < 0.3 else marks["data"] - 1)
                    if kind == "gguf_bytes" else truncate(path, rng))
        return path, what, args
    if kind == "gptq_config":
        d = seed_gptq(directory / "m", rng)
        return d, mutate_json(d / "config.json", rng, GPTQ_KEYS), args
    d = seed_hf(directory / "m", rng)
    if kind == "hf_config":
        what = mutate_json(d / "config.json", rng, HF_KEYS)
    elif kind == "hf_tokcfg":
        what = mutate_json(d / "tokenizer_config.json", rng, TOKCFG_KEYS)
    elif kind == "hf_st":
        st = d / "model.safetensors"
        what = truncate(st, rng) if rng.random() < 0.5 else flip_bytes(st, rng, 0)
    elif kind == "tok_json":
        depth = rng.choice([10, 1000, 100000])
        (d / "tokenizer.json").write_text('{"model": ' + "[" * depth + "]" * depth + "}")
        what = f"tokenizer.json nested {depth} deep"
    else:
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        cfg["chat_template"] = "".join(rng.sample(EVIL_TEMPLATES, rng.randint(1, 2)))
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
        what, args = f"chat template {cfg['chat_template'][:80]!r}", ["--chat"]
    return d, what, args


# ------------------------------------------------------------------ running
def run_case(model, args, timeout, mem_mb):
    def limits():
        limit = mem_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    cmd = [sys.executable, "-m", "qinfer", "generate", "--model", str(model), "--prompt", "hi",
           "--max-new-tokens", "2", "--threads", "1", *args]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=limits,
                              cwd=REPO, errors="replace")
    except subprocess.TimeoutExpired:
        return "BAD", f"timeout after {timeout} s", time.monotonic() - start
    seconds = time.monotonic() - start
    lines = proc.stderr.strip().splitlines()
    errors = [l for l in lines if not l.startswith("qinfer: warning:")]
    if proc.returncode < 0:
        return "BAD", f"signal {-proc.returncode}", seconds
    if "Traceback" in proc.stderr:
        return "BAD", "traceback: " + (lines[-1] if lines else ""), seconds
    if proc.returncode == 0:
        return "accepted", "", seconds
    if proc.returncode == 1 and len(errors) == 1 and errors[0].startswith("qinfer: error:"):
        return "ok", errors[0], seconds
    return "BAD", f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}", seconds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=50, help="number of malformed cases (default 50)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per case (default 30)")
    ap.add_argument("--mem-mb", type=int, default=4096, help="RLIMIT_AS per case in MiB (default 4096)")
    ap.add_argument("--budget", type=float, default=1800.0, help="stop after this many seconds in all")
    ap.add_argument("--keep", metavar="DIR", default=None, help="copy BAD cases here")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every case, not only BAD ones")
    a = ap.parse_args(argv)

    rng = random.Random(a.seed)
    counts = {"ok": 0, "accepted": 0, "BAD": 0}
    start = time.monotonic()
    for i in range(a.cases):
        if time.monotonic() - start > a.budget:
            print(f"time budget of {a.budget:g} s reached after {i} cases")
            break
        with tempfile.TemporaryDirectory(prefix="qinfer-fuzz-") as tmp:
            try:
                model, what, args = make_case(Path(tmp), rng)
            except Exception as e:          # a mutation the seed writers themselves refuse
                print(f"[{i}] skipped (could not build: {type(e).__name__}: {e})"[:200])
                continue
            status, detail, seconds = run_case(model, args, a.timeout, a.mem_mb)
            counts[status] += 1
            if status == "BAD" or a.verbose:
                print(f"[{i}] {status:8s} {seconds:5.1f}s  {what}" + (f"\n      {detail}" if detail else ""))
            if status == "BAD" and a.keep:
                dest = Path(a.keep) / f"case-{a.seed}-{i}"
                shutil.copytree(tmp, dest, dirs_exist_ok=True)
                (dest / "CASE.txt").write_text(f"{what}\nargs: {args}\n{detail}\n")
    print(f"{sum(counts.values())} cases: {counts['ok']} clean errors, {counts['accepted']} accepted, "
          f"{counts['BAD']} bad")
    return 1 if counts["BAD"] else 0


if __name__ == "__main__":
    sys.exit(main())
