"""Rotating the residual stream before quantizing (QuaRot's and SpinQuant's "R1").

A LLaMA block reads the residual stream h only through RMSNorm, and
RMSNorm(h Q) = RMSNorm(h) Q for any orthogonal Q once the norm's gain g is
moved into the matrices that read its output. So the same function is
computed by a model whose residual stream is h Q, with (HF orientation,
W is [out, in], y = x W^T, h a row vector):

    embedding            E        ->  E Q
    q/k/v_proj           W        ->  W diag(g_attn) Q       input_layernorm   g_attn -> 1
    gate/up_proj         W        ->  W diag(g_mlp) Q        post_attn_norm    g_mlp  -> 1
    o_proj, down_proj    W        ->  Q^T W                  (they write into the stream)
    lm_head              E or L   ->  L diag(g_final) Q      model.norm        g_final -> 1

The rotated float model gives the same logits up to rounding, and nothing
runs at inference time: the checkpoint is an ordinary LLaMA checkpoint. What
changes is the weights the quantizer sees: every row of a matrix that reads
the stream becomes a random mix of its columns, so an outlier column (a
channel of h with large activations, hence large weights) is spread over all
of them and a group's min..max range fits its weights better (QuIP's
"incoherence"). It matters most at 3 and 2 bits, where a group's 8 or 4 levels
are spent on the range. The LM head can no longer share the embedding's table
(its gain differs), so the rotated model has an untied lm_head.

Q is a Haar-random orthogonal matrix drawn from a seed (the QR decomposition
of a Gaussian matrix, signs fixed by R's diagonal); quantize_config.json
records the seed, so the rotation can be drawn again.
"""
import dataclasses

import numpy as np

from ..readers.source import ModelSource

ATTN_INPUTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
MLP_INPUTS = ("mlp.gate_proj", "mlp.up_proj")
STREAM_WRITERS = ("self_attn.o_proj", "mlp.down_proj")


def random_orthogonal(n, seed):
    """A Haar-distributed float64 [n, n] orthogonal matrix from `seed`."""
    a = np.random.default_rng(seed).standard_normal((n, n))
    q, r = np.linalg.qr(a)
    return q * np.sign(np.diag(r))          # without the signs, QR's Q is not uniformly distributed


def rotated_source(source, seed=0):
    """The same model with its residual stream rotated by random_orthogonal(hidden_size, seed):
    a ModelSource of lazy float32 tensors (norm gains 1, an untied lm_head)."""
    from .writer import float_weight

    cfg = source.config
    rotation = random_orthogonal(cfg.hidden_size, seed)

    def weight(name):
        return np.asarray(float_weight(source, name), dtype=np.float64)

    def reads_stream(name, norm):          # W diag(g) Q
        return lambda: ((weight(name) * weight(norm)[None, :]) @ rotation).astype(np.float32)

    def writes_stream(name):               # Q^T W
        return lambda: (rotation.T @ weight(name)).astype(np.float32)

    def ones(name):
        return lambda: np.ones(cfg.hidden_size, dtype=np.float32)

    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    tensors = {"model.embed_tokens.weight": lambda: (weight("model.embed_tokens.weight") @ rotation).astype(np.float32),
               "lm_head.weight": reads_stream(head, "model.norm.weight"),
               "model.norm.weight": ones("model.norm.weight")}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for norm, inputs in (("input_layernorm", ATTN_INPUTS), ("post_attention_layernorm", MLP_INPUTS)):
            for proj in inputs:
                tensors[f"{p}{proj}.weight"] = reads_stream(f"{p}{proj}.weight", f"{p}{norm}.weight")
            tensors[f"{p}{norm}.weight"] = ones(f"{p}{norm}.weight")
        for proj in STREAM_WRITERS:
            tensors[f"{p}{proj}.weight"] = writes_stream(f"{p}{proj}.weight")
    config = dataclasses.replace(cfg, tie_word_embeddings=False)
    return dataclasses.replace(source, config=config, tensors=tensors, keepalive=list(source.keepalive))
