"""The weight-and-activation methods of `qinfer quantize`: SmoothQuant and ZeroQuant's W8A8.

Both write a GPTQ-format checkpoint of 8-bit symmetric weights (quant/symmetric.py; with
bits 4, ZeroQuant's W4/8: the MLP's weights at 4 bits in groups, the attention's at 8 per
row, written as a 'dynamic' rule)
whose quantization_config also says the layers' inputs are rounded to int8 per token at
run time ("input_activations", readers/gptq.py); the engine runs them on the int8 x int8
kernels (qinfer/int8_linear.py).

    smoothquant   calibrate the inputs' channel maxima, smooth (quant/smoothquant.py),
                  then round the weights per output row (group_size -1) or group
    zeroquant     round the weights per group as they are (no smoothing, no calibration):
                  plain W8A8, ZeroQuant's group-wise weights with per-token activations

With lkd_steps (either method), each block's weights are first trained by ZeroQuant's
layer-by-layer distillation (quant/lkd.py) on the calibration text, then rounded.

Smoothing before weight-only quantization (`--method gptq --smooth A`, api.py) uses the
same calibration and smoothing, and writes an ordinary GPTQ checkpoint.
"""
import numpy as np

from ..errors import QinferError, UnsupportedError
from . import dynamic, lkd, smoothquant
from .lorc import low_rank_factors
from .progress import Progress
from .symmetric import symmetric_quantize
from .writer import float_tensors, float_weight, save_checkpoint

METHODS = ("smoothquant", "zeroquant")
WEIGHT_BITS = (8, 4)
W4_GROUP = 64                             # the 4-bit MLP layers' default group
# W4/8: the layers that stay at 8 bits (one scale per row) when the weights are 4-bit
EIGHT_BIT_LAYERS = r".*\.self_attn\..*"
ACTIVATION_BITS = (8,)
DEFAULT_CALIBRATION = (512, 512)          # SmoothQuant's windows x tokens


def check_bits(method, bits, a_bits):
    if isinstance(bits, bool) or bits not in WEIGHT_BITS:
        raise UnsupportedError(f"{method}: weights at {bits!r} bits are not supported (--w-bits: "
                               f"{', '.join(map(str, WEIGHT_BITS))}; the int8 x int8 kernels take int8 weights)")
    if isinstance(a_bits, bool) or a_bits not in ACTIVATION_BITS:
        raise UnsupportedError(f"{method}: activations at {a_bits!r} bits are not supported (--a-bits: "
                               f"{', '.join(map(str, ACTIVATION_BITS))}; the kernels round each token to int8)")


def default_group(bits):
    """-1 (a scale per row) for 8-bit weights; W4_GROUP for 4-bit ones."""
    return -1 if bits == 8 else W4_GROUP


def dynamic_rules(bits, group_size, lm_head=False):
    """The checkpoint's 'dynamic' rules (None when every layer has the checkpoint's settings): with
    4-bit weights (W4/8) the attention at 8 bits per row; a quantized LM head at 8 bits per row
    whatever the blocks' settings. quantize_w8a8 takes every layer's settings from them."""
    rules = {}
    if bits == 4:
        rules["+:" + EIGHT_BIT_LAYERS] = {"bits": 8, "group_size": -1}
    if lm_head and (bits, group_size) != (8, -1):
        rules["+:lm_head$"] = {"bits": 8, "group_size": -1}
    return rules or None


def check_group(source, group_size):
    """group_size -1 (per output row) or one that divides every linear layer's inputs."""
    c = source.config
    for n in (c.hidden_size, c.num_attention_heads * c.head_dim, c.intermediate_size):
        if group_size != -1 and n % group_size:
            raise UnsupportedError(f"{source.path}: a linear layer has {n} inputs, which groups of {group_size} "
                                   f"do not divide (use -1, one scale per output row, or a divisor)")


def smoothing(source, windows, alpha, threads, progress, down=False):
    """(smoothed source, {divisor: alpha used}) after calibrating on the windows (down: down_proj
    too, smoothquant.DOWN_GROUP)."""
    groups = smoothquant.groups_for(down)
    stats = smoothquant.calibrate(source, windows, threads, Progress(source.config.num_hidden_layers, progress),
                                  keep_sample=alpha == "auto", groups=groups)
    tensors, alphas = smoothquant.smooth(source, stats, alpha, lambda name: float_weight(source, name), groups)
    return smoothquant.smoothed_source(source, tensors), alphas


def untied_head(source):
    """The source with its LM head as a tensor of its own (a tied model's: the embedding), the
    config untied, so the head can be quantized apart from the embedding lookup."""
    import dataclasses

    if not source.config.tie_word_embeddings:
        return source
    embedding = "model.embed_tokens.weight"
    tensors = dict(source.tensors, **{"lm_head.weight": lambda: float_weight(source, embedding)})
    return dataclasses.replace(source, tensors=tensors,
                               config=dataclasses.replace(source.config, tie_word_embeddings=False))


def quantize_w8a8(source, out, meta, windows, threads, force, progress):
    """Write the W8A8 checkpoint `out`; returns (checkpoint_format, {norm: alpha} or {}, [LKD's
    lkd.Distilled per block] or [])."""
    from ..model import LINEAR_NAMES

    alphas = {}
    if meta["method"] == "smoothquant":
        source, alphas = smoothing(source, windows, meta["alpha"], threads, progress, meta["smooth_down"])
    if meta["lm_head"]:
        source = untied_head(source)
    rules = dynamic.Rules(meta["dynamic"], "dynamic")
    results, extra = {}, {}

    def rounder_for(base):
        s = rules.resolve(base, meta)
        return lambda w: symmetric_quantize(w, s["bits"], s["group_size"]).dequantize()

    def quantize_layer(base, trained=None):
        """Round the layer (LKD's trained weights when given); LoRC compensates the float weights' error."""
        w = float_weight(source, base + ".weight")
        s = rules.resolve(base, meta)
        results[base] = symmetric_quantize(w if trained is None else trained, s["bits"], s["group_size"])
        extra[base] = _lorc(w, results[base], meta)

    n_layers = source.config.num_hidden_layers
    bar = Progress(n_layers, enabled=progress)
    distilled = []
    if meta.get("lkd_steps"):
        for i, d in enumerate(lkd.distilled_blocks(source, windows, rounder_for, meta["lkd_steps"], meta["lkd_lr"],
                                                   threads, bar, seed=meta["seed"])):
            for short, hf_name in LINEAR_NAMES.items():
                quantize_layer(f"model.layers.{i}.{hf_name}", d.weights[short])
            d.weights = None               # rounded now: a 7B's float copies would not fit in memory at once
            distilled.append(d)
    else:
        for i in range(n_layers):
            with bar.layer(i, len(LINEAR_NAMES)) as layer_bar:
                for hf_name in LINEAR_NAMES.values():
                    quantize_layer(f"model.layers.{i}.{hf_name}")
                    layer_bar.update()
    if meta["lm_head"]:
        quantize_layer("lm_head")
    floats = float_tensors(source, meta["float_dtype"], lm_head=not meta["lm_head"])
    if alphas:
        meta = dict(meta, alpha=meta["alpha"] if meta["alpha"] != "auto" else
                    {"auto": sorted(set(alphas.values())), "per_norm": alphas})
    fmt = save_checkpoint(out, source, results, meta, force=force, floats=floats, extra=extra)
    return fmt, alphas, distilled


def _lorc(w, result, meta):
    """{lorc_a, lorc_b} of LoRC's factors (float16, as stored) for a layer, or {} without LoRC."""
    if not meta.get("lorc_rank"):
        return {}
    a, b = low_rank_factors(w - result.dequantize(), meta["lorc_rank"])
    return {"lorc_a": a.astype(np.float16), "lorc_b": b.astype(np.float16)}


def alpha_summary(alphas):
    """One line on the alphas used (alpha "auto": how often each was chosen)."""
    if not alphas:
        return ""
    values, counts = np.unique(list(alphas.values()), return_counts=True)
    if len(values) == 1:
        return f"alpha {values[0]:g}"
    return "alpha auto: " + ", ".join(f"{v:g} x{c}" for v, c in zip(values, counts))


def check_not_given(method, **options):
    """QinferError naming the first option given (True / not None) that `method` does not take."""
    for name, value in options.items():
        if value:
            raise QinferError(f"{name} is not a {method} option (its weights are symmetric int8 per row or group, "
                              f"rounded to nearest; its activations int8 per token)")
