"""A llama-architecture GGUF file -> ModelSource (config, HF-named tensors, tokenizer).

Reads the structure with readers/gguf.py, then:
  * builds ModelConfig from the `llama.*` and `tokenizer.ggml.*` keys (each
    checked by type before use);
  * maps llama.cpp tensor names to Hugging Face names; GGUF dims are reversed
    relative to numpy, so GGUF [ne0 = in, ne1 = out] is the HF [out, in] matrix;
  * F32 -> float views on the map, F16 -> lazy float32, the quantized block
    formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants Q2_K..Q6_K) ->
    PackedTensor (readers/ggml_quants.py);
  * undoes llama.cpp's q/k row permutation (readers/rope_order.py).
"""
import re

from gguf.constants import GGMLQuantizationType as T

from ..errors import FormatError, UnsupportedError
from . import rope_scaling, validate
from .ggml_quants import lazy_packed
from .gguf import read_gguf
from .lazy import lazy_f16
from .rope_order import unpermute
from .source import ModelConfig, ModelSource, TokenizerSpec

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(0|[1-9][0-9]*)\.([a-z_]+)\.weight")
ROPE_FREQS = "rope_freqs.weight"      # Llama 3 RoPE scaling, folded into the config
_DEFAULT_ORIGINAL_CONTEXT = 8192      # Llama 3's; any value gives the same divisors (rope_scaling.py)


def hf_name(gguf_name):
    """llama.cpp tensor name -> Hugging Face name, or None if it is not a LLaMA weight."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
    return None


def load_gguf(path):
    gf = read_gguf(path)
    arch = gf.get_str("general.architecture", required=True)
    if arch != "llama":
        raise UnsupportedError(f"{path}: architecture {arch!r} is not supported (qinfer loads 'llama' GGUF files)")
    config = _config(gf)
    validate.check_config(config, path)
    tensors = _tensors(gf)
    # Shapes first: the q/k row permutation below relies on them.
    validate.check_tensors(config, tensors, path)
    _to_hf_row_order(tensors, config)
    tokenizer = TokenizerSpec(kind="gguf", gguf_metadata={
        key: v.to_python() for key, v in gf.kv.items() if key.startswith("tokenizer.")})
    return ModelSource(path=path, format="gguf", config=config, tensors=tensors, tokenizer=tokenizer,
                       chat_template=gf.get_str("tokenizer.chat_template"), keepalive=[gf.mmap])


def _config(gf):
    key = "llama."
    hidden = gf.get_int(key + "embedding_length", required=True, minimum=1)
    n_head = gf.get_int(key + "attention.head_count", required=True, minimum=1)
    n_kv = gf.get_int(key + "attention.head_count_kv", default=n_head, minimum=1)
    head_dim = gf.get_int(key + "attention.key_length", default=None, minimum=1)
    rope_dim = gf.get_int(key + "rope.dimension_count", default=None, minimum=1)
    if head_dim is None and rope_dim is None and hidden % n_head:
        raise FormatError(f"{gf.path}: {key}embedding_length {hidden} is not a multiple of "
                          f"{key}attention.head_count {n_head} and no {key}attention.key_length is given")
    if head_dim is None:
        head_dim = rope_dim if rope_dim is not None else hidden // n_head
    if rope_dim is not None and rope_dim != head_dim:
        raise UnsupportedError(f"{gf.path}: partial rotary embeddings (rope.dimension_count {rope_dim} != "
                               f"head_dim {head_dim}) are not supported")
    value_dim = gf.get_int(key + "attention.value_length", default=head_dim, minimum=1)
    if value_dim != head_dim:
        raise UnsupportedError(f"{gf.path}: attention.value_length {value_dim} != key_length {head_dim} "
                               f"is not supported")

    # Mixtral-style GGUFs say "llama" too; their experts would otherwise surface as unknown tensors.
    experts = gf.get_int(key + "expert_count", default=0, minimum=0)
    if experts:
        raise UnsupportedError(f"{gf.path}: {key}expert_count {experts} (a mixture of experts) is not supported")

    vocab = gf.get_int(key + "vocab_size", minimum=1)
    n_tokens = gf.get_array_len("tokenizer.ggml.tokens")
    if vocab is not None and n_tokens is not None and vocab != n_tokens:
        raise FormatError(f"{gf.path}: {key}vocab_size is {vocab} but tokenizer.ggml.tokens lists {n_tokens} tokens")
    if vocab is None:
        vocab = n_tokens
    if vocab is None:
        raise FormatError(f"{gf.path}: neither llama.vocab_size nor tokenizer.ggml.tokens gives the vocabulary size")

    theta = gf.get_float(key + "rope.freq_base", default=10000.0, positive=True)
    eos = []
    for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        t = gf.get_int(k, minimum=0)
        if t is not None and t not in eos:
            eos.append(t)
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=gf.get_int(key + "feed_forward_length", required=True, minimum=1),
        num_hidden_layers=gf.get_int(key + "block_count", required=True, minimum=1),
        num_attention_heads=n_head,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        rms_norm_eps=gf.get_float(key + "attention.layer_norm_rms_epsilon", required=True, positive=True),
        rope_theta=theta,
        rope_scaling=_rope_scaling(gf, theta, head_dim),
        max_position_embeddings=gf.get_int(key + "context_length", default=2048, minimum=1),
        tie_word_embeddings="output.weight" not in gf.tensors,
        bos_token_id=gf.get_int("tokenizer.ggml.bos_token_id", minimum=0),
        eos_token_ids=eos,
    )


def _rope_scaling(gf, theta, head_dim):
    kind = gf.get_str("llama.rope.scaling.type", default="none")
    if kind != "none":
        factor = gf.get_float("llama.rope.scaling.factor", default=1.0)
        if factor != 1.0:
            raise UnsupportedError(f"{gf.path}: RoPE scaling type {kind!r} is not supported")
    if ROPE_FREQS not in gf.tensors:
        return None
    info = gf.tensors[ROPE_FREQS]
    if info.type != T.F32 or len(info.shape) != 1:
        raise FormatError(f"{gf.path}: {ROPE_FREQS} must be a 1-D F32 tensor, got {info.type.name} {list(info.shape)}")
    original = gf.get_int("llama.rope.scaling.original_context_length", default=_DEFAULT_ORIGINAL_CONTEXT, minimum=1)
    divisors = gf.raw(ROPE_FREQS).view("<f4")
    return rope_scaling.from_gguf_divisors(divisors, theta, head_dim, original, gf.path)


def _tensors(gf):
    tensors = {}
    for name, info in gf.tensors.items():
        if name == ROPE_FREQS:
            continue
        target = hf_name(name)
        if target is None:
            raise UnsupportedError(f"{gf.path}: tensor {name!r} is not part of a LLaMA model qinfer supports")
        tensors[target] = _tensor(gf, info)
    return tensors


def _to_hf_row_order(tensors, config):
    """q uses the query head count, k the key/value head count (they differ under GQA)."""
    for i in range(config.num_hidden_layers):
        q = f"model.layers.{i}.self_attn.q_proj.weight"
        k = f"model.layers.{i}.self_attn.k_proj.weight"
        tensors[q] = unpermute(tensors[q], config.num_attention_heads)
        tensors[k] = unpermute(tensors[k], config.num_key_value_heads)


def _tensor(gf, info):
    raw = gf.raw(info.name)
    shape = info.numpy_shape
    if info.type == T.F32:
        return raw.view("<f4").reshape(shape)
    if info.type == T.F16:
        return lazy_f16(raw.view("<f2").reshape(shape))
    if len(shape) != 2:
        raise UnsupportedError(f"{gf.path}: tensor {info.name!r} is {info.type.name} with {len(shape)} "
                               f"dimensions; only 2-D matrices may be quantized")
    out_features, in_features = shape
    return lazy_packed(info.type, raw, out_features, in_features, what=f"{gf.path}: tensor {info.name!r}")
