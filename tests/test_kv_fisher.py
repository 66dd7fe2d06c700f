"""KVQuant's sensitivity weights (qinfer/kv_fisher.py): the numpy backward's gradients
against finite differences of the independent float64 forward of tests/llama_reference.py,
and the weighted k-means they feed (qinfer/kv_calibration.py, fit_levels)."""
import numpy as np
import pytest

from qinfer.kv_calibration import fit_levels
from qinfer.kv_fisher import FisherError, Weights, key_value_fisher

import llama_reference as ref

CONFIG = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, vocab_size=40, rms_norm_eps=1e-5, rope_theta=10000.0,
              tie_word_embeddings=False)


def weights_of(w, cfg):
    layers = []
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        layers.append(dict(wq=w[p + "self_attn.q_proj.weight"], wk=w[p + "self_attn.k_proj.weight"],
                           wv=w[p + "self_attn.v_proj.weight"], wo=w[p + "self_attn.o_proj.weight"],
                           w_gate=w[p + "mlp.gate_proj.weight"], w_up=w[p + "mlp.up_proj.weight"],
                           w_down=w[p + "mlp.down_proj.weight"], attn_norm=w[p + "input_layernorm.weight"],
                           ffn_norm=w[p + "post_attention_layernorm.weight"]))
    return Weights(layers, w["model.embed_tokens.weight"], w["model.norm.weight"], w["lm_head.weight"],
                   cfg["rms_norm_eps"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"],
                   ref.rope_inv_freq(cfg["head_dim"], cfg["rope_theta"]))


def nudged_loss(w, cfg, ids, layer, kind, t, c, delta):
    """The reference's mean next-token loss with the pre-RoPE key (kind 0) or the value
    (kind 1) of position t, channel c (over kv_heads * head_dim) of block `layer` moved by
    delta. The reference hands its keys after RoPE to kv_round: a pre-RoPE channel c moved
    by delta is the rotated key moved by delta times column c of the rotation."""
    hd = cfg["head_dim"]
    inv_freq = ref.rope_inv_freq(hd, cfg["rope_theta"])
    calls = []

    def nudge(x):
        call = len(calls)
        calls.append(call)
        if call != 2 * layer + kind:
            return x
        x = x.copy()
        head, i = divmod(c, hd)
        if kind == 1:
            x[t, head, i] += delta
            return x
        angle = t * inv_freq[i % (hd // 2)]
        partner = i + hd // 2 if i < hd // 2 else i - hd // 2
        x[t, head, i] += delta * np.cos(angle)
        x[t, head, partner] += delta * np.sin(angle) * (1 if i < hd // 2 else -1)
        return x

    logits = ref.forward(w, cfg, ids, kv_round=nudge)
    logits = logits - logits.max(axis=-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    return -np.mean(logp[np.arange(len(ids) - 1), ids[1:]])


def test_the_gradients_match_finite_differences():
    w = ref.random_weights(CONFIG, seed=3)
    for name in w:                       # larger activations: gradients well above float32's noise
        if name.endswith("proj.weight"):
            w[name] = w[name] * 4
    ids = np.random.default_rng(1).integers(0, CONFIG["vocab_size"], size=11)
    fk, fv = key_value_fisher(weights_of(w, CONFIG), ids)
    assert fk.shape == fv.shape == (2, 11, 16)
    rng = np.random.default_rng(2)
    checked = 0
    for layer in (0, 1):
        for kind, fisher in ((0, fk), (1, fv)):
            for _ in range(6):
                t, c = int(rng.integers(0, 10)), int(rng.integers(0, 16))
                h = 1e-4
                g = (nudged_loss(w, CONFIG, ids, layer, kind, t, c, h)
                     - nudged_loss(w, CONFIG, ids, layer, kind, t, c, -h)) / (2 * h)
                assert np.sqrt(fisher[layer, t, c]) == pytest.approx(abs(g), rel=2e-2, abs=1e-6), \
                    (layer, kind, t, c)
                checked += abs(g) > 1e-4
    assert checked >= 12                 # most of them are real gradients, not zeros


def test_the_last_position_does_not_move_the_loss():
    """Causality: position t's key and value reach the loss only through the predictions
    of positions >= t; the last position predicts nothing the loss counts, so its keys and
    values weigh 0, and every earlier one weighs something."""
    w = ref.random_weights(CONFIG, seed=4)
    ids = np.random.default_rng(5).integers(0, CONFIG["vocab_size"], size=8)
    fk, fv = key_value_fisher(weights_of(w, CONFIG), ids)
    assert np.all(fv[:, -1] == 0) and np.all(fk[:, -1] == 0)
    assert np.all(fv[:, :-1].sum(axis=-1) > 0)


def test_one_token_is_refused():
    w = ref.random_weights(CONFIG, seed=4)
    with pytest.raises(FisherError, match="at least two tokens"):
        key_value_fisher(weights_of(w, CONFIG), [3])


def weighted_lloyd(x, wt, levels, steps=200):
    """The test's own weighted k-means in 1-D: plain loops over clusters."""
    for _ in range(steps):
        owner = np.argmin(np.abs(x[:, None] - levels[None, :]) + 1e-12 * np.arange(len(levels)), axis=1)
        new = np.array([np.sum(wt[owner == j] * x[owner == j]) / np.sum(wt[owner == j])
                        if np.sum(wt[owner == j]) > 0 else levels[j] for j in range(len(levels))])
        if np.allclose(new, levels, atol=0, rtol=0):
            break
        levels = new
    return np.sort(levels)


def test_weighted_levels_follow_the_weights():
    rng = np.random.default_rng(0)
    x = np.clip(rng.normal(0, 0.4, 4000), -1, 1)
    wt = np.exp(3 * x)                   # the right side matters more
    plain, weighted = fit_levels(x, 4), fit_levels(x, 4, weights=wt)
    want = weighted_lloyd(x, wt, np.quantile(x, (np.arange(4) + 0.5) / 4))
    np.testing.assert_allclose(weighted, want, atol=1e-5)
    assert weighted.mean() > plain.mean() + 0.05
    np.testing.assert_array_equal(fit_levels(x, 4, weights=np.ones_like(x)), plain)


@pytest.mark.parametrize("bad", [np.ones(3), -np.ones(10), np.zeros(10), np.full(10, np.nan)])
def test_bad_weights_are_refused(bad):
    from qinfer.kv_calibration import CalibrationError
    with pytest.raises(CalibrationError, match="weights"):
        fit_levels(np.linspace(-1, 1, 10), 2, weights=bad)
