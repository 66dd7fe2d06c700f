"""KVQuant's sensitivity weights: how much each key and value of a calibration sequence
matters to the loss, the squared gradient of the next-token loss with respect to it
(a diagonal Fisher information estimate, Hooper et al. 2024, section 3.3).

qinfer's forward pass has no backward, so this module runs one in numpy: the model's
weights as it runs them (packed weights dequantized), float32, a whole sequence at a
time. For a sequence of T tokens it returns, for every layer, d loss / d k and
d loss / d v squared, [T, kv_heads * head_dim], where k is the key BEFORE RoPE (what
kvquant quantizes) and loss is the mean next-token negative log-likelihood over the
sequence. kv_calibration.fit_levels weights its k-means by them: levels go where
the values that move the loss are, not merely where values are many.

The pass, per block, as qinfer and Hugging Face compute it (rotate-half RoPE):

    xn = rmsnorm(x) g_attn;  q, k, v = xn Wq^T, xn Wk^T, xn Wv^T;  qr, kr = rope(q), rope(k)
    P_h = softmax(qr_h kr_g^T / sqrt(hd) + causal);  x += concat_h(P_h v_g) Wo^T
    xn2 = rmsnorm(x) g_ffn;  x += (silu(xn2 Wg^T) * (xn2 Wu^T)) Wd^T

then logits = rmsnorm(x) g_final E^T. The backward goes through it in reverse with
the attention probabilities recomputed per block (T^2 per head, not kept for all blocks).
(tests/test_kv_fisher.py holds it against finite differences of tests/llama_reference.py.)
"""
import numpy as np

from .errors import QinferError


class FisherError(QinferError):
    """The sensitivity weights cannot be computed for this model or input."""


def rmsnorm(x, g, eps):
    r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return x * r * g, r


def rmsnorm_backward(x, r, g, dy):
    """d/dx of y = x r(x) g, r = (mean(x^2) + eps)^-1/2, given dy."""
    u = dy * g
    return r * u - x * (r ** 3) * np.mean(x * u, axis=-1, keepdims=True)


def rope(x, cos, sin):
    """x [T, heads, hd] rotated per position (rotate-half); cos, sin [T, hd/2]. With -sin:
    the rotation back, which is also rope's transpose (its backward)."""
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)


def silu(z):
    with np.errstate(over="ignore"):          # exp(-z) = inf for very negative z gives the right 0
        return z / (1.0 + np.exp(-z))


def silu_backward(z):
    with np.errstate(over="ignore"):
        s = 1.0 / (1.0 + np.exp(-z))
    return s * (1.0 + z * (1.0 - s))


class Weights:
    """A LLaMA model's float32 weights for the numpy pass: layers[i] a dict of wq, wk, wv,
    wo, w_gate, w_up, w_down ([out, in]) and attn_norm, ffn_norm; embedding, final_norm,
    lm_head; eps, heads, kv_heads, head_dim, inv_freq."""

    def __init__(self, layers, embedding, final_norm, lm_head, eps, heads, kv_heads, head_dim, inv_freq):
        self.layers, self.embedding, self.final_norm, self.lm_head = layers, embedding, final_norm, lm_head
        self.eps, self.heads, self.kv_heads, self.head_dim = eps, heads, kv_heads, head_dim
        self.inv_freq = np.asarray(inv_freq, dtype=np.float64)


def _heads(x, group=1):
    """[T, heads, hd] -> [heads * group, T, hd] (each head repeated group times: GQA)."""
    x = np.ascontiguousarray(x.transpose(1, 0, 2))
    return np.repeat(x, group, axis=0) if group > 1 else x


def _attention_probabilities(qh, kh):
    """P [heads, T, T] of one block (causal softmax) from qh, kh [heads, T, hd]."""
    T, hd = qh.shape[1], qh.shape[2]
    scores = qh @ kh.transpose(0, 2, 1)
    scores *= np.asarray(1.0 / np.sqrt(hd), dtype=scores.dtype)
    scores += np.triu(np.full((T, T), -np.inf, dtype=scores.dtype), k=1)
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores


def _per_kv_head(xh, kv_heads):
    """[heads, T, hd] summed over each KV head's group -> [T, kv_heads * hd]."""
    heads, T, hd = xh.shape
    return xh.reshape(kv_heads, heads // kv_heads, T, hd).sum(axis=1).transpose(1, 0, 2).reshape(T, kv_heads * hd)


def key_value_fisher(weights, ids):
    """(fk, fv): [layers, T, kv_heads * head_dim] float32, the squared gradients of the
    mean next-token loss of token ids [T] (T >= 2) with respect to each block's keys
    (before RoPE) and values."""
    w = weights
    ids = np.asarray(ids)
    T = len(ids)
    if T < 2:
        raise FisherError("a sequence needs at least two tokens for a next-token loss")
    nh, nkv, hd = w.heads, w.kv_heads, w.head_dim
    group = nh // nkv
    angles = np.outer(np.arange(T, dtype=np.float64), w.inv_freq)
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)

    # forward, keeping what the backward needs
    x = w.embedding[ids].astype(np.float32)
    saved = []
    for lw in w.layers:
        xn, r1 = rmsnorm(x, lw["attn_norm"], w.eps)
        q = (xn @ lw["wq"].T).reshape(T, nh, hd)
        k = (xn @ lw["wk"].T).reshape(T, nkv, hd)
        v = (xn @ lw["wv"].T).reshape(T, nkv, hd)
        qh, kh, vh = _heads(rope(q, cos, sin)), _heads(rope(k, cos, sin), group), _heads(v, group)
        att = (_attention_probabilities(qh, kh) @ vh).transpose(1, 0, 2).reshape(T, nh * hd)
        x1 = x + att @ lw["wo"].T
        xn2, r2 = rmsnorm(x1, lw["ffn_norm"], w.eps)
        gate, up = xn2 @ lw["w_gate"].T, xn2 @ lw["w_up"].T
        x2 = x1 + (silu(gate) * up) @ lw["w_down"].T
        saved.append((x, r1, qh, kh, vh, x1, r2, gate, up))
        x = x2
    xf, rf = rmsnorm(x, w.final_norm, w.eps)
    logits = xf @ w.lm_head.T                                       # [T, vocab]

    # loss = mean over t < T-1 of -log softmax(logits[t])[ids[t+1]]
    logits -= logits.max(axis=-1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=-1, keepdims=True)
    probs[np.arange(T - 1), ids[1:]] -= 1.0
    probs[T - 1] = 0.0
    probs /= np.float32(T - 1)
    dx = rmsnorm_backward(x, rf, w.final_norm, probs @ w.lm_head)
    del logits, probs

    fk = np.empty((len(w.layers), T, nkv * hd), dtype=np.float32)
    fv = np.empty_like(fk)
    for i in reversed(range(len(w.layers))):
        lw = w.layers[i]
        x0, r1, qh, kh, vh, x1, r2, gate, up = saved.pop()
        # MLP
        da = dx @ lw["w_down"]
        dgate = da * up * silu_backward(gate)
        dup = da * silu(gate)
        dx = dx + rmsnorm_backward(x1, r2, lw["ffn_norm"], dgate @ lw["w_gate"] + dup @ lw["w_up"])
        # attention, heads first: [heads, T, hd]
        doh = _heads((dx @ lw["wo"]).reshape(T, nh, hd))
        p = _attention_probabilities(qh, kh)                          # [heads, T, T]
        dp = doh @ vh.transpose(0, 2, 1)
        dv = _per_kv_head(p.transpose(0, 2, 1) @ doh, nkv)
        dp -= np.sum(dp * p, axis=-1, keepdims=True)
        ds = p * dp
        ds *= np.asarray(1.0 / np.sqrt(hd), dtype=ds.dtype)
        del p, dp
        dqr = (ds @ kh).transpose(1, 0, 2)                            # [T, heads, hd]
        dkr = _per_kv_head(ds.transpose(0, 2, 1) @ qh, nkv).reshape(T, nkv, hd)
        del ds
        dq, dk = rope(dqr, cos, -sin), rope(dkr, cos, -sin)
        fk[i] = (dk * dk).reshape(T, nkv * hd)
        fv[i] = dv * dv
        dxn = dq.reshape(T, nh * hd) @ lw["wq"] + dk.reshape(T, nkv * hd) @ lw["wk"] + dv @ lw["wv"]
        dx = dx + rmsnorm_backward(x0, r1, lw["attn_norm"], dxn)
    return fk, fv


def model_weights(model, source):
    """Weights of a loaded model.Model (and its ModelSource) as it runs them, float32."""
    from .kv_calibration import linear_weight
    from .model import LINEAR_NAMES, rope_frequencies
    from .quant.writer import float_weight

    cfg = model.config
    layers = []
    for i in range(cfg.num_hidden_layers):
        lw = {name: linear_weight(model, source, f"model.layers.{i}.{LINEAR_NAMES[name]}.weight")
              for name in LINEAR_NAMES}
        lw["attn_norm"] = float_weight(source, f"model.layers.{i}.input_layernorm.weight").astype(np.float32)
        lw["ffn_norm"] = float_weight(source, f"model.layers.{i}.post_attention_layernorm.weight").astype(np.float32)
        layers.append(lw)
    embedding = np.asarray(model.embedding, dtype=np.float32)
    lm_head = embedding if cfg.tie_word_embeddings else linear_weight(model, source, "lm_head.weight")
    return Weights(layers, embedding, float_weight(source, "model.norm.weight").astype(np.float32), lm_head,
                   float(cfg.rms_norm_eps), cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                   rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
