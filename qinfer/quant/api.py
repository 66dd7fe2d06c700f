"""qinfer.quantize: a float model in, a GPTQ-format checkpoint directory out.

GPTQ runs layer by layer on the engine's own forward pass:

    hidden states X = embedding of the calibration windows
    for each block i:
        run block i on X (float weights, earlier blocks already quantized),
            capturing the inputs of its linear maps -> one Hessian per input
            (q/k/v share one, gate/up share one)
        quantize each linear map with GPTQ; swap it into the block
        run block i again (now quantized) on X: the inputs of block i + 1

With true_sequential the linear maps of a block are done in four stages
(q/k/v, o, gate/up, down), each calibrated on inputs that already went
through the quantized earlier stages: one more pass per stage.

Round to nearest ("rtn") writes the same checkpoint without calibration.
Nothing is written until every layer is done (checkpoint.py).
"""
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import QinferError, UnsupportedError
from ..packing import GPTQ_BITWIDTHS as BITWIDTHS
from ..rtn import GROUP_SIZES
from . import checkpoint
from .dynamic import Rules
from .gptq import Hessian, PreparedHessian, gptq_quantize, output_error
from .progress import Progress
from .quantizer import check_settings, rtn_quantize
from .writer import FLOAT_DTYPES, float_tensors, float_weight, save_checkpoint

METHODS = ("gptq", "rtn")
# The input each linear map reads (Model.run_layer's capture names).
INPUT_OF = {"wq": "attn_in", "wk": "attn_in", "wv": "attn_in", "wo": "o_in",
            "w_gate": "mlp_in", "w_up": "mlp_in", "w_down": "down_in"}
TRUE_SEQUENTIAL_STAGES = (("wq", "wk", "wv"), ("wo",), ("w_gate", "w_up"), ("w_down",))


@dataclass
class QuantizeReport:
    path: str
    method: str
    bits: int
    group_size: int
    sym: bool
    act_order: bool
    static_groups: bool
    checkpoint_format: str
    seconds: float
    bytes: int
    layers: int
    # GPTQ only: per linear map (Hugging Face name), the output error on the
    # calibration inputs relative to the layer's output, ||WX - QX||^2 / ||WX||^2,
    # for GPTQ and for round to nearest with the same scales rule.
    errors: dict = field(default_factory=dict)
    zero_point: str = "int"
    clip_search: bool = False
    dynamic: dict = None          # per-layer rules (quant/dynamic.py), None when every layer is alike

    def summary(self):
        group = "full column" if self.group_size == -1 else f"group {self.group_size}"
        lines = [f"{self.method} {self.bits}-bit {group}{' sym' if self.sym else ''}"
                 f"{' float-zero' if self.zero_point == 'float' else ''}"
                 f"{' clip-search' if self.clip_search else ''}"
                 f"{' act-order' if self.act_order else ''}{' static-groups' if self.static_groups else ''}: "
                 f"{self.layers} layers in {self.seconds:.1f} s; wrote {self.path} "
                 f"({self.bytes / 2 ** 20:.1f} MiB, checkpoint_format {self.checkpoint_format})"]
        for key, overrides in (self.dynamic or {}).items():
            lines.append(f"  layers matching {key[2:]!r}: "
                         + ", ".join(f"{k} {v}" for k, v in overrides.items()))
        if self.errors:
            g = np.mean([e["gptq"] for e in self.errors.values()])
            r = np.mean([e["rtn"] for e in self.errors.values()])
            lines.append(f"mean relative output error on the calibration data: gptq {g:.3g}, rtn {r:.3g}")
        return "\n".join(lines)


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise QinferError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _check_settings(bits, group_size, method, nsamples, seqlen, damp, seed, float_dtype):
    if bits not in BITWIDTHS:
        raise UnsupportedError(f"bits must be one of {BITWIDTHS}, got {bits!r}")
    if group_size not in GROUP_SIZES:
        raise UnsupportedError(f"group_size must be one of {GROUP_SIZES} (-1 = full column), got {group_size!r}")
    if method not in METHODS:
        raise UnsupportedError(f"method must be one of {METHODS}, got {method!r}")
    _check_int("nsamples", nsamples, 1)
    _check_int("seqlen", seqlen, 1)
    _check_int("seed", seed, 0)
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp) or \
            not 0 <= damp < 1:
        raise QinferError(f"damp must be a number in [0, 1), got {damp!r}")
    if float_dtype not in FLOAT_DTYPES:
        raise UnsupportedError(f"float_dtype must be one of {FLOAT_DTYPES}, got {float_dtype!r}")


def _check_dynamic(rules, bits, group_size, sym, zero_point):
    """dynamic.Rules from the API's dict; every rule's settings must be ones quantize can make."""
    parsed = Rules(rules, "dynamic")
    for key, _, positive, overrides in parsed.rules:
        if not positive:
            raise UnsupportedError(f"dynamic rule {key!r}: negative rules (left float) are not supported by "
                                   f"quantize; every linear layer is quantized")
        if not overrides:
            raise QinferError(f"dynamic rule {key!r} sets neither bits nor group_size")
        check_settings(overrides.get("bits", bits), overrides.get("group_size", group_size), sym, zero_point)
    return parsed


def _open_source(model):
    from ..engine import default_model_path
    from ..readers import open_model

    path = os.fspath(model) if model is not None else default_model_path()
    source = open_model(path)
    if source.format == "gptq":
        raise QinferError(f"{path} is already a GPTQ checkpoint; quantize a float model "
                          f"(a Hugging Face directory or a GGUF file) instead")
    if source.tokenizer is None:
        raise QinferError(f"{path}: no tokenizer found (tokenizer.json or tokenizer.model)")
    return source


def _check_shapes(source):
    c = source.config
    for what, n in (("hidden_size", c.hidden_size), ("num_attention_heads * head_dim",
                                                    c.num_attention_heads * c.head_dim),
                    ("intermediate_size", c.intermediate_size)):
        if n % 32:
            raise UnsupportedError(f"{source.path}: {what} = {n} is not a multiple of 32, which the packed "
                                   f"layout needs for every linear layer's input")


def _linear_name(layer, name):
    from ..model import LINEAR_NAMES
    return f"model.layers.{layer}.{LINEAR_NAMES[name]}"


# ---------------------------------------------------------------- methods
def _layer_settings(rules, base, settings):
    """(bits, group_size) of one linear layer: the checkpoint's, or a dynamic rule's."""
    s = rules.resolve(base, settings)
    return s["bits"], s["group_size"]


def _rtn_layers(source, settings, rules, progress):
    from ..model import LINEAR_NAMES

    sym, zero_point, clip = settings["sym"], settings["zero_point"], settings["clip_search"]
    results = {}
    for i in range(source.config.num_hidden_layers):
        with progress.layer(i, len(LINEAR_NAMES)) as bar:
            for name in LINEAR_NAMES:
                base = _linear_name(i, name)
                bits, group_size = _layer_settings(rules, base, settings)
                results[base] = rtn_quantize(float_weight(source, base + ".weight"), bits, group_size, sym,
                                             zero_point, clip)
                bar.update()
    return results, {}


def calibrated_layers(source, windows, threads, true_sequential, progress, quantize_layer, sink_weight=1.0,
                      damp=0.01, act_order=False):
    """The layer loop of a calibrated method (the module docstring): quantize_layer(base name,
    short name, float weight, Hessian, PreparedHessian) -> (result, what the model runs in
    its place: a QuantizedLinear or a float32 array). Returns {base name: result}."""
    from ..model import LINEAR_NAMES, Model

    nsamples, seqlen = windows.shape
    model = Model(source, ctx=seqlen, threads=threads, dequantize=True)
    cfg = model.config
    widths = {"attn_in": cfg.hidden_size, "o_in": cfg.num_attention_heads * cfg.head_dim,
              "mlp_in": cfg.hidden_size, "down_in": cfg.intermediate_size}
    hidden = np.ascontiguousarray(model.embedding[windows], dtype=np.float32)   # [nsamples, seqlen, dim]
    stages = TRUE_SEQUENTIAL_STAGES if true_sequential else (tuple(LINEAR_NAMES),)
    n_layers = cfg.num_hidden_layers
    results = {}
    for i in range(n_layers):
        last = i == n_layers - 1
        steps = nsamples * (len(stages) + (0 if last else 1)) + len(LINEAR_NAMES)
        with progress.layer(i, steps) as bar:
            for stage in stages:
                keys = sorted({INPUT_OF[name] for name in stage})
                hessians = {k: Hessian(widths[k]) for k in keys}
                captures = {k: np.empty((seqlen, widths[k]), dtype=np.float32) for k in keys}
                for s in range(nsamples):
                    x = hidden[s].copy()
                    model.run_layer(i, x, 0, captures)
                    for k in keys:
                        hessians[k].add(captures[k])
                        if sink_weight != 1:
                            hessians[k].add(captures[k][:1], sink_weight - 1)
                    bar.update()
                H = {k: h.value for k, h in hessians.items()}
                prepared = {k: PreparedHessian(h, damp, act_order) for k, h in H.items()}
                for name in stage:
                    base = _linear_name(i, name)
                    w = float_weight(source, base + ".weight")
                    results[base], runs = quantize_layer(base, name, w, H[INPUT_OF[name]], prepared[INPUT_OF[name]])
                    model.replace_linear(i, name, runs)
                    bar.update()
            if not last:
                for s in range(nsamples):
                    model.run_layer(i, hidden[s], 0)
                    bar.update()
    return results


def _gptq_layers(source, windows, settings, rules, threads, true_sequential, progress):
    sym, zero_point, clip = settings["sym"], settings["zero_point"], settings["clip_search"]
    errors = {}

    def gptq(base, name, w, h, prepared):
        bits, group_size = _layer_settings(rules, base, settings)
        res = gptq_quantize(w, prepared, bits, group_size, sym, static_groups=settings["static_groups"],
                            zero_point=zero_point, clip=clip)
        scale = output_error(w, np.zeros_like(w), h) or 1.0
        rtn = rtn_quantize(w, bits, group_size, sym, zero_point, clip)
        errors[base] = {"gptq": output_error(w, res.dequantize(), h) / scale,
                        "rtn": output_error(w, rtn.dequantize(), h) / scale}
        return res, res.to_linear()

    results = calibrated_layers(source, windows, threads, true_sequential, progress, gptq,
                                settings["sink_weight"], settings["damp"], settings["act_order"])
    return results, errors


# ---------------------------------------------------------------- the API
def quantize(model, out, bits=4, group_size=128, method="gptq", act_order=False, sym=False,
             static_groups=False, calib=None, nsamples=128, seqlen=2048, damp=0.01, seed=0, force=False,
             threads=None, true_sequential=False, sink_weight=1.0, float_dtype="float16", zero_point="int",
             clip_search=False, dynamic=None, progress=True):
    """Quantize a float model into a GPTQ-format checkpoint directory `out`.

    model: a Hugging Face LLaMA directory or a GGUF file (quantized GGUF
    tensors are dequantized first); None for the default SmolLM2 model.
    method "gptq" needs calib, a text file: nsamples windows of seqlen
    tokens are drawn from it with `seed`. act_order quantizes columns by
    decreasing Hessian diagonal (static_groups keeps groups contiguous);
    damp is GPTQ's dampening (a fraction of the mean Hessian diagonal).
    sink_weight: how many times the first token of each calibration window
    counts in the Hessians (1: plain GPTQ). That position becomes the
    attention sink every later token attends to; with weight 1 GPTQ may move
    error into the directions only it uses (docs/quantize.md).
    float_dtype: how the embedding, norms and an untied LM head are stored.
    zero_point: "int" (GPTQ's integer zero points, an AutoGPTQ-compatible
    checkpoint) or "float" (each group's own min/max range, a real zero
    point stored in float16: checkpoint_format "qinfer_float_zero", which
    only qinfer reads; quant/quantizer.py).
    clip_search: choose each group's range by the clip search (quant/quantizer.py:
    the min/max range or one shrunk by up to 20%, whichever rounds the group's
    weights best), for round to nearest and GPTQ alike; the checkpoint's format
    does not change.
    dynamic: per-layer settings, GPTQModel's rules (quant/dynamic.py), e.g.
    {"+:.*\\.mlp\\.down_proj": {"bits": 4}}: the layers a rule matches get its bits
    and/or group_size (a mixed-precision model); written to the checkpoint as
    quantize_config.json's "dynamic". Negative ("-:") rules are not supported here.
    `out` must not exist unless force. Returns a QuantizeReport.
    """
    t0 = time.perf_counter()
    _check_settings(bits, group_size, method, nsamples, seqlen, damp, seed, float_dtype)
    check_settings(bits, group_size, sym, zero_point)
    if isinstance(sink_weight, bool) or not isinstance(sink_weight, (int, float)) or \
            not math.isfinite(sink_weight) or sink_weight < 1:
        raise QinferError(f"sink_weight must be a number >= 1, got {sink_weight!r}")
    rules = _check_dynamic(dynamic, bits, group_size, sym, zero_point)
    source = _open_source(model)
    _check_shapes(source)
    out = checkpoint.check_output(out, force, source.path)
    meta = dict(bits=bits, group_size=group_size, sym=bool(sym), act_order=bool(act_order),
                static_groups=bool(static_groups), true_sequential=bool(true_sequential), method=method,
                damp=damp, nsamples=None, seqlen=None, seed=None, calibration=None, float_dtype=float_dtype,
                sink_weight=float(sink_weight), zero_point=zero_point, clip_search=bool(clip_search),
                dynamic=rules.to_json() or None)
    if method == "gptq":
        from ..tokenizer import load as load_tokenizer
        from .calibration import calibration_windows

        if calib is None:
            raise QinferError("GPTQ needs calibration text: pass --calib FILE (e.g. WikiText-2's wiki.test.raw)")
        if seqlen > source.config.max_position_embeddings:
            raise QinferError(f"seqlen {seqlen} is longer than the model's context "
                              f"({source.config.max_position_embeddings} tokens)")
        windows = calibration_windows(calib, load_tokenizer(source.tokenizer), nsamples, seqlen, seed)
        meta.update(nsamples=nsamples, seqlen=seqlen, seed=seed, calibration=os.path.basename(os.fspath(calib)))
    else:
        if act_order or static_groups or true_sequential or sink_weight != 1:
            raise QinferError("act-order, static groups, true-sequential and the sink weight are GPTQ options; "
                              "round to nearest (method 'rtn') uses no calibration")
        meta.update(damp=None, sink_weight=None)
    floats = float_tensors(source, float_dtype)

    bar = Progress(source.config.num_hidden_layers, enabled=progress)
    if method == "gptq":
        results, errors = _gptq_layers(source, windows, meta, rules, threads, true_sequential, bar)
    else:
        results, errors = _rtn_layers(source, meta, rules, bar)
    fmt = save_checkpoint(out, source, results, meta, force=force, floats=floats)
    return QuantizeReport(path=out, method=method, bits=bits, group_size=group_size, sym=bool(sym),
                          act_order=meta["act_order"], static_groups=meta["static_groups"],
                          checkpoint_format=fmt, seconds=time.perf_counter() - t0,
                          bytes=checkpoint.directory_size(out), layers=source.config.num_hidden_layers,
                          errors=errors, zero_point=zero_point, clip_search=meta["clip_search"],
                          dynamic=meta["dynamic"])
