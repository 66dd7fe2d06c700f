"""SmoothQuant (Xiao et al., ICML 2023): move the activations' outlier channels into the weights.

A few input channels of q/k/v and gate/up carry activations far larger than the rest,
which rounding each token to int8 (one scale a row) cannot represent without losing the
small ones. Per input channel j of a group of linear maps that read the same normalized
input, SmoothQuant divides the input by

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)      (each factor clamped at 1e-5)

and multiplies column j of every map in the group by it. max|X_j| is calibrated on text,
max|W_j| is the column's largest weight across the maps of the group. The input is
the output of an RMSNorm, so the division goes into the norm's weight: the smoothed
float model is the same function (test_smoothquant.py), and only the ranges change.

    input_layernorm           -> q_proj, k_proj, v_proj
    post_attention_layernorm  -> gate_proj, up_proj

(o_proj and down_proj read no norm's output and stay as they are, as in the paper.)
alpha 0.5 is the paper's default; "auto" tries ALPHA_GRID per group and keeps the alpha
whose W8A8 product (per-token int8 input, per-row int8 weights) is closest to the float
one on the calibration rows (sum of squared errors over the group's maps).
"""
import dataclasses

import numpy as np

from ..errors import QinferError
from .symmetric import symmetric_quantize

# (capture name of Model.run_layer, the norm whose output it is, the maps that read it)
GROUPS = (("attn_in", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
          ("mlp_in", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")))
# With `down` (beyond the paper): down_proj's input is silu(gate) * up, so dividing up_proj's
# output rows by s divides it exactly: the same smoothing for down_proj
DOWN_GROUP = ("down_in", "mlp.up_proj", ("mlp.down_proj",))
CLAMP = 1e-5
DEFAULT_ALPHA = 0.5
ALPHA_GRID = tuple(round(0.1 * i, 1) for i in range(11))
SAMPLE_ROWS = 256          # calibration rows kept per group and layer for alpha "auto"


def check_alpha(alpha):
    """alpha: a number in [0, 1], or "auto"."""
    if alpha == "auto":
        return alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise QinferError(f"SmoothQuant's alpha must be a number in [0, 1] or 'auto', got {alpha!r}")
    return float(alpha)


def smoothing_factors(act_max, weights, alpha):
    """s [in] for the calibrated max|X_j| act_max [in] and the group's weights ([out_i, in] each)."""
    w_max = np.max([np.abs(w).max(axis=0) for w in weights], axis=0)
    a = np.maximum(np.asarray(act_max, dtype=np.float64), CLAMP)
    s = a ** alpha / np.maximum(w_max.astype(np.float64), CLAMP) ** (1 - alpha)
    return np.maximum(s, CLAMP).astype(np.float32)


@dataclasses.dataclass
class Statistics:
    """What smoothing needs from the calibration text, per block i and capture name:
    act_max[i][name] float32 [in] and (alpha "auto") sample[i][name] float32 [rows, in]."""
    act_max: list
    sample: list


def groups_for(down):
    """The smoothing groups: GROUPS, and DOWN_GROUP when `down`."""
    return GROUPS + ((DOWN_GROUP,) if down else ())


def calibrate(source, windows, threads, progress, keep_sample, groups=GROUPS):
    """Run the float model over the windows, block by block, recording each group's input maxima
    (and a seeded sample of its rows when keep_sample)."""
    from ..model import Model

    nsamples, seqlen = windows.shape
    model = Model(source, ctx=seqlen, threads=threads, dequantize=True)
    cfg = model.config
    width = {"attn_in": cfg.hidden_size, "mlp_in": cfg.hidden_size, "down_in": cfg.intermediate_size}
    keys = [k for k, _, _ in groups]
    n_layers = cfg.num_hidden_layers
    hidden = np.ascontiguousarray(model.embedding[windows], dtype=np.float32)      # [nsamples, seqlen, dim]
    act_max = [{k: np.zeros(width[k], np.float32) for k in keys} for _ in range(n_layers)]
    sample = [{k: [] for k in keys} for _ in range(n_layers)]
    rng = np.random.default_rng(0)
    per_window = max(1, -(-SAMPLE_ROWS // nsamples))
    picks = [np.sort(rng.choice(seqlen, size=min(per_window, seqlen), replace=False)) for _ in range(nsamples)]
    captures = {k: np.empty((seqlen, width[k]), np.float32) for k in keys}
    for i in range(n_layers):
        with progress.layer(i, nsamples) as bar:
            for s in range(nsamples):
                model.run_layer(i, hidden[s], 0, captures)
                for k in keys:
                    np.maximum(act_max[i][k], np.abs(captures[k]).max(axis=0), out=act_max[i][k])
                    if keep_sample:
                        sample[i][k].append(captures[k][picks[s]].copy())
                bar.update()
    if keep_sample:
        sample = [{k: np.concatenate(v)[:SAMPLE_ROWS] for k, v in layer.items()} for layer in sample]
    return Statistics(act_max, sample if keep_sample else None)


def per_token_int8(x):
    """x [rows, in] rounded as the kernels round it: d = max|x| / 127 per row, round half to even."""
    x = np.asarray(x, dtype=np.float32)
    d = (np.abs(x).max(axis=1) / np.float32(127)).astype(np.float32)
    inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, np.float32(1)), np.float32(0)).astype(np.float32)
    return np.clip(np.rint(x * inv[:, None]), -127, 127) * d[:, None]


def w8a8_error(x, weights, s):
    """Sum of squared differences between x W^T and its W8A8 form after smoothing by s, over the maps."""
    xs = per_token_int8(x / s)
    err = 0.0
    for w in weights:
        wq = symmetric_quantize(w * s, 8, -1).dequantize()
        err += float(((x @ w.T - xs @ wq.T) ** 2).sum())
    return err


def choose_alpha(act_max, weights, sample):
    """The alpha of ALPHA_GRID with the smallest w8a8_error on the sample rows."""
    errors = [w8a8_error(sample, weights, smoothing_factors(act_max, weights, a)) for a in ALPHA_GRID]
    return ALPHA_GRID[int(np.argmin(errors))]


def smooth(source, stats, alpha, float_weight, groups=GROUPS):
    """The smoothed tensors {name: float32 array, or a function returning one} (the weights
    that divide: norm weights, or up_proj for DOWN_GROUP; and the groups' maps, computed when
    read: a 7B model's smoothed maps would not fit in memory at once) and the alpha each
    group used {"model.layers.{i}.<divisor>": alpha}; float_weight(name) reads a tensor of
    the source as float32."""
    out, alphas = {}, {}
    for i in range(source.config.num_hidden_layers):
        p = f"model.layers.{i}."
        for key, divisor, maps in groups:
            weights = [float_weight(p + m + ".weight") for m in maps]
            a = choose_alpha(stats.act_max[i][key], weights, stats.sample[i][key]) if alpha == "auto" else alpha
            s = smoothing_factors(stats.act_max[i][key], weights, a)
            for m in maps:
                out[p + m + ".weight"] = _scaled(out.get(p + m + ".weight"), float_weight, p + m + ".weight", s)
            name = p + divisor + ".weight"
            if divisor.endswith("layernorm"):
                out[name] = (float_weight(name) / s).astype(np.float32)
            else:      # a map's output rows (up_proj, already smoothed on its inputs by the mlp group)
                out[name] = _scaled(out.get(name), float_weight, name, 1 / s[:, None])
            alphas[p + divisor] = a
    return out, alphas


def _scaled(before, float_weight, name, s):
    """A function returning the weight `name` times s (broadcast: s [in] scales columns, s [out, 1]
    rows), on top of the earlier smoothing `before` (a function, or None: the source's weight)."""
    read = before if before is not None else (lambda: float_weight(name))
    s = s[None, :] if s.ndim == 1 else s
    return lambda: np.ascontiguousarray(read() * s, dtype=np.float32)


def smoothed_source(source, tensors):
    """The source with `tensors` in place of its own (the same model, smoothed)."""
    return dataclasses.replace(source, tensors={**source.tensors, **tensors})
