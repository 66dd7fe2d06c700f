"""ZeroQuant's layer-by-layer knowledge distillation (LKD; Yao et al., NeurIPS 2022, section 4.2).

Rounding each weight to its nearest grid point is not the rounding that best keeps a
block's output: LKD trains the quantized block, one block at a time, to reproduce the
float block's output on calibration text. Block k's student and teacher read the same
input (the float model's hidden states before block k, as in the paper's eq. 4), and
the loss is the mean squared difference of their outputs:

    L_k = mean((block_k^float(X_k) - block_k^quant(X_k))^2)

The student's latent weights are float; its forward pass rounds them to the layer's
grid (quant/symmetric.py, recomputed every step, so the scales follow the weights)
and every linear map's input to int8 per token, as the int8 kernels run them. Rounding
has no useful derivative, so the backward pass treats both roundings as the identity
(the straight-through estimator): the gradient is the one of the block run with the
rounded weights and inputs, applied to the latent weights by Adam. Only the linear maps
train; the norms, the residual path and the attention stay as the float model has them.

The forward and backward passes of a LLaMA block are numpy (float32; tests/test_lkd.py
checks them against finite differences in float64), one calibration window of T tokens
a step, the windows taken in a seeded order. The last EVAL_WINDOWS windows are held out (when
there are more): after the steps the block keeps the trained weights only when their
rounded form lowers the loss on them; otherwise the plain rounding stays (a learning
rate too high for the block, or training that only fits its windows, cannot make it worse).

The seed trains with learning rate 5e-6 for 600 steps; qinfer takes the steps from
--lkd-steps and the learning rate from --lkd-lr (default the seed's).
"""
import dataclasses

import numpy as np

from ..errors import QinferError
from ..kv_fisher import (_attention_probabilities, _heads, _per_kv_head, rmsnorm, rmsnorm_backward, rope, silu,
                         silu_backward)
from .smoothquant import per_token_int8

DEFAULT_LR = 5e-6
DEFAULT_CALIBRATION = (128, 512)     # windows x tokens when --lkd-steps is given
EVAL_WINDOWS = 4                     # held-out windows that judge a block's training (loss before, after)
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
MAPS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")     # model.LINEAR_NAMES' short names


def check_settings(steps, lr):
    """steps: an integer >= 1; lr: a positive number."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise QinferError(f"LKD's number of steps (--lkd-steps) must be an integer >= 1, got {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not np.isfinite(lr) or lr <= 0:
        raise QinferError(f"LKD's learning rate (--lkd-lr) must be a positive number, got {lr!r}")
    return int(steps), float(lr)


@dataclasses.dataclass
class BlockShape:
    """What a block's pass needs besides its weights: heads, kv_heads, head_dim, the RMSNorm
    epsilon, the norms' weights attn_norm and ffn_norm [dim], and RoPE's inv_freq [head_dim / 2]."""
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    attn_norm: np.ndarray
    ffn_norm: np.ndarray
    inv_freq: np.ndarray

    def rotations(self, T, dtype):
        """(cos, sin) [T, head_dim / 2] of positions 0..T-1."""
        angles = np.outer(np.arange(T, dtype=np.float64), self.inv_freq)
        return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def block_forward(w, shape, x, round_inputs=True):
    """(out [T, dim], saved) of block weights w {MAPS name: [out, in]} on x [T, dim] (positions
    0..T-1); round_inputs: each linear map's input rounded to int8 per token. saved is what
    block_backward needs."""
    T = len(x)
    nh, nkv, hd = shape.heads, shape.kv_heads, shape.head_dim
    cos, sin = shape.rotations(T, x.dtype)
    fq = per_token_int8 if round_inputs else (lambda a: a)

    xn, _ = rmsnorm(x, shape.attn_norm, shape.eps)
    a = fq(xn)
    q = (a @ w["wq"].T).reshape(T, nh, hd)
    k = (a @ w["wk"].T).reshape(T, nkv, hd)
    v = (a @ w["wv"].T).reshape(T, nkv, hd)
    group = nh // nkv
    qh, kh, vh = _heads(rope(q, cos, sin)), _heads(rope(k, cos, sin), group), _heads(v, group)
    p = _attention_probabilities(qh, kh)                                   # [heads, T, T]
    o = fq((p @ vh).transpose(1, 0, 2).reshape(T, nh * hd))
    x1 = x + o @ w["wo"].T
    xn2, r2 = rmsnorm(x1, shape.ffn_norm, shape.eps)
    m = fq(xn2)
    gate, up = m @ w["w_gate"].T, m @ w["w_up"].T
    h = fq(silu(gate) * up)
    out = x1 + h @ w["w_down"].T
    return out, (a, qh, kh, vh, p, o, x1, r2, m, gate, up, h)


def block_backward(w, shape, saved, dout):
    """{MAPS name: d loss / d weight} given dout = d loss / d out, for the pass block_forward
    saved (w: the weights it ran, the rounded ones; the roundings pass gradients straight through)."""
    a, qh, kh, vh, p, o, x1, r2, m, gate, up, h = saved
    T = len(dout)
    nh, nkv, hd = shape.heads, shape.kv_heads, shape.head_dim
    cos, sin = shape.rotations(T, dout.dtype)
    g = {}
    # MLP: out = x1 + h Wd^T, h = silu(gate) * up
    g["w_down"] = dout.T @ h
    dh = dout @ w["w_down"]
    dgate = dh * up * silu_backward(gate)
    dup = dh * silu(gate)
    g["w_gate"], g["w_up"] = dgate.T @ m, dup.T @ m
    dx1 = dout + rmsnorm_backward(x1, r2, shape.ffn_norm, dgate @ w["w_gate"] + dup @ w["w_up"])
    # attention: x1 = x + o Wo^T
    g["wo"] = dx1.T @ o
    doh = _heads((dx1 @ w["wo"]).reshape(T, nh, hd))
    dp = doh @ vh.transpose(0, 2, 1)
    dv = _per_kv_head(p.transpose(0, 2, 1) @ doh, nkv)
    dp -= np.sum(dp * p, axis=-1, keepdims=True)
    ds = p * dp
    ds *= np.asarray(1.0 / np.sqrt(hd), dtype=ds.dtype)
    dq = rope((ds @ kh).transpose(1, 0, 2), cos, -sin).reshape(T, nh * hd)
    dk = rope(_per_kv_head(ds.transpose(0, 2, 1) @ qh, nkv).reshape(T, nkv, hd), cos, -sin).reshape(T, nkv * hd)
    g["wq"], g["wk"], g["wv"] = dq.T @ a, dk.T @ a, dv.T @ a
    return g


def block_loss(w, shape, x, target, round_inputs=True):
    """The distillation loss, mean((out - target)^2), of weights w on one window."""
    out, _ = block_forward(w, shape, x, round_inputs)
    return float(np.mean((out - target) ** 2, dtype=np.float64))


class Adam:
    """Adam (Kingma and Ba 2015) over a dict of float32 arrays, updated in place."""

    def __init__(self, params, lr):
        self.params, self.lr, self.t = params, lr, 0
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}

    def step(self, grads):
        b1, b2 = ADAM_BETAS
        self.t += 1
        step = self.lr * np.sqrt(1 - b2 ** self.t) / (1 - b1 ** self.t)
        for k, g in grads.items():
            m, v = self.m[k], self.v[k]
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * (g * g)
            self.params[k] -= (step * m / (np.sqrt(v) + ADAM_EPS)).astype(np.float32)


@dataclasses.dataclass
class Distilled:
    """One block's LKD: its weights (the trained ones, or the originals when training did not
    help), the loss of the plain rounding and of the trained one on the evaluation windows,
    and whether the trained weights were kept."""
    weights: dict
    loss_before: float
    loss_after: float
    kept: bool


def distill_block(weights, shape, rounders, inputs, targets, steps, lr, round_inputs=True, seed=0,
                  on_step=None):
    """LKD of one block: weights {MAPS name: float32 [out, in]} (not modified), rounders {name:
    function w -> rounded w (dequantized)}, inputs and targets float32 [windows, T, dim] (the
    float block's input and output). on_step(): called after every step (progress)."""
    latent = {k: np.array(v, dtype=np.float32) for k, v in weights.items()}
    n = len(inputs)
    train, evaluate = (range(n - EVAL_WINDOWS), range(n - EVAL_WINDOWS, n)) if n > EVAL_WINDOWS else (range(n),) * 2

    def rounded(ws):
        return {k: rounders[k](ws[k]) for k in MAPS}

    def eval_loss(ws):
        wq = rounded(ws)
        return float(np.mean([block_loss(wq, shape, inputs[i], targets[i], round_inputs) for i in evaluate]))

    before = eval_loss(latent)
    adam = Adam(latent, lr)
    order = np.random.default_rng(seed).permutation(len(train))
    for step in range(steps):
        i = order[step % len(order)]
        wq = rounded(latent)
        out, saved = block_forward(wq, shape, inputs[i], round_inputs)
        dout = (out - targets[i]) * np.float32(2.0 / out.size)
        adam.step(block_backward(wq, shape, saved, dout))
        if on_step is not None:
            on_step()
    after = eval_loss(latent)
    if after < before:
        return Distilled(latent, before, after, True)
    return Distilled({k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}, before, after, False)


def distilled_blocks(source, windows, rounder_for, steps, lr, threads, progress, seed=0):
    """LKD of every block of the float model `source` in turn: yields each block's Distilled.
    windows int32 [n, T]: the calibration tokens; rounder_for(layer base name) -> the layer's
    rounding function; progress: a quant.progress.Progress (a bar per block)."""
    from ..model import LINEAR_NAMES, Model, rope_frequencies
    from .writer import float_weight

    nsamples, seqlen = windows.shape
    # the teacher keeps its keys and values in float32, as the student's numpy pass does
    model = Model(source, ctx=seqlen, threads=threads, dequantize=True, kv_cache="f32")
    cfg = model.config
    inv_freq = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    hidden = np.ascontiguousarray(model.embedding[windows], dtype=np.float32)       # [n, T, dim]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        with progress.layer(i, nsamples + steps) as bar:
            inputs = hidden.copy()
            for s in range(nsamples):                  # the teacher: hidden becomes block i's output
                model.run_layer(i, hidden[s], 0)
                bar.update()
            shape = BlockShape(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                               float(cfg.rms_norm_eps), float_weight(source, p + "input_layernorm.weight"),
                               float_weight(source, p + "post_attention_layernorm.weight"), inv_freq)
            weights = {k: float_weight(source, p + LINEAR_NAMES[k] + ".weight") for k in MAPS}
            rounders = {k: rounder_for(p + LINEAR_NAMES[k]) for k in MAPS}
            yield distill_block(weights, shape, rounders, inputs, hidden, steps, lr, seed=seed + i,
                                on_step=bar.update)
            del inputs


def summary(distilled):
    """One line on a run's LKD: the blocks' mean evaluation loss before and after, and how many
    blocks kept their trained weights."""
    before = np.mean([d.loss_before for d in distilled])
    after = np.mean([d.loss_before if not d.kept else d.loss_after for d in distilled])
    kept = sum(d.kept for d in distilled)
    return (f"LKD: mean block loss {before:.4g} -> {after:.4g} ({(after / before - 1) * 100:+.1f}%), "
            f"trained weights kept in {kept}/{len(distilled)} blocks")
