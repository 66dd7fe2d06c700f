"""qinfer.quantize: a float model in, a GPTQ-format (or SpQR) checkpoint directory out.

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
Binary-coding quantization ("bcq", quant/bcq.py: the lookup-table kernels'
format) needs no calibration either; its checkpoint is qinfer's own
(quant/bcq_writer.py).
SpQR ("spqr", quant/spqr.py) runs the same layer loop with its own quantizer
and swaps in the SpqrLinear layers the kernels run; its checkpoint is
qinfer's own (quant/spqr_writer.py).
SmoothQuant and ZeroQuant's W8A8 ("smoothquant", "zeroquant": quant/w8a8.py)
write 8-bit symmetric weights whose inputs the engine rounds to int8 per token;
`smooth` applies SmoothQuant's smoothing before GPTQ or round to nearest.
Nothing is written until every layer is done (checkpoint.py).
"""
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import QinferError, UnsupportedError
from ..packing import GPTQ_BITWIDTHS as BITWIDTHS
from ..readers.bcq import BCQ_BITS, QUANT_METHOD as BCQ_FORMAT
from ..readers.spqr import QUANT_METHOD as SPQR_FORMAT, SPQR_BITS, STAT_BITS as SPQR_STAT_BITS, STAT_GROUP
from ..rtn import GROUP_SIZES
from . import checkpoint
from .bcq import DEFAULT_ROUNDS as BCQ_DEFAULT_ROUNDS, bcq_quantize
from .bcq_writer import save_bcq_checkpoint
from .dynamic import Rules
from .gptq import Hessian, PreparedHessian, gptq_quantize, output_error
from .progress import Progress
from .quantizer import check_settings, rtn_quantize
from .spqr import DEFAULT_GROUP as SPQR_DEFAULT_GROUP, DEFAULT_OUTLIER_THRESHOLD, DEFAULT_STAT_BITS, spqr_quantize
from .spqr_writer import save_spqr_checkpoint
from . import lkd, lorc, smoothquant, w8a8
from .writer import FLOAT_DTYPES, float_tensors, float_weight, save_checkpoint

METHODS = ("gptq", "rtn", "spqr", "bcq") + w8a8.METHODS
CALIBRATED = ("gptq", "spqr", "smoothquant")            # the methods that need --calib


def needs_calibration(method, smooth=None, lkd_steps=None):
    """Whether quantize(method, smooth=..., lkd_steps=...) draws calibration windows (--calib)."""
    return method in CALIBRATED or smooth is not None or lkd_steps is not None


# bits and group size when not given: GPTQ's usual 4-bit g128; SpQR's paper setting, 3-bit beta1 = 16;
# BCQ: 3 planes, groups of 128 (LUT-GEMM's), or of the largest of BCQ_GROUP_SIZES dividing every
# layer's inputs (SmolLM2's 576: 64)
# SmoothQuant and ZeroQuant: 8-bit weights, one scale per output row
DEFAULT_BITS_GROUP = {"gptq": (4, 128), "rtn": (4, 128), "spqr": (3, SPQR_DEFAULT_GROUP), "bcq": (3, None),
                      "smoothquant": (8, None), "zeroquant": (8, None)}       # None: w8a8.default_group
DEFAULT_CALIBRATION = {"smoothquant": w8a8.DEFAULT_CALIBRATION}      # (windows, tokens); the others (128, 2048)
BCQ_GROUP_SIZES = (128, 64, 32, 16)      # and -1: multiples of the lookup-table kernels' block of 16
SPQR_GROUP_SIZES = (16, 32, 64, 128)     # multiples of 16 (SpqrLinear's kernels) dividing spqr.py's block
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
    # SpQR only: its settings, and over the linear layers (weighted by their sizes) the bits
    # stored per weight (SpqrLinear.bits_per_weight: codes, statistics, outliers) and the
    # fraction of the weights kept as outliers
    stat_bits: int = None
    outlier_threshold: float = None
    bits_per_weight: float = None
    outlier_fraction: float = None
    # BCQ only: its refinement rounds and the weights' relative squared error
    # ||W - Q||^2 / ||W||^2 (weighted by the layers' sizes)
    rounds: int = None
    weight_error: float = None
    # SmoothQuant and ZeroQuant: how the activations run, and the smoothing's alpha(s)
    activations: str = None
    alpha: str = None
    lkd: str = None            # LKD's one-line summary (lkd.summary)

    def summary(self):
        group = "full column" if self.group_size == -1 else f"group {self.group_size}"
        spqr = (f" {self.stat_bits}-bit statistics, outlier threshold {self.outlier_threshold:g}"
                if self.method == "spqr" else f" {self.rounds} refinement rounds" if self.method == "bcq" else "")
        if self.activations:
            spqr = f", activations {self.activations}" + (f", {self.alpha}" if self.alpha else "")
        lines = [f"{self.method} {self.bits}-bit {group}{spqr}{' sym' if self.sym else ''}"
                 f"{' float-zero' if self.zero_point == 'float' else ''}"
                 f"{' clip-search' if self.clip_search else ''}"
                 f"{' act-order' if self.act_order else ''}{' static-groups' if self.static_groups else ''}: "
                 f"{self.layers} layers in {self.seconds:.1f} s; wrote {self.path} "
                 f"({self.bytes / 2 ** 20:.1f} MiB, checkpoint_format {self.checkpoint_format})"]
        for key, overrides in (self.dynamic or {}).items():
            lines.append(f"  layers matching {key[2:]!r}: "
                         + ", ".join(f"{k} {v}" for k, v in overrides.items()))
        if self.bits_per_weight is not None and self.method == "bcq":
            lines.append(f"{self.bits_per_weight:.3f} bits per weight (sign planes, float16 scales and offsets); "
                         f"relative squared weight error {self.weight_error:.4g}")
        elif self.bits_per_weight is not None:
            lines.append(f"{self.bits_per_weight:.3f} bits per weight (codes, statistics, outliers); "
                         f"outliers {self.outlier_fraction * 100:.3f}% of the weights")
        if self.errors:
            methods = list(next(iter(self.errors.values())))          # gptq, rtn; or spqr
            means = ", ".join(f"{m} {np.mean([e[m] for e in self.errors.values()]):.3g}" for m in methods)
            lines.append(f"mean relative output error on the calibration data: {means}")
        if self.lkd:
            lines.append(self.lkd)
        return "\n".join(lines)


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise QinferError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _check_settings(bits, group_size, method, nsamples, seqlen, damp, seed, float_dtype):
    if method not in METHODS:
        raise UnsupportedError(f"method must be one of {METHODS}, got {method!r}")
    if method not in ("spqr", "bcq") + w8a8.METHODS:    # theirs: _check_spqr_settings, ..., w8a8.check_bits
        if bits not in BITWIDTHS:
            raise UnsupportedError(f"bits must be one of {BITWIDTHS}, got {bits!r}")
    if method not in ("spqr", "bcq"):
        if group_size not in GROUP_SIZES:
            raise UnsupportedError(f"group_size must be one of {GROUP_SIZES} (-1 = full column), got {group_size!r}")
    _check_int("nsamples", nsamples, 1)
    _check_int("seqlen", seqlen, 1)
    _check_int("seed", seed, 0)
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp) or \
            not 0 <= damp < 1:
        raise QinferError(f"damp must be a number in [0, 1), got {damp!r}")
    if float_dtype not in FLOAT_DTYPES:
        raise UnsupportedError(f"float_dtype must be one of {FLOAT_DTYPES}, got {float_dtype!r}")


def _check_spqr_settings(bits, group_size, stat_bits, outlier_threshold):
    if isinstance(bits, bool) or bits not in SPQR_BITS:
        raise UnsupportedError(f"SpQR takes 2, 3 or 4 bits a weight, got {bits!r}")
    if isinstance(group_size, bool) or group_size not in SPQR_GROUP_SIZES:
        raise UnsupportedError(f"SpQR's group size must be 16, 32, 64 or 128 (a multiple of 16, as its kernels "
                               f"need, dividing the quantizer's blocks of 128 columns), got {group_size!r}")
    if isinstance(stat_bits, bool) or stat_bits not in SPQR_STAT_BITS:
        raise UnsupportedError(f"SpQR's statistics take 2 to 8 bits (stat_bits, --stat-bits), got {stat_bits!r}")
    t = outlier_threshold
    if isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t) or t <= 0:
        raise QinferError(f"the outlier threshold (--outlier-threshold) must be a number > 0, or inf for no "
                          f"outliers, got {t!r}")


def _check_bcq_settings(bits, group_size, rounds):
    if isinstance(bits, bool) or bits not in BCQ_BITS:
        raise UnsupportedError(f"BCQ takes 2, 3 or 4 sign planes a weight (--bits), got {bits!r}")
    if group_size is not None and (isinstance(group_size, bool) or group_size not in BCQ_GROUP_SIZES + (-1,)):
        raise UnsupportedError(f"BCQ's group size must be 16, 32, 64 or 128 (the lookup-table kernels read "
                               f"inputs in blocks of 16), or -1 for full columns, got {group_size!r}")
    _check_int("rounds", rounds, 0)


def _bcq_group(source, group_size):
    """The BCQ group size for this model: the one given (it must divide every linear layer's
    inputs), or the largest of BCQ_GROUP_SIZES that does."""
    c = source.config
    widths = (c.hidden_size, c.num_attention_heads * c.head_dim, c.intermediate_size)
    if group_size is None:
        fits = [g for g in BCQ_GROUP_SIZES if all(n % g == 0 for n in widths)]
        if not fits:
            raise UnsupportedError(f"{source.path}: no BCQ group size of {BCQ_GROUP_SIZES} divides every linear "
                                   f"layer's inputs {sorted(set(widths))}")
        return fits[0]
    if group_size != -1:
        for n in widths:
            if n % group_size:
                raise UnsupportedError(f"{source.path}: a linear layer has {n} inputs, which BCQ groups of "
                                       f"{group_size} do not divide; choose a group size that does (e.g. "
                                       f"{next(g for g in BCQ_GROUP_SIZES if all(m % g == 0 for m in widths))})")
    return group_size


def _refuse_options(title, options, why):
    """QinferError naming every option of `options` ((name, given) pairs) that was given: a
    setting `title` (an SpQR, a BCQ) checkpoint has no place for, for the reason `why`."""
    used = [name for name, given in options if given]
    if used:
        verb = f"is not {title} option" if len(used) == 1 else f"are not {title.split(' ', 1)[1]} options"
        raise QinferError(f"{' and '.join(used)} {verb} ({why})")


def _check_spqr_options(sym, static_groups, zero_point, dynamic):
    """The GPTQ-format options SpQR's checkpoint has no place for."""
    _refuse_options("an SpQR", (("sym (--sym)", sym), ("static_groups (--static-groups)", static_groups),
                                ("zero_point 'float' (--zero-point float)", zero_point != "int"),
                                ("dynamic (--dynamic)", dynamic)),
                    "its zero points are unsigned integers, its groups follow act-order, every layer alike")


def _check_bcq_options(sym, zero_point, clip_search, dynamic, stat_bits, outlier_threshold):
    """The GPTQ-format and SpQR options BCQ's checkpoint has no place for."""
    _refuse_options("a BCQ", (("sym (--sym)", sym), ("zero_point 'float' (--zero-point float)", zero_point != "int"),
                              ("clip_search (--clip-search)", clip_search), ("dynamic (--dynamic)", dynamic),
                              ("stat_bits (--stat-bits)", stat_bits is not None),
                              ("outlier_threshold (--outlier-threshold)", outlier_threshold is not None)),
                    "its weights are sign planes with a scale each, every layer alike")


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
    if source.format in ("gptq", "spqr", "bcq"):
        kind = {"gptq": "a GPTQ", "spqr": "an SpQR", "bcq": "a BCQ"}[source.format]
        raise QinferError(f"{path} is already {kind} checkpoint; "
                          f"quantize a float model (a Hugging Face directory or a GGUF file) instead")
    if source.tokenizer is None:
        raise QinferError(f"{path}: no tokenizer found (tokenizer.json or tokenizer.model)")
    return source


def _check_shapes(source, spqr_group=None):
    """Every linear layer's input width fits the packed layout (and, for SpQR, splits into
    two groups of spqr_group or more, as its kernels need)."""
    c = source.config
    for what, n in (("hidden_size", c.hidden_size), ("num_attention_heads * head_dim",
                                                    c.num_attention_heads * c.head_dim),
                    ("intermediate_size", c.intermediate_size)):
        if n % 32:
            raise UnsupportedError(f"{source.path}: {what} = {n} is not a multiple of 32, which the packed "
                                   f"layout needs for every linear layer's input")
        if spqr_group and (n % spqr_group or n == spqr_group):
            raise UnsupportedError(f"{source.path}: {what} = {n} does not split into SpQR groups of {spqr_group} "
                                   f"(two or more); choose a smaller --group-size")
        if spqr_group and n > 65536:
            raise UnsupportedError(f"{source.path}: {what} = {n} is more than an SpQR outlier's 16-bit column holds")


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


def _bcq_layers(source, settings, progress):
    """BCQ of every linear layer -> (results, {base: (bits per weight, weights, relative error)})."""
    from ..model import LINEAR_NAMES

    results, sizes = {}, {}
    for i in range(source.config.num_hidden_layers):
        with progress.layer(i, len(LINEAR_NAMES)) as bar:
            for name in LINEAR_NAMES:
                base = _linear_name(i, name)
                w = float_weight(source, base + ".weight")
                group = w.shape[1] if settings["group_size"] == -1 else settings["group_size"]
                r = bcq_quantize(w, settings["bits"], group, settings["rounds"])
                results[base] = r
                # codes + float16 alphas and offset per group and row
                sizes[base] = (r.bits + 16 * (r.bits + 1) / group, w.size,
                               r.history[-1] / max(float((w.astype(np.float64) ** 2).sum()), 1e-300))
                bar.update()
    return results, sizes


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


def _spqr_layers(source, windows, settings, threads, true_sequential, progress):
    """SpQR in the calibrated layer loop: -> (results, errors, {base: (bits per weight, weights, outliers)})."""
    from ..spqr_linear import SpqrLinear

    errors, sizes = {}, {}

    def spqr(base, name, w, h, prepared):
        res = spqr_quantize(w, prepared, settings["bits"], settings["group_size"], settings["stat_bits"],
                            STAT_GROUP, settings["outlier_threshold"], clip=settings["clip_search"])
        layer = SpqrLinear.from_result(res)       # what the next layers are calibrated through
        scale = output_error(w, np.zeros_like(w), h) or 1.0
        errors[base] = {"spqr": output_error(w, res.dequantize(), h) / scale}
        sizes[base] = (layer.bits_per_weight(), w.size, layer.n_outliers)
        return res, layer

    results = calibrated_layers(source, windows, threads, true_sequential, progress, spqr,
                                settings["sink_weight"], settings["damp"], settings["act_order"])
    return results, errors, sizes


# ---------------------------------------------------------------- the API
def quantize(model, out, bits=None, group_size=None, method="gptq", act_order=False, sym=False,
             static_groups=False, calib=None, nsamples=None, seqlen=None, damp=0.01, seed=0, force=False,
             threads=None, true_sequential=False, sink_weight=1.0, float_dtype="float16", zero_point="int",
             clip_search=False, dynamic=None, progress=True, stat_bits=None, outlier_threshold=None, rounds=None,
             alpha=None, a_bits=None, smooth=None, smooth_down=False, lorc_rank=None, lm_head=False,
             lkd_steps=None, lkd_lr=None):
    """Quantize a float model into a GPTQ-format checkpoint directory `out` (method "spqr": an
    SpQR checkpoint, qinfer's own).

    model: a Hugging Face LLaMA directory or a GGUF file (quantized GGUF
    tensors are dequantized first); None for the default SmolLM2 model.
    bits and group_size: None for the method's defaults (GPTQ and round to
    nearest: 4-bit groups of 128; SpQR: 3-bit groups of 16).
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
    method "spqr" (quant/spqr.py) calibrates as GPTQ does (calib, nsamples,
    seqlen, damp, act_order, true_sequential, sink_weight, clip_search) and
    takes two settings of its own: stat_bits, the bits of each group scale's
    code (default 3; the scales are compressed in runs of 16 output rows), and
    outlier_threshold, how much a weight's quantization error must exceed
    the layer's typical one to be kept in float16 as an outlier (default 0.2;
    float("inf"): no outliers). sym, static_groups, zero_point "float" and
    dynamic do not apply to it.
    method "bcq" (quant/bcq.py) writes each weight as bits sign planes with a
    float16 scale per plane and an offset per group of group_size inputs (16,
    32, 64 or 128, or -1; default 128, or the largest of those that divides
    every layer's inputs), found greedily and refined by `rounds` rounds of
    alternating least squares (default 30); no calibration. Its checkpoint
    runs on the lookup-table kernels.
    methods "smoothquant" and "zeroquant" (quant/w8a8.py) write W8A8 checkpoints:
    `bits` (the weights', 8) symmetric per output row (group_size -1, the default)
    or group, and a_bits (the activations', 8) rounded per token at run time;
    bits 4 is ZeroQuant's W4/8-A8: the MLP's weights at 4 bits in groups of
    group_size (default 64), the attention's at 8 bits per row.
    SmoothQuant calibrates (calib; default 512 windows of 512 tokens) and
    smooths with `alpha` (a number in [0, 1], default 0.5, or "auto": chosen per
    norm from smoothquant.ALPHA_GRID by the calibration rows' W8A8 error);
    ZeroQuant here is plain W8A8: no smoothing, no calibration.
    smooth: with "gptq" or "rtn", SmoothQuant's smoothing with this alpha before
    quantizing the weights (calib needed; the activations stay float).
    lorc_rank: with "smoothquant" or "zeroquant", ZeroQuant-V2's low-rank compensation:
    each layer also keeps the best rank-lorc_rank approximation of its rounding error
    as two thin float16 matrices, added at run time (quant/lorc.py).
    lm_head: with "smoothquant" or "zeroquant", the LM head too as an int8 W8A8 layer (a tied
    model's is untied: the embedding stays float); by default it stays float, as in the
    paper, and a decode step reads it whole in float16.
    lkd_steps: with "smoothquant" or "zeroquant", ZeroQuant's layer-by-layer knowledge
    distillation (quant/lkd.py): before rounding, each block's weights are trained for
    lkd_steps steps (one calibration window each) to make the rounded block reproduce the
    float block's output; needs calib (zeroquant: default 128 windows of 512 tokens).
    lkd_lr: its Adam learning rate (default 5e-6, the seed's).
    smooth_down: smooth down_proj's input too, through up_proj's output rows (an
    exact rewrite the paper does not make; smoothquant.DOWN_GROUP), with
    "smoothquant" or `smooth`.
    nsamples and seqlen: None for the method's defaults (128 windows of 2048 tokens;
    SmoothQuant's 512 of 512).
    `out` must not exist unless force. Returns a QuantizeReport.
    """
    t0 = time.perf_counter()
    default_bits, default_group = DEFAULT_BITS_GROUP.get(method, (None, None))
    bits = default_bits if bits is None else bits
    group_size = default_group if group_size is None else group_size
    if method in w8a8.METHODS and group_size is None:
        group_size = w8a8.default_group(bits)
    default_nsamples, default_seqlen = (lkd.DEFAULT_CALIBRATION if method == "zeroquant" and lkd_steps is not None
                                        else DEFAULT_CALIBRATION.get(method, (128, 2048)))
    nsamples = default_nsamples if nsamples is None else nsamples
    seqlen = default_seqlen if seqlen is None else seqlen
    _check_settings(bits, group_size, method, nsamples, seqlen, damp, seed, float_dtype)
    if method in w8a8.METHODS:
        a_bits = 8 if a_bits is None else a_bits
        w8a8.check_bits(method, bits, a_bits)
        w8a8.check_not_given(method, **{"sym (--sym)": sym, "act_order (--act-order)": act_order,
                                        "static_groups (--static-groups)": static_groups,
                                        "true_sequential (--true-sequential)": true_sequential,
                                        "zero_point 'float' (--zero-point float)": zero_point != "int",
                                        "clip_search (--clip-search)": clip_search, "dynamic (--dynamic)": dynamic,
                                        "stat_bits (--stat-bits)": stat_bits is not None,
                                        "outlier_threshold (--outlier-threshold)": outlier_threshold is not None,
                                        "rounds (--rounds)": rounds is not None,
                                        "smooth (--smooth)": smooth is not None,
                                        "sink_weight (--sink-weight)": sink_weight != 1})
        if method == "smoothquant":
            alpha = smoothquant.check_alpha(smoothquant.DEFAULT_ALPHA if alpha is None else alpha)
        elif alpha is not None or smooth_down:
            raise QinferError("alpha (--alpha) and smooth_down (--smooth-down) are SmoothQuant's: use them with "
                              "method 'smoothquant' (zeroquant does not smooth)")
        lorc_rank = None if lorc_rank is None else lorc.check_rank(lorc_rank)
        if lkd_steps is not None:
            lkd_steps, lkd_lr = lkd.check_settings(lkd_steps, lkd.DEFAULT_LR if lkd_lr is None else lkd_lr)
        elif lkd_lr is not None:
            raise QinferError("lkd_lr (--lkd-lr) is the learning rate of LKD: give lkd_steps (--lkd-steps) too")
        return _quantize_w8a8(model, out, method, bits, group_size, alpha, bool(smooth_down), lorc_rank, bool(lm_head),
                              lkd_steps, lkd_lr, calib, nsamples, seqlen, seed, force, threads, float_dtype, progress,
                              t0)
    if lkd_steps is not None or lkd_lr is not None:
        raise QinferError("LKD (--lkd-steps, --lkd-lr) trains the blocks of the 'smoothquant' and 'zeroquant' "
                          f"methods, not {method!r}")
    if alpha is not None or a_bits is not None or lorc_rank is not None or lm_head:
        raise QinferError("alpha (--alpha), the activations' bits (--a-bits), the low-rank compensation "
                          "(--lorc-rank) and an int8 LM head (--int8-lm-head) are settings of the 'smoothquant' and "
                          "'zeroquant' methods; GPTQ and the others keep float activations")
    if smooth is not None:
        if method not in ("gptq", "rtn"):
            raise QinferError(f"smooth (--smooth) applies to methods 'gptq' and 'rtn', not {method!r}")
        smooth = smoothquant.check_alpha(smooth)
    elif smooth_down:
        raise QinferError("smooth_down (--smooth-down) goes with smoothing: method 'smoothquant', or --smooth A")
    if method != "bcq" and rounds is not None:
        raise QinferError("refinement rounds (--rounds) are a BCQ setting: use them with method 'bcq'")
    if method == "bcq":
        rounds = BCQ_DEFAULT_ROUNDS if rounds is None else rounds
        _check_bcq_settings(bits, group_size, rounds)
        _check_bcq_options(sym, zero_point, clip_search, dynamic, stat_bits, outlier_threshold)
    if method == "spqr":
        stat_bits = DEFAULT_STAT_BITS if stat_bits is None else stat_bits
        outlier_threshold = DEFAULT_OUTLIER_THRESHOLD if outlier_threshold is None else outlier_threshold
        _check_spqr_settings(bits, group_size, stat_bits, outlier_threshold)
        _check_spqr_options(sym, static_groups, zero_point, dynamic)
    elif method != "bcq":
        if stat_bits is not None or outlier_threshold is not None:
            raise QinferError("the statistics' bits (--stat-bits) and the outlier threshold (--outlier-threshold) "
                              "are SpQR settings: use them with method 'spqr'")
        check_settings(bits, group_size, sym, zero_point)
    if isinstance(sink_weight, bool) or not isinstance(sink_weight, (int, float)) or \
            not math.isfinite(sink_weight) or sink_weight < 1:
        raise QinferError(f"sink_weight must be a number >= 1, got {sink_weight!r}")
    rules = _check_dynamic(None if method == "bcq" else dynamic, bits, group_size, sym, zero_point)
    source = _open_source(model)
    _check_shapes(source, group_size if method == "spqr" else None)
    if method == "bcq":
        group_size = _bcq_group(source, group_size)
    out = checkpoint.check_output(out, force, source.path)
    meta = dict(bits=bits, group_size=group_size, sym=bool(sym), act_order=bool(act_order),
                static_groups=bool(static_groups), true_sequential=bool(true_sequential), method=method,
                damp=damp, nsamples=None, seqlen=None, seed=None, calibration=None, float_dtype=float_dtype,
                sink_weight=float(sink_weight), zero_point=zero_point, clip_search=bool(clip_search),
                dynamic=rules.to_json() or None, stat_bits=stat_bits, outlier_threshold=outlier_threshold,
                rounds=rounds, smooth=smooth)
    if needs_calibration(method, smooth):
        windows = _calibration(source, calib, nsamples, seqlen, seed, "GPTQ" if method == "gptq" else
                               "SpQR" if method == "spqr" else "Smoothing (--smooth)")
        meta.update(nsamples=nsamples, seqlen=seqlen, seed=seed, calibration=os.path.basename(os.fspath(calib)))
    if method not in CALIBRATED:
        if act_order or static_groups or true_sequential or sink_weight != 1:
            raise QinferError("act-order, static groups, true-sequential and the sink weight are GPTQ options (SpQR "
                              "takes all but static groups); round to nearest (method 'rtn') uses no calibration")
        meta.update(damp=None, sink_weight=None)
    if smooth is not None:
        source, _ = w8a8.smoothing(source, windows, smooth, threads, progress, bool(smooth_down))
        meta["smooth_down"] = bool(smooth_down)
    floats = float_tensors(source, float_dtype)

    bar = Progress(source.config.num_hidden_layers, enabled=progress)
    spqr = {}
    if method == "bcq":
        results, sizes = _bcq_layers(source, meta, bar)
        save_bcq_checkpoint(out, source, results, meta, force=force, floats=floats)
        fmt, errors = BCQ_FORMAT, {}
        weights = sum(n for _, n, _ in sizes.values())
        spqr = dict(bits_per_weight=sum(b * n for b, n, _ in sizes.values()) / weights,
                    weight_error=sum(e * n for _, n, e in sizes.values()) / weights, rounds=rounds)
    elif method == "spqr":
        results, errors, sizes = _spqr_layers(source, windows, meta, threads, true_sequential, bar)
        save_spqr_checkpoint(out, source, results, meta, force=force, floats=floats)
        fmt = SPQR_FORMAT
        weights = sum(n for _, n, _ in sizes.values())
        spqr = dict(stat_bits=stat_bits, outlier_threshold=float(outlier_threshold),
                    bits_per_weight=sum(b * n for b, n, _ in sizes.values()) / weights,
                    outlier_fraction=sum(o for _, _, o in sizes.values()) / weights)
    else:
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
                          dynamic=meta["dynamic"], **spqr)


def _calibration(source, calib, nsamples, seqlen, seed, method_name):
    """The calibration windows (int32 [nsamples, seqlen]) drawn from the text file calib."""
    from ..tokenizer import load as load_tokenizer
    from .calibration import calibration_windows

    if calib is None:
        raise QinferError(f"{method_name} needs calibration text: pass --calib FILE (e.g. WikiText-2's "
                          f"wiki.test.raw)")
    if seqlen > source.config.max_position_embeddings:
        raise QinferError(f"seqlen {seqlen} is longer than the model's context "
                          f"({source.config.max_position_embeddings} tokens)")
    return calibration_windows(calib, load_tokenizer(source.tokenizer), nsamples, seqlen, seed)


def _quantize_w8a8(model, out, method, bits, group_size, alpha, smooth_down, lorc_rank, lm_head, lkd_steps, lkd_lr,
                   calib, nsamples, seqlen, seed, force, threads, float_dtype, progress, t0):
    """SmoothQuant / ZeroQuant's W8A8 (quant/w8a8.py) -> QuantizeReport."""
    source = _open_source(model)
    _check_shapes(source)
    w8a8.check_group(source, group_size)
    if method == "zeroquant" and calib is not None and lkd_steps is None:
        raise QinferError("zeroquant's W8A8 needs no calibration (--calib) unless it trains with LKD (--lkd-steps); "
                          "SmoothQuant ('smoothquant') uses it")
    windows = (_calibration(source, calib, nsamples, seqlen, seed, "SmoothQuant" if method == "smoothquant" else "LKD")
               if needs_calibration(method, lkd_steps=lkd_steps) else None)
    out = checkpoint.check_output(out, force, source.path)
    meta = dict(bits=bits, group_size=group_size, sym=True, method=method, float_dtype=float_dtype,
                activations="int8-token", alpha=alpha, smooth_down=smooth_down, lorc_rank=lorc_rank, lm_head=lm_head,
                lkd_steps=lkd_steps, lkd_lr=lkd_lr,
                dynamic=Rules(w8a8.dynamic_rules(bits, group_size, lm_head), "dynamic").to_json() or None)
    if windows is not None:
        meta.update(nsamples=nsamples, seqlen=seqlen, seed=seed, calibration=os.path.basename(os.fspath(calib)))
    fmt, alphas, distilled = w8a8.quantize_w8a8(source, out, meta, windows, threads, force, progress)
    return QuantizeReport(path=out, method=method, bits=bits, group_size=group_size, sym=True, act_order=False,
                          static_groups=False, checkpoint_format=fmt, seconds=time.perf_counter() - t0,
                          bytes=checkpoint.directory_size(out), layers=source.config.num_hidden_layers,
                          activations="int8 per token" + (f", LoRC rank {lorc_rank}" if lorc_rank else "") +
                          (", int8 LM head" if lm_head else ""),
                          alpha=w8a8.alpha_summary(alphas) or None,
                          lkd=lkd.summary(distilled) if distilled else None, dynamic=meta["dynamic"])
