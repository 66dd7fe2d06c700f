"""One configuration of a sweep, start to end: quantize -> perplexity -> decode speed.

measure(config, job) runs in the process it is called in: the driver's (a serial
sweep) or a Ray worker's (runner.py); the same code either way, so a configuration's
perplexity does not depend on where it ran. Its checkpoint is written into the cache
folder of the machine it runs on (job.cache/checkpoints/<name>) and reused there.
A row records the node it ran on: speed is that node's.
"""
import dataclasses
import json
import math
import os
import socket
import struct
import time

import numpy as np

from ..errors import QinferError
from .grid import FLOAT

DECODE_REPEATS = 3


@dataclasses.dataclass
class Job:
    """What every configuration of a run shares: model and calib (paths on this machine; calib
    None without calibrated configurations), windows (int32 [n, seqlen], the scored tokens),
    seqlen (also the calibration windows' length), nsamples and seed (calibration), threads,
    decode_tokens, prompt (decode speed's), cache (the folder for checkpoints)."""
    model: str
    calib: str
    windows: np.ndarray
    seqlen: int
    nsamples: int
    seed: int
    threads: int
    decode_tokens: int
    prompt: str
    cache: str


def checkpoint_folder(config, job):
    return os.path.join(job.cache, "checkpoints", config.checkpoint or config.digest())


def measure(config, job, node=None):
    """The row of one configuration: settings, ppl, nll, windows, tokens, size_mib, bpw,
    decode_tps, node, seconds (and checkpoint, quant_seconds)."""
    import qinfer

    t0 = time.perf_counter()
    row = dict(name=config.name, **config.settings(), node=node or socket.gethostname(), status="ok")
    if config.method == FLOAT:
        engine = qinfer.Engine(job.model, dequantize=True, ctx=job.seqlen, threads=job.threads)
        params = float_params(engine.config)
        row.update(size_mib=params * 4 / 2 ** 20, bpw=32.0, checkpoint=None, quant_seconds=None)
    else:
        out = checkpoint_folder(config, job)
        row.update(checkpoint=out, quant_seconds=ensure_checkpoint(config, job, out))
        bits, weights = checkpoint_bits(out)
        row.update(size_mib=directory_mib(out), bpw=bits / weights)
        engine = qinfer.Engine(out, ctx=job.seqlen, threads=job.threads)
    row.update(score(engine, job.windows, job.threads))
    row["decode_tps"] = decode_speed(engine, job.prompt, job.decode_tokens) if job.decode_tokens else None
    row["seconds"] = time.perf_counter() - t0
    return row


def ensure_checkpoint(config, job, out):
    """Quantize into `out` unless a whole checkpoint is there: seconds taken, or None."""
    from ..quant import quantize

    if os.path.exists(os.path.join(out, "config.json")):
        return None
    os.makedirs(os.path.dirname(out), exist_ok=True)
    t0 = time.perf_counter()
    calibration = dict(calib=job.calib, nsamples=job.nsamples, seqlen=job.seqlen, seed=job.seed) \
        if config.calibrated() else {}
    if config.calibrated() and job.calib is None:
        raise QinferError(f"{config.name} needs calibration text and the run has none")
    quantize(job.model, out, bits=config.bits, group_size=config.group_size, method=config.method,
             threads=job.threads, progress=False, force=os.path.exists(out), **calibration,
             **config.quantize_options())
    return time.perf_counter() - t0


def score(engine, windows, threads):
    """{ppl, nll, windows, tokens, ppl_seconds} of the windows (qinfer.perplexity's protocol)."""
    from ..perplexity import evaluate_windows

    sums, per_window, seconds = evaluate_windows(engine, windows, 0, threads, progress=None)
    nll = math.fsum(sums) / (per_window * len(sums))
    return dict(ppl=math.exp(nll), nll=nll, windows=len(sums), tokens=per_window * len(sums), ppl_seconds=seconds)


def decode_speed(engine, prompt, tokens):
    """Best decode tokens/s of DECODE_REPEATS greedy generations of `tokens` tokens."""
    engine.generate(prompt, max_new_tokens=min(8, tokens))                # warm up
    best = 0.0
    for _ in range(DECODE_REPEATS):
        engine.generate(prompt, max_new_tokens=tokens)
        best = max(best, engine.last_stats.decode_tokens_per_second)
    return best


def float_params(cfg):
    """Parameters of a LLaMA model from its config."""
    d, ff, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    layer = d * q + 2 * d * kv + q * d + 3 * d * ff + 2 * d
    return v * d * (1 if cfg.tie_word_embeddings else 2) + cfg.num_hidden_layers * layer + d


def directory_mib(path):
    if os.path.isfile(path):
        return os.path.getsize(path) / 2 ** 20
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs) / 2 ** 20


COUNTED = (".qweight", ".scales", ".qzeros", ".zeros", ".spqr_stats", ".outlier_cols", ".outlier_vals",
           ".bcq_planes", ".bcq_alphas", ".bcq_offsets", ".lorc_a", ".lorc_b")
DTYPE_BITS = {"I32": 32, "F16": 16, "BF16": 16, "F32": 32, "U16": 16, "U8": 8}


def checkpoint_bits(directory):
    """(bits of the quantized layers' tensors, their weights) from the safetensors headers: GPTQ's
    qweight + scales + qzeros (or float zeros), SpQR's codes, statistics and outliers (its paper's
    count: row pointers and a permutation left out, as g_idx is for GPTQ), BCQ's sign planes,
    alphas and offsets, LoRC's factors. Each layer's bits from the settings and 'dynamic' rules."""
    from ..quant.dynamic import Rules

    with open(os.path.join(directory, "config.json")) as f:
        quant = json.load(f)["quantization_config"]
    rules, base = Rules(quant.get("dynamic"), directory), {"bits": int(quant["bits"])}
    total_bits = weights = 0
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".safetensors"):
            continue
        with open(os.path.join(directory, name), "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for tensor, info in header.items():
            if tensor.endswith(COUNTED):
                total_bits += int(np.prod(info["shape"])) * DTYPE_BITS[info["dtype"]]
            if tensor.endswith(".qweight"):             # int32 [in * bits / 32, out]
                rows, cols = info["shape"]
                weights += rows * 32 // rules.resolve(tensor[:-len(".qweight")], base)["bits"] * cols
            if tensor.endswith(".bcq_planes"):          # uint8 [bits, out, in / 8]
                _, out_f, in_bytes = info["shape"]
                weights += out_f * in_bytes * 8
    return total_bits, weights
