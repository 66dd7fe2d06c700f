"""llama.cpp's Q5_0/Q5_1 and K-quant tensors (Q2_K..Q6_K) through qinfer, against the gguf package.

The reference for every weight is `gguf.quants.dequantize` of the same bytes
(the gguf package's own decoder, written apart from qinfer's). The blocks are
random bytes whose float16 fields the test sets to sane values: the field
offsets below are the test's own reading of ggml-common.h, so a decoder
that reads a field from the wrong place fails. Tensors go through the
kernels too (qgemv and qgemm against float64 x @ W^T), and a tiny GGUF model
made of such tensors runs against tests/llama_reference.py.
"""
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.constants import GGML_QUANT_SIZES  # noqa: E402
from gguf.quants import dequantize  # noqa: E402

import llama_reference as ref  # noqa: E402
from qinfer import QuantizedLinear  # noqa: E402
from qinfer.errors import FormatError, QinferError  # noqa: E402
from qinfer.model import Model  # noqa: E402
from qinfer.readers import PackedTensor, open_model  # noqa: E402
from qinfer.readers.ggml_quants import to_packed  # noqa: E402

# type: (bits qinfer keeps, inputs per group, byte offsets of the block's float16 fields)
KQUANTS = {
    Q.Q5_0: (5, 32, (0,)),
    Q.Q5_1: (5, 32, (0, 2)),
    Q.Q2_K: (2, 16, (80, 82)),
    Q.Q3_K: (3, 16, (108,)),
    Q.Q4_K: (4, 32, (0, 2)),
    Q.Q5_K: (5, 32, (0, 2)),
    Q.Q6_K: (6, 16, (208,)),
    # the formats qinfer read before: the same test holds for them
    Q.Q4_0: (4, 32, (0,)),
    Q.Q4_1: (4, 32, (0, 2)),
    Q.Q8_0: (8, 32, (0,)),
}
# Where a K-quant's per-group scales sit, to plant a zero-scale (constant) group:
# (byte offset, value that makes group 0's multiplier 0) -- Q2_K: scales[0] low nibble;
# Q4_K/Q5_K: scales[0] & 63 (group 0's sc).
ZERO_SCALE = {Q.Q2_K: 0, Q.Q4_K: 4, Q.Q5_K: 4}


def random_blocks(qtype, rows, in_features, seed=0, scale=0.01):
    """Random blocks with finite, moderate float16 fields: [rows, in_features / block * block_bytes] uint8."""
    rng = np.random.default_rng(seed)
    block, nbytes = GGML_QUANT_SIZES[qtype]
    n = in_features // block
    b = rng.integers(0, 256, size=(rows, n, nbytes), dtype=np.uint8)
    for at in KQUANTS[qtype][2]:
        v = (rng.uniform(0.2, 1.0, size=(rows, n)) * scale).astype("<f2")
        if at == 2 and qtype in (Q.Q4_1, Q.Q5_1):
            v = -v                                   # a negative minimum, as real rows have
        b[:, :, at:at + 2] = v.view(np.uint8).reshape(rows, n, 2)
    if qtype in ZERO_SCALE:
        at = ZERO_SCALE[qtype]
        mask = np.uint8(0xF0 if qtype == Q.Q2_K else 0xC0)
        b[0, 0, at] &= mask                          # row 0, block 0, group 0: multiplier 0, only the minimum
    if qtype in (Q.Q4_1, Q.Q5_1):
        b[1, 0, 0:2] = 0                             # d = 0: the block is its minimum m everywhere
    return b.reshape(rows, -1)


def reference(raw, qtype, rows, in_features):
    return dequantize(raw.reshape(rows, -1), qtype).reshape(rows, in_features).astype(np.float64)


@pytest.mark.parametrize("qtype", list(KQUANTS), ids=lambda t: t.name)
def test_every_weight_equals_gguf_dequantize(qtype):
    rows, in_features = 40, 1024
    raw = random_blocks(qtype, rows, in_features)
    want = reference(raw, qtype, rows, in_features)
    p = to_packed(qtype, raw, rows, in_features, what="t")
    bits, group, _ = KQUANTS[qtype]
    assert (p.bits, p.group_size) == (bits, group), "the codes keep their bits, a sub-block is a group"
    got = QuantizedLinear.from_packed(p.qweight, p.scales, p.zeros, p.bits, p.group_size).dequantize()
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= 1e-6, f"{qtype.name}: max relative error {err:.2e}"
    planted = 0 if qtype in ZERO_SCALE else 1 if qtype in (Q.Q4_1, Q.Q5_1) else None
    if planted is not None:       # a group with multiplier 0 holds one value: it must not become 0 or inf
        g = want[planted, :group]
        assert np.ptp(g) == 0 and g[0] != 0, "the planted group is constant"
        assert np.all(got[planted, :group] == np.float32(g[0]))


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q5_0, Q.Q5_1], ids=lambda t: t.name)
@pytest.mark.parametrize("n", [1, 5, 37])
def test_kernels_multiply_like_the_dequantized_matrix(qtype, n):
    rows, in_features = 77, 768
    raw = random_blocks(qtype, rows, in_features, seed=n)
    w = reference(raw, qtype, rows, in_features)
    p = to_packed(qtype, raw, rows, in_features)
    layer = QuantizedLinear.from_packed(p.qweight, p.scales, p.zeros, p.bits, p.group_size)
    x = np.random.default_rng(n).standard_normal((n, in_features)).astype(np.float32)
    y = layer(x)
    want = x.astype(np.float64) @ w.T
    size = np.sqrt((x.astype(np.float64) ** 2) @ (w.T ** 2))      # natural size of each dot product
    err = np.abs(y - want) / np.maximum(np.abs(want).max(), size)
    assert err.max() <= 1e-4, f"{qtype.name} n={n}: {err.max():.2e}"


def test_truncated_and_non_finite_blocks_are_clear_errors():
    raw = random_blocks(Q.Q4_K, 4, 512)
    with pytest.raises(QinferError, match="not whole Q4_K blocks"):
        to_packed(Q.Q4_K, raw, 4, 500)
    bad = raw.reshape(4, 2, 144).copy()
    bad[2, 1, 0:2] = np.array([np.inf], "<f2").view(np.uint8)
    with pytest.raises(FormatError, match=r"output row 2 has a non-finite scale"):
        to_packed(Q.Q4_K, bad.reshape(4, -1), 4, 512, what="t")


# ------------------------------------------------------------ a K-quant model, end to end
HIDDEN, HEADS, KV_HEADS, FFN, LAYERS, VOCAB = 256, 4, 2, 512, 2, 96
HEAD_DIM = HIDDEN // HEADS
LAYER_TYPES = [
    dict(attn_q=Q.Q4_K, attn_k=Q.Q5_K, attn_v=Q.Q6_K, attn_output=Q.Q3_K, ffn_gate=Q.Q2_K, ffn_up=Q.Q5_0,
         ffn_down=Q.Q5_1),
    dict(attn_q=Q.Q6_K, attn_k=Q.Q3_K, attn_v=Q.Q2_K, attn_output=Q.Q5_K, ffn_gate=Q.Q4_K, ffn_up=Q.Q6_K,
         ffn_down=Q.Q4_K),
]
HF = dict(attn_q="self_attn.q_proj", attn_k="self_attn.k_proj", attn_v="self_attn.v_proj",
          attn_output="self_attn.o_proj", ffn_gate="mlp.gate_proj", ffn_up="mlp.up_proj", ffn_down="mlp.down_proj")


def hf_from_llamacpp_rows(w, n_head):
    """llama.cpp's converter interleaves each head's rows (pairs (i, i + d/2) -> (2i, 2i + 1)); undo it."""
    out_f = w.shape[0]
    hd = out_f // n_head
    return w.reshape(n_head, hd // 2, 2, -1).swapaxes(1, 2).reshape(out_f, -1)


def write_kquant_model(path, embd_type=Q.Q6_K, head_type=Q.Q6_K):
    """A random LLaMA whose every matrix is a K-quant or Q5 tensor; -> the float64 weights it holds.
    head_type None: no output.weight (the LM head is the embedding, tied)."""
    rng = np.random.default_rng(7)
    w = ref.gguf_llama_writer(path, LAYERS, HIDDEN, FFN, HEADS, KV_HEADS, VOCAB, context=128)
    weights = {}

    def matrix(name, hf, qtype, out_f, in_f, heads=None, scale=0.004):
        raw = random_blocks(qtype, out_f, in_f, seed=len(weights), scale=scale)
        w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
        m = reference(raw, qtype, out_f, in_f)
        weights[hf] = hf_from_llamacpp_rows(m, heads) if heads else m

    def norm(name, hf):
        v = (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
        w.add_tensor(name, v)
        weights[hf] = v.astype(np.float64)

    matrix("token_embd.weight", "model.embed_tokens.weight", embd_type, VOCAB, HIDDEN, scale=0.1)
    shapes = dict(attn_q=(HIDDEN, HIDDEN), attn_k=(KV_HEADS * HEAD_DIM, HIDDEN), attn_v=(KV_HEADS * HEAD_DIM, HIDDEN),
                  attn_output=(HIDDEN, HIDDEN), ffn_gate=(FFN, HIDDEN), ffn_up=(FFN, HIDDEN), ffn_down=(HIDDEN, FFN))
    for i, types in enumerate(LAYER_TYPES):
        norm(f"blk.{i}.attn_norm.weight", f"model.layers.{i}.input_layernorm.weight")
        norm(f"blk.{i}.ffn_norm.weight", f"model.layers.{i}.post_attention_layernorm.weight")
        for key, (out_f, in_f) in shapes.items():
            heads = HEADS if key == "attn_q" else KV_HEADS if key == "attn_k" else None
            matrix(f"blk.{i}.{key}.weight", f"model.layers.{i}.{HF[key]}.weight", types[key], out_f, in_f, heads)
    norm("output_norm.weight", "model.norm.weight")
    if head_type is not None:
        matrix("output.weight", "lm_head.weight", head_type, VOCAB, HIDDEN, scale=0.02)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


@pytest.mark.parametrize("embd_type,head_type", [(Q.Q6_K, Q.Q6_K), (Q.Q4_K, None), (Q.Q5_0, None)],
                         ids=["untied", "tied-q4_k", "tied-q5_0"])
def test_kquant_model_matches_the_numpy_reference(tmp_path, embd_type, head_type):
    """Also the quantized embedding: held packed, its rows widened on lookup (and, tied, the LM head)."""
    path = tmp_path / "kquant.gguf"
    weights = write_kquant_model(path, embd_type, head_type)
    src = open_model(str(path))
    assert src.config.tie_word_embeddings == (head_type is None)
    for i, types in enumerate(LAYER_TYPES):
        for key, qtype in types.items():
            t = src.tensors[f"model.layers.{i}.{HF[key]}.weight"]
            assert isinstance(t, PackedTensor) and t.bits == KQUANTS[qtype][0], (key, qtype.name)
    config = dict(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                  num_hidden_layers=LAYERS, rms_norm_eps=1e-5, rope_theta=10000.0)
    ids = [3, 17, 42, 5, 88, 1, 60, 23, 9, 71, 30, 2]
    want = ref.forward(weights, config, ids)
    model = Model(src, ctx=64, threads=2)
    assert model.embedding_packed
    table = weights["model.embed_tokens.weight"]
    assert np.abs(model.embedding - table).max() <= 1e-6 * np.abs(table).max()
    got = model.forward(np.array(ids), 0, all_logits=True)            # one prefill: qgemm
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 1e-4, f"prefill logits: {err:.2e}"
    model2 = Model(open_model(str(path)), ctx=64, threads=2)
    for pos, t in enumerate(ids):                                     # token by token: qgemv
        last = model2.forward(np.array([t]), pos)
    err = np.abs(last - want[-1]).max() / np.abs(want[-1]).max()
    assert err < 1e-4, f"decoded logits: {err:.2e}"


# ------------------------------------------------------- files llama-quantize made
# tests/data/make_kquant_files.py wrote these with llama.cpp's llama-quantize (the
# mixes users download) from a random LLaMA with rows of 256: hidden 256, 4 heads,
# 2 KV heads, ffn 512, 2 layers, vocabulary 256.
DATA = ref.REPO_ROOT / "tests" / "data"
LLAMA_QUANTIZE_FILES = ["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K"]
GGUF_TO_HF = dict(HF, attn_norm="input_layernorm", ffn_norm="post_attention_layernorm")


def weights_from_gguf_package(path):
    """The file's weights in Hugging Face names and row order, read and dequantized by the gguf package."""
    reader = gguf.GGUFReader(str(path))
    heads = int(reader.fields["llama.attention.head_count"].parts[-1][0])
    kv_heads = int(reader.fields["llama.attention.head_count_kv"].parts[-1][0])
    weights, types = {}, {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        w = dequantize(np.asarray(t.data), t.tensor_type).reshape(shape).astype(np.float64)
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output.weight":
            name = "lm_head.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        else:
            name = f"model.layers.{parts[1]}.{GGUF_TO_HF[parts[2]]}.weight"
            if parts[2] in ("attn_q", "attn_k"):
                w = hf_from_llamacpp_rows(w, heads if parts[2] == "attn_q" else kv_heads)
        weights[name], types[name] = w, t.tensor_type
    return weights, types


@pytest.mark.parametrize("mix", LLAMA_QUANTIZE_FILES)
def test_llama_quantize_files_load_losslessly(mix):
    path = DATA / f"tiny-llama.{mix}.gguf"
    weights, types = weights_from_gguf_package(path)
    src = open_model(str(path))
    quantized = [n for n, t in types.items() if t in KQUANTS]
    assert len(quantized) == 16, "every matrix of the file is quantized"
    for name in quantized:
        t = src.tensors[name].load()
        assert (t.bits, t.group_size) == KQUANTS[types[name]][:2], (name, types[name].name)
        got = QuantizedLinear.from_packed(t.qweight, t.scales, t.zeros, t.bits, t.group_size).dequantize()
        want = weights[name]
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err <= 1e-6, f"{mix} {name} ({types[name].name}): max relative error {err:.2e}"


@pytest.mark.parametrize("mix", LLAMA_QUANTIZE_FILES)
def test_llama_quantize_files_run_like_the_reference(mix):
    path = DATA / f"tiny-llama.{mix}.gguf"
    weights, _ = weights_from_gguf_package(path)
    config = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                  rms_norm_eps=1e-5, rope_theta=10000.0)
    ids = [1, 17, 42, 5, 200, 3, 60, 123, 9, 71]
    want = ref.forward(weights, config, ids)
    model = Model(open_model(str(path)), ctx=32, threads=2)
    got = model.forward(np.array(ids), 0, all_logits=True)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 1e-4, f"{mix}: logits {err:.2e}"


def _run_cli(*args):
    import os
    import subprocess
    import sys
    env = dict(os.environ, QINFER_TUNE="0")
    return subprocess.run([sys.executable, "-m", "qinfer", *args], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.mark.parametrize("damage", ["truncated", "nan-scale", "inf-minimum"])
def test_malformed_kquant_file_is_one_error_line(tmp_path, damage):
    from qinfer.readers.gguf import read_gguf
    src = DATA / "tiny-llama.Q4_K_M.gguf"
    data = bytearray(src.read_bytes())
    info = read_gguf(str(src)).tensors["blk.0.ffn_gate.weight"]
    assert info.type == Q.Q4_K
    if damage == "truncated":
        data = data[:info.offset + 100]
    else:   # block 3's d (bytes 0-1) or dmin (bytes 2-3)
        at = info.offset + 3 * 144 + (0 if damage == "nan-scale" else 2)
        data[at:at + 2] = np.array([np.nan if damage == "nan-scale" else np.inf], "<f2").tobytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    proc = _run_cli("generate", "--model", str(bad), "--prompt", "t5", "--max-new-tokens", "1")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("qinfer: error:"), proc.stderr
    assert {"truncated": "truncated", "nan-scale": "non-finite scale",
            "inf-minimum": "non-finite minimum"}[damage] in lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("qtype", list(KQUANTS), ids=lambda t: t.name)
def test_stacked_and_reordered_conversion_equals_gguf_dequantize(qtype):
    """The 7B load path: q (rows in another order) and k converted straight into one stacked
    layer; Q4_0/Q5_0/Q8_0 layers hold their scales in float16 without a check: still exact."""
    from qinfer.model import stack_packed
    from qinfer.readers.ggml_quants import lazy_packed
    from qinfer.readers.rope_order import hf_rows_from_gguf, unpermute

    in_features, heads = 512, 4
    raws = [random_blocks(qtype, rows, in_features, seed=rows) for rows in (64, 32)]
    if qtype in (Q.Q4_0, Q.Q5_0, Q.Q8_0):
        raws[1].reshape(32, in_features // 32, -1)[3, 1, 0:2] = 0    # d = 0: a block of zeros
    q = unpermute(lazy_packed(qtype, raws[0], 64, in_features), heads)
    k = lazy_packed(qtype, raws[1], 32, in_features)
    want = np.concatenate([reference(raws[0], qtype, 64, in_features)[hf_rows_from_gguf(64, heads)],
                           reference(raws[1], qtype, 32, in_features)])
    p = stack_packed([q, k])
    layer = QuantizedLinear.from_packed(p.qweight, p.scales, p.zeros, p.bits, p.group_size,
                                        scale_dtype="float16" if p.half_exact else None, known_exact=p.half_exact)
    assert p.half_exact == (qtype in (Q.Q4_0, Q.Q5_0, Q.Q8_0))
    if p.half_exact:
        assert layer.scale_dtype == "float16"
        for a in (p.scales, p.zeros):       # the claim checked: float16 holds every value
            assert np.array_equal(a.astype(np.float16).astype(np.float32), a)
    got = layer.dequantize()
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()
    assert np.array_equal(stack_packed([q.load(), k.load()]).qweight, p.qweight), "the copying path agrees"
