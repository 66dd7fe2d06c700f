"""Model readers: safetensors, GGUF (structure, quantized blocks, q/k row order), HF directories.

References are independent of the code under test: the `gguf` package's own
reader and dequantizer, llama.cpp's forward q/k permutation written out here,
and files written here byte by byte (then corrupted) or with the safetensors
package.
"""
import json
import os
import struct

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q, GGUFValueType as VT  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

from qinfer import QuantizedLinear  # noqa: E402
from qinfer.errors import FormatError, QinferError, UnsupportedError  # noqa: E402
from qinfer.readers import LazyTensor, PackedTensor, open_model  # noqa: E402
from qinfer.readers.gguf import read_gguf  # noqa: E402
from qinfer.readers.gguf_model import hf_name  # noqa: E402
from qinfer.readers.rope_order import hf_rows_from_gguf  # noqa: E402
from qinfer.readers.rope_scaling import from_gguf_divisors, llama3_divisors  # noqa: E402
from qinfer.readers.safetensors import read_safetensors  # noqa: E402


# --------------------------------------------------------------------------- references

def llamacpp_permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute (HF row order -> GGUF row order), written out."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def dense(t):
    """Any reader tensor -> float32 [out, in] (PackedTensor through the kernels' own dequantize)."""
    if isinstance(t, PackedTensor):
        t = t.load()
        return QuantizedLinear.from_packed(t.qweight, t.scales, t.zeros, t.bits, t.group_size).dequantize()
    return np.asarray(t() if callable(t) else t, dtype=np.float32)


def assert_close_rel(got, ref, rel=1e-6, what=""):
    scale = max(float(np.abs(ref).max()), 1e-30)
    err = float(np.abs(np.asarray(got, np.float64) - ref).max()) / scale
    assert err <= rel, f"{what}: relative error {err:.3g} > {rel}"


def raises_qinfer(fn, match=None, kind=QinferError):
    """fn() must raise a QinferError (of `kind`), nothing else."""
    with pytest.raises(kind, match=match) as info:
        fn()
    assert isinstance(info.value, QinferError)
    return info.value


# --------------------------------------------------------------------------- a GGUF writer

def g_str(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


_SCALAR_FMT = {VT.UINT8: "B", VT.INT8: "b", VT.UINT16: "H", VT.INT16: "h", VT.UINT32: "I",
               VT.INT32: "i", VT.FLOAT32: "f", VT.BOOL: "?", VT.UINT64: "Q", VT.INT64: "q",
               VT.FLOAT64: "d"}


def g_val(vtype, v):
    if vtype == VT.STRING:
        return g_str(v)
    if vtype == VT.ARRAY:
        item_type, items = v
        return struct.pack("<IQ", item_type, len(items)) + b"".join(g_val(item_type, x) for x in items)
    return struct.pack("<" + _SCALAR_FMT[vtype], v)


def g_kv(key, vtype, v):
    return g_str(key) + struct.pack("<I", vtype) + g_val(vtype, v)


def g_tensor_info(name, shape, qtype, offset):
    return (g_str(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in shape)
            + struct.pack("<IQ", qtype, offset))


def build_gguf(kvs, tensors, version=3, alignment=32, n_tensors=None, n_kv=None, magic=b"GGUF"):
    """kvs: list of kv bytes; tensors: list of (name, gguf_shape, qtype, data bytes[, offset]).

    Returns (file bytes, marks) where marks gives section offsets for corruption tests.
    """
    head = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    marks = {"kv": len(head), "kv_entries": []}
    body = b""
    for kv in kvs:
        marks["kv_entries"].append(len(head) + len(body))
        body += kv
    infos, placed, offset = b"", [], 0
    marks["infos"] = len(head) + len(body)
    marks["info_entries"] = []
    for t in tensors:
        name, shape, qtype, data = t[:4]
        at = t[4] if len(t) > 4 else offset
        marks["info_entries"].append(marks["infos"] + len(infos))
        infos += g_tensor_info(name, shape, qtype, at)
        placed.append((at, data))
        offset = -(-(at + len(data)) // alignment) * alignment
    pre = head + body + infos
    data_start = -(-len(pre) // alignment) * alignment
    placed = [(at, d) for at, d in placed if at < 1 << 30]     # far-away offsets: the file simply ends
    end = max([at + len(d) for at, d in placed], default=0)
    data = bytearray(end)
    for at, d in placed:
        data[at:at + len(d)] = d
    marks["data"] = data_start
    return pre + b"\0" * (data_start - len(pre)) + bytes(data), marks


# A tiny LLaMA: every supported type appears, q and k in several types, GQA (4 heads, 2 kv heads).
TINY = dict(hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=96, layers=2, vocab=64)
LAYER_TYPES = [
    dict(attn_q=Q.Q4_0, attn_k=Q.Q4_1, attn_v=Q.Q8_0, attn_output=Q.F16, ffn_gate=Q.Q4_1, ffn_up=Q.Q4_0, ffn_down=Q.F32),
    dict(attn_q=Q.F16, attn_k=Q.F32, attn_v=Q.Q4_1, attn_output=Q.Q8_0, ffn_gate=Q.Q4_0, ffn_up=Q.Q8_0, ffn_down=Q.Q4_1),
]
HF_PROJ = dict(attn_q="self_attn.q_proj", attn_k="self_attn.k_proj", attn_v="self_attn.v_proj",
               attn_output="self_attn.o_proj", ffn_gate="mlp.gate_proj", ffn_up="mlp.up_proj",
               ffn_down="mlp.down_proj")


def tiny_kvs(arch="llama", **override):
    c = TINY
    kvs = {
        "general.architecture": (VT.STRING, arch),
        "llama.block_count": (VT.UINT32, c["layers"]),
        "llama.context_length": (VT.UINT32, 256),
        "llama.embedding_length": (VT.UINT32, c["hidden"]),
        "llama.feed_forward_length": (VT.UINT32, c["ffn"]),
        "llama.attention.head_count": (VT.UINT32, c["heads"]),
        "llama.attention.head_count_kv": (VT.UINT32, c["kv_heads"]),
        "llama.rope.freq_base": (VT.FLOAT32, 10000.0),
        "llama.attention.layer_norm_rms_epsilon": (VT.FLOAT32, 1e-5),
        "llama.rope.dimension_count": (VT.UINT32, c["head_dim"]),
        "tokenizer.ggml.model": (VT.STRING, "llama"),
        "tokenizer.ggml.tokens": (VT.ARRAY, (VT.STRING, [f"tok{i}" for i in range(c["vocab"])])),
        "tokenizer.ggml.scores": (VT.ARRAY, (VT.FLOAT32, [float(-i) for i in range(c["vocab"])])),
        "tokenizer.ggml.token_type": (VT.ARRAY, (VT.INT32, [1] * c["vocab"])),
        "tokenizer.ggml.bos_token_id": (VT.UINT32, 1),
        "tokenizer.ggml.eos_token_id": (VT.UINT32, 2),
        "tokenizer.chat_template": (VT.STRING, "{% for m in messages %}{{ m['content'] }}{% endfor %}"),
    }
    kvs.update(override)
    return [g_kv(k, t, v) for k, (t, v) in kvs.items() if t is not None]


def _raw(w, qtype):
    """float [out, in] -> the bytes llama.cpp stores for it."""
    if qtype == Q.F32:
        return w.astype("<f4").tobytes()
    if qtype == Q.F16:
        return w.astype("<f2").tobytes()
    return quantize(w.astype(np.float32), qtype).tobytes()


def tiny_tensors(tied=True, seed=0):
    """-> list of GGUF tensors (q/k in llama.cpp row order), and {gguf name: (qtype, [out, in] shape)}."""
    c = TINY
    rng = np.random.default_rng(seed)
    h, q, kv, ff = c["hidden"], c["heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"], c["ffn"]
    shapes = dict(attn_q=(q, h), attn_k=(kv, h), attn_v=(kv, h), attn_output=(h, q),
                  ffn_gate=(ff, h), ffn_up=(ff, h), ffn_down=(h, ff))
    out = []

    def add(name, w, qtype):
        if w.ndim == 1:
            out.append((name, (w.shape[0],), qtype, _raw(w, qtype)))
        else:
            out.append((name, (w.shape[1], w.shape[0]), qtype, _raw(w, qtype)))

    add("token_embd.weight", rng.standard_normal((c["vocab"], h)).astype(np.float32), Q.Q8_0)
    for i, types in enumerate(LAYER_TYPES):
        add(f"blk.{i}.attn_norm.weight", rng.standard_normal(h).astype(np.float32), Q.F32)
        add(f"blk.{i}.ffn_norm.weight", rng.standard_normal(h).astype(np.float32), Q.F32)
        for key, shape in shapes.items():
            w = rng.standard_normal(shape).astype(np.float32)
            if key == "attn_k":
                w[3, :32] = 0.37          # a constant block: Q4_1 stores d = 0, m = 0.37
            if key == "attn_q":
                w = llamacpp_permute(w, c["heads"])
            if key == "attn_k":
                w = llamacpp_permute(w, c["kv_heads"])
            add(f"blk.{i}.{key}.weight", w, types[key])
    add("output_norm.weight", rng.standard_normal(h).astype(np.float32), Q.F32)
    if not tied:
        add("output.weight", rng.standard_normal((c["vocab"], h)).astype(np.float32), Q.Q4_0)
    return out


def tiny_gguf(tmp_path, name="tiny.gguf", kvs=None, tensors=None, **build_kw):
    data, marks = build_gguf(tiny_kvs() if kvs is None else kvs,
                             tiny_tensors() if tensors is None else tensors, **build_kw)
    path = tmp_path / name
    path.write_bytes(data)
    return str(path), data, marks


# --------------------------------------------------------------------------- GGUF: valid files

@pytest.mark.parametrize("tied", [True, False])
def test_tiny_gguf_loads_every_type_losslessly(tmp_path, tied):
    tensors = tiny_tensors(tied=tied)
    path, _, _ = tiny_gguf(tmp_path, tensors=tensors)
    src = open_model(path)
    c = src.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (64, 96, 2)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size) == (4, 2, 16, 64)
    assert c.tie_word_embeddings == tied
    assert c.bos_token_id == 1 and c.eos_token_ids == [2]
    assert src.format == "gguf" and src.keepalive
    assert src.chat_template.startswith("{% for m in messages %}")
    assert src.tokenizer.kind == "gguf"
    meta = src.tokenizer.gguf_metadata
    assert meta["tokenizer.ggml.tokens"][:2] == ["tok0", "tok1"]
    assert meta["tokenizer.ggml.token_type"] == [1] * 64
    assert isinstance(meta["tokenizer.ggml.scores"], list) and meta["tokenizer.ggml.scores"][3] == -3.0

    assert len(src.tensors) == len(tensors)
    for name, shape, qtype, raw in tensors:
        hf = hf_name(name)
        t = src.tensors[hf]
        numpy_shape = tuple(reversed(shape))
        ref = dequantize(np.frombuffer(raw, np.uint8).reshape(numpy_shape[0], -1)
                         if len(shape) == 2 else np.frombuffer(raw, np.uint8), qtype).reshape(numpy_shape)
        if qtype in (Q.Q4_0, Q.Q4_1, Q.Q8_0):
            assert isinstance(t, PackedTensor) and t.group_size == 32
            assert t.bits == (8 if qtype == Q.Q8_0 else 4)
        elif qtype == Q.F16:
            assert isinstance(t, LazyTensor)
        got = dense(t)
        assert got.shape == numpy_shape
        if "attn_q" in name:
            got = llamacpp_permute(got, TINY["heads"])
        if "attn_k" in name:
            got = llamacpp_permute(got, TINY["kv_heads"])
        assert_close_rel(got, ref, 1e-6, name)


def test_q4_1_constant_block_is_exact(tmp_path):
    """d == 0 blocks (all elements equal m) must not turn into 0 or inf."""
    path, _, _ = tiny_gguf(tmp_path)
    src = open_model(path)
    k = dense(src.tensors["model.layers.0.self_attn.k_proj.weight"])
    # Row 3 of the HF matrix was constant on inputs 0..31 before quantization.
    assert np.all(k[3, :32] == np.float32(np.float16(0.37)))


def test_unpermutation_matches_rope_semantics():
    """Interleaved RoPE on llama.cpp rows == rotate-half RoPE on our rows, position by position.

    This checks the permutation against what it is for, independently of the
    converter's formula.
    """
    rng = np.random.default_rng(1)
    for n_head, head_dim in ((4, 16), (2, 8), (3, 64)):
        rows = n_head * head_dim
        w_hf = rng.standard_normal((rows, 24))
        w_gguf = llamacpp_permute(w_hf, n_head)
        index = hf_rows_from_gguf(rows, n_head)
        assert np.array_equal(w_gguf[index], w_hf)
        x = rng.standard_normal(24)
        inv = 1.0 / 10000 ** (np.arange(0, head_dim, 2) / head_dim)
        for pos in (0, 1, 7):
            ang = pos * inv
            cos, sin = np.cos(ang), np.sin(ang)
            # HF: dims i and i + d/2 rotate together.
            a = (w_hf @ x).reshape(n_head, 2, head_dim // 2)
            hf_rot = np.stack([a[:, 0] * cos - a[:, 1] * sin, a[:, 1] * cos + a[:, 0] * sin], 1).reshape(-1)
            # llama.cpp: dims 2i and 2i + 1 rotate together.
            b = (w_gguf @ x).reshape(n_head, head_dim // 2, 2)
            cpp_rot = np.stack([b[..., 0] * cos - b[..., 1] * sin, b[..., 1] * cos + b[..., 0] * sin], -1).reshape(-1)
            np.testing.assert_allclose(cpp_rot[index], hf_rot, rtol=1e-12, atol=1e-12)


def test_structure_matches_gguf_package(tmp_path):
    path, _, _ = tiny_gguf(tmp_path)
    mine = read_gguf(path)
    ref = gguf.GGUFReader(path)
    assert [t.name for t in ref.tensors] == list(mine.tensors)
    for t in ref.tensors:
        m = mine.tensors[t.name]
        assert (m.offset, m.nbytes, list(m.shape), m.type) == (t.data_offset, t.n_bytes, list(t.shape), t.tensor_type)
    for key, field in ref.fields.items():
        if not key.startswith("GGUF."):
            assert mine.kv[key].to_python() == pytest.approx(field.contents()), key


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    # head_dim 16 has too few frequencies for a fit, so check the fit on a real size first...
    divisors = llama3_divisors(scaling, 500000.0, 128).astype(np.float32)
    assert from_gguf_divisors(divisors, 500000.0, 128, 8192, "x") == scaling
    # ...then through a file (head_dim 16, theta 500000: the defaults reproduce the divisors).
    divisors = llama3_divisors(scaling, 500000.0, 16).astype(np.float32)
    tensors = tiny_tensors() + [("rope_freqs.weight", (8,), Q.F32, divisors.tobytes())]
    kvs = tiny_kvs(**{"llama.rope.freq_base": (VT.FLOAT32, 500000.0)})
    path, _, _ = tiny_gguf(tmp_path, kvs=kvs, tensors=tensors)
    src = open_model(path)
    assert src.config.rope_scaling == scaling
    assert "rope_freqs.weight" not in src.tensors
    # Divisors that follow no Llama 3 curve are refused, not approximated.
    bad = tiny_tensors() + [("rope_freqs.weight", (8,), Q.F32, np.linspace(1, 9, 8, dtype=np.float32).tobytes())]
    path, _, _ = tiny_gguf(tmp_path, name="bad.gguf", kvs=kvs, tensors=bad)
    raises_qinfer(lambda: open_model(path), "Llama 3", UnsupportedError)


# --------------------------------------------------------------------------- GGUF: SmolLM2

@pytest.fixture(scope="module")
def smollm2_path():
    import llama_reference
    path = llama_reference.smollm2_path()
    if path is None:
        pytest.skip("SmolLM2 GGUF not installed")
    return path


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return open_model(smollm2_path)


def test_smollm2_config(smollm2):
    c = smollm2.config
    assert c.num_hidden_layers == 30 and c.hidden_size == 576 and c.intermediate_size == 1536
    assert c.num_attention_heads == 9 and c.num_key_value_heads == 3 and c.head_dim == 64
    assert c.vocab_size == 49152 and c.rope_theta == 100000.0 and c.tie_word_embeddings
    assert c.rope_scaling is None and c.max_position_embeddings == 8192
    assert c.rms_norm_eps == pytest.approx(1e-5)
    assert c.bos_token_id == 1 and c.eos_token_ids == [2]
    assert "lm_head.weight" not in smollm2.tensors
    assert len(smollm2.tensors) == 2 + 9 * 30
    assert "<|im_start|>" in smollm2.chat_template
    meta = smollm2.tokenizer.gguf_metadata
    assert len(meta["tokenizer.ggml.tokens"]) == 49152 and meta["tokenizer.ggml.model"] == "gpt2"


def test_smollm2_dequantization_matches_gguf_package(smollm2, smollm2_path):
    """Every quantized tensor: our PackedTensor through QuantizedLinear == gguf.quants.dequantize."""
    ref_reader = gguf.GGUFReader(smollm2_path)
    c = smollm2.config
    seen = set()
    for t in ref_reader.tensors:
        name = hf_name(t.name)
        ours = smollm2.tensors[name]
        if t.tensor_type == Q.F32:
            np.testing.assert_array_equal(np.asarray(ours), t.data.reshape(ours.shape))
            continue
        assert t.tensor_type in (Q.Q4_1, Q.Q8_0)
        seen.add(t.tensor_type)
        got = dense(ours)
        if name.endswith("q_proj.weight"):
            got = llamacpp_permute(got, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            got = llamacpp_permute(got, c.num_key_value_heads)
        ref = dequantize(t.data, t.tensor_type)
        assert_close_rel(got, ref, 1e-6, t.name)
    assert seen == {Q.Q4_1, Q.Q8_0}


# --------------------------------------------------------------------------- GGUF: bad files

def _kv_index(key):
    return [k for k in _tiny_kv_keys()].index(key)


def _tiny_kv_keys():
    return ["general.architecture", "llama.block_count", "llama.context_length", "llama.embedding_length",
            "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
            "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon", "llama.rope.dimension_count",
            "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
            "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"]


def _write(tmp_path, data, name="bad.gguf"):
    p = tmp_path / name
    p.write_bytes(bytes(data))
    return str(p)


def test_gguf_bad_magic_and_versions(tmp_path):
    _, data, _ = tiny_gguf(tmp_path)
    raises_qinfer(lambda: read_gguf(_write(tmp_path, b"GGUG" + data[4:])), "not a GGUF file")
    for version in (1, 99, 0):
        bad = data[:4] + struct.pack("<I", version) + data[8:]
        raises_qinfer(lambda: read_gguf(_write(tmp_path, bad)), f"version {version}", UnsupportedError)
    big_endian = data[:4] + struct.pack(">I", 3) + data[8:]
    raises_qinfer(lambda: read_gguf(_write(tmp_path, big_endian)), "big-endian", UnsupportedError)
    # open_model routes by magic: a non-GGUF file is refused there.
    raises_qinfer(lambda: open_model(_write(tmp_path, b"GGUG" + data[4:])), "not a GGUF file")


def test_gguf_every_truncation_is_a_clear_error(tmp_path):
    """Cut the file at every byte up to the data section, and at points inside the data."""
    _, data, marks = tiny_gguf(tmp_path)
    cuts = list(range(0, marks["data"] + 1)) + [marks["data"] + 17, len(data) // 2, len(data) - 1]
    path = str(tmp_path / "cut.gguf")
    for cut in cuts:
        with open(path, "wb") as f:
            f.write(data[:cut])
        with pytest.raises(QinferError):
            open_model(path)
    # The named points of the brief, with the message checked.
    chat = marks["kv_entries"][_kv_index("tokenizer.chat_template")]
    for cut, match in ((10, "truncated"), (chat + 40, "truncated.*tokenizer.chat_template"),
                       (marks["info_entries"][3] + 5, "truncated"),
                       (marks["data"] + 100, "runs past the end")):
        with open(path, "wb") as f:
            f.write(data[:cut])
        raises_qinfer(lambda: read_gguf(path), match)


def test_gguf_huge_counts(tmp_path):
    kvs, tensors = tiny_kvs(), tiny_tensors()
    for kw, match in ((dict(n_tensors=1 << 40), "tensor count"), (dict(n_kv=1 << 40), "metadata count"),
                      (dict(n_tensors=(1 << 16) + 1), "tensor count"), (dict(n_kv=(1 << 64) - 1), "metadata count")):
        data, _ = build_gguf(kvs, tensors, **kw)
        raises_qinfer(lambda: read_gguf(_write(tmp_path, data)), match)
    # A count within the cap but beyond what the file holds: the reader runs into the tensor
    # infos and then off the end, and says so; it neither hangs nor allocates for 60000 entries.
    data, _ = build_gguf(kvs, tensors, n_kv=60000)
    raises_qinfer(lambda: read_gguf(_write(tmp_path, data)))


def test_gguf_huge_string_and_array_lengths(tmp_path):
    tensors = tiny_tensors()
    cases = [
        (struct.pack("<Q", 1 << 60) + b"general.x", "more than"),                                  # key length
        (g_str("general.x") + struct.pack("<IQ", VT.STRING, 1 << 60) + b"abc", "more than"),       # value length
        (g_str("general.x") + struct.pack("<IIQ", VT.ARRAY, VT.UINT8, 1 << 40), "elements"),      # array length
        (g_str("general.x") + struct.pack("<IIQ", VT.ARRAY, VT.STRING, 1 << 20), "truncated"),    # lying count
        (g_str("general.x") + struct.pack("<IIQ", VT.ARRAY, VT.UINT64, 1 << 23), "truncated"),
        (g_str("general.x") + struct.pack("<IIQIQ", VT.ARRAY, VT.ARRAY, 1, VT.ARRAY, 1)
         + struct.pack("<IQ", VT.UINT8, 1) + b"\1", "nests arrays"),
        (g_str("general.x") + struct.pack("<I", 13) + b"\0" * 8, "unknown value type"),
        (g_str("general.x") + struct.pack("<IB", VT.BOOL, 2), "bool"),
        (g_kv("general.architecture", VT.STRING, "llama"), "twice"),
        (g_str(b"\xff\xfe") + struct.pack("<IB", VT.UINT8, 1), "UTF-8"),
    ]
    for kv, match in cases:
        data, _ = build_gguf(tiny_kvs() + [kv], tensors)
        raises_qinfer(lambda: read_gguf(_write(tmp_path, data)), match)
    # One level of nesting is allowed.
    nested = g_kv("general.x", VT.ARRAY, (VT.ARRAY, [(VT.UINT8, [1, 2]), (VT.STRING, ["a"])]))
    data, _ = build_gguf(tiny_kvs() + [nested], tensors)
    assert read_gguf(_write(tmp_path, data)).kv["general.x"].to_python() == [[1, 2], ["a"]]


def _with_tensor(name, shape, qtype, data=b"", offset=None):
    tensors = tiny_tensors()
    extra = (name, shape, qtype, data) if offset is None else (name, shape, qtype, data, offset)
    return tensors + [extra]


def test_gguf_bad_tensor_infos(tmp_path):
    kvs = tiny_kvs()
    f32 = np.zeros(32, np.float32).tobytes()
    cases = [
        (_with_tensor("x", (), Q.F32), "0 dimensions", FormatError),
        (_with_tensor("x", (1,) * 9, Q.F32), "9 dimensions", FormatError),
        (_with_tensor("x", (1 << 62, 1 << 62), Q.F32), "more than .* elements", FormatError),
        (_with_tensor("x", (1 << 30, 1 << 30, 32), Q.F32), r"dimension 1 = 1073741824\)", FormatError),
        (_with_tensor("x", (32, 1 << 62, 1, 1), Q.F32), "more than", FormatError),
        (_with_tensor("x", (32, 0), Q.F32), "dimension 1 = 0", FormatError),
        (_with_tensor("x", (32,), 1000, f32), "unknown type id 1000", UnsupportedError),
        (_with_tensor("x", (256,), Q.IQ2_XXS, b"\0" * 66), "IQ2_XXS", UnsupportedError),
        (_with_tensor("x", (48,), Q.Q4_0, b"\0" * 27), "block size", FormatError),
        (_with_tensor("x", (32,), Q.F32, f32, offset=4), "alignment", FormatError),
        (_with_tensor("x", (32,), Q.F32, f32, offset=0), "overlap", FormatError),
        (_with_tensor("x", (32,), Q.F32, f32, offset=1 << 40), "past the end", FormatError),
        (_with_tensor("token_embd.weight", (32,), Q.F32, f32), "twice", FormatError),
        (_with_tensor("x" * 2000, (32,), Q.F32, f32), "more than", FormatError),
    ]
    for tensors, match, kind in cases:
        data, _ = build_gguf(kvs, tensors)
        raises_qinfer(lambda: read_gguf(_write(tmp_path, data)), match, kind)
    # Data that ends past EOF: the last tensor's bytes cut short.
    data, _ = build_gguf(kvs, tiny_tensors())
    raises_qinfer(lambda: read_gguf(_write(tmp_path, data[:-1])), "past the end")


def test_gguf_alignment(tmp_path):
    for value, ok in ((64, True), (1, True), (48, False), (0, False), (1 << 17, False)):
        kvs = tiny_kvs(**{"general.alignment": (VT.UINT32, value)})
        data, _ = build_gguf(kvs, tiny_tensors(), alignment=max(value, 1) if ok else 32)
        path = _write(tmp_path, data)
        if ok:
            assert read_gguf(path).alignment == value
            open_model(path)
        else:
            raises_qinfer(lambda: read_gguf(path), "alignment")
    kvs = tiny_kvs(**{"general.alignment": (VT.STRING, "32")})
    raises_qinfer(lambda: read_gguf(_write(tmp_path, build_gguf(kvs, tiny_tensors())[0])), "alignment")


def test_gguf_model_level_errors(tmp_path):
    tensors = tiny_tensors()

    def load(kvs=None, t=None):
        data, _ = build_gguf(tiny_kvs() if kvs is None else kvs, tensors if t is None else t)
        return lambda: open_model(_write(tmp_path, data))

    raises_qinfer(load(tiny_kvs(arch="gpt2")), "architecture 'gpt2'", UnsupportedError)
    raises_qinfer(load(tiny_kvs(**{"general.architecture": (None, None)})), "general.architecture")
    raises_qinfer(load(tiny_kvs(**{"general.architecture": (VT.UINT32, 1)})), "must be a string")
    raises_qinfer(load(tiny_kvs(**{"llama.block_count": (VT.STRING, "2")})), "block_count.*integer")
    raises_qinfer(load(tiny_kvs(**{"llama.block_count": (VT.UINT32, 0)})), "block_count.*>= 1")
    raises_qinfer(load(tiny_kvs(**{"llama.block_count": (VT.FLOAT32, 2.0)})), "block_count.*integer")
    raises_qinfer(load(tiny_kvs(**{"llama.block_count": (VT.BOOL, True)})), "block_count.*integer")
    raises_qinfer(load(tiny_kvs(**{"llama.block_count": (VT.UINT32, 3)})), "blk|layers.2.*missing")
    raises_qinfer(load(tiny_kvs(**{"llama.block_count": (VT.UINT64, 1 << 40)})), "layers")
    raises_qinfer(load(tiny_kvs(**{"llama.embedding_length": (None, None)})), "embedding_length.*missing")
    raises_qinfer(load(tiny_kvs(**{"llama.attention.head_count_kv": (VT.UINT32, 3)})), "multiple")
    raises_qinfer(load(tiny_kvs(**{"llama.attention.layer_norm_rms_epsilon": (VT.FLOAT32, float("nan"))})),
                  "epsilon")
    raises_qinfer(load(tiny_kvs(**{"llama.rope.scaling.type": (VT.STRING, "yarn"),
                                   "llama.rope.scaling.factor": (VT.FLOAT32, 4.0)})), "yarn", UnsupportedError)
    raises_qinfer(load(tiny_kvs(**{"llama.feed_forward_length": (VT.UINT32, 128)})), "shape")
    raises_qinfer(load(t=tensors + [("blk.0.attn_q.bias", (64,), Q.F32, b"\0" * 256)]), "attn_q.bias",
                  UnsupportedError)
    raises_qinfer(load(t=[t for t in tensors if t[0] != "blk.1.ffn_up.weight"]), "up_proj.*missing")
    # A NaN block scale would poison outputs silently.
    bad = [list(t) for t in tensors]
    emb = next(t for t in bad if t[0] == "token_embd.weight")
    raw = bytearray(emb[3])
    raw[34 * 5:34 * 5 + 2] = np.array([np.nan], "<f2").tobytes()
    emb[3] = bytes(raw)
    data, _ = build_gguf(tiny_kvs(), [tuple(t) for t in bad])
    path = _write(tmp_path, data)
    # Block tensors are converted when the model is built (PackedTensor.load), and so checked there.
    from qinfer.model import Model
    raises_qinfer(lambda: Model(open_model(path)), "non-finite scale")


def test_gguf_random_corruption_never_escapes(tmp_path):
    """Flip random bytes of the header region: either it loads or it is a QinferError, nothing else."""
    _, data, marks = tiny_gguf(tmp_path)
    rng = np.random.default_rng(7)
    path = str(tmp_path / "fuzz.gguf")
    for _ in range(300):
        buf = bytearray(data)
        for _ in range(rng.integers(1, 4)):
            pos = int(rng.integers(0, marks["data"] + 64))
            buf[pos] = int(rng.integers(0, 256))
        with open(path, "wb") as f:
            f.write(buf)
        try:
            open_model(path)
        except QinferError:
            pass


# --------------------------------------------------------------------------- safetensors

def write_st(path, header, data=b"", header_len=None):
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(h) if header_len is None else header_len
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n) + h + data)
    return str(path)


def to_bf16_bits(x):
    """float32 -> bfloat16 bits, round to nearest even (as torch does)."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def test_safetensors_reads_views_and_lazy_floats(tmp_path):
    from safetensors.numpy import save_file
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    h = (np.arange(6, dtype=np.float32) / 3).astype(np.float16)
    g = np.arange(5, dtype=np.int64)
    path = str(tmp_path / "m.safetensors")
    save_file({"a": a, "h": h, "g_idx": g, "empty": np.zeros((0, 4), np.float32)}, path, metadata={"format": "np"})
    f = read_safetensors(path)
    assert f.metadata == {"format": "np"}
    assert isinstance(f["a"], np.ndarray) and not f["a"].flags.writeable
    np.testing.assert_array_equal(f["a"], a)
    np.testing.assert_array_equal(f["g_idx"], g)
    assert f["empty"].shape == (0, 4)
    assert isinstance(f["h"], LazyTensor) and f["h"].shape == (6,)
    out = f["h"]()
    assert out.dtype == np.float32 and np.array_equal(out, h.astype(np.float32))
    # BF16, written byte by byte (numpy has no bfloat16).
    x = np.array([1.0, -2.5, 3.14159, 1e-3], np.float32)
    bits = to_bf16_bits(x)
    p2 = write_st(tmp_path / "b.safetensors", {"x": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}},
                  bits.tobytes())
    y = read_safetensors(p2)["x"]()
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, (bits.astype(np.uint32) << 16).view(np.float32))
    np.testing.assert_allclose(y, x, rtol=1 / 128)


def test_safetensors_bad_files(tmp_path):
    def st(header, data=b"\0" * 16, **kw):
        return write_st(tmp_path / "bad.safetensors", header, data, **kw)

    ok = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
    read_safetensors(st(ok))
    cases = [
        (lambda: (tmp_path / "tiny.safetensors").write_bytes(b"\0" * 5) and str(tmp_path / "tiny.safetensors"),
         "too small"),
        (lambda: st(b"", b""), "not valid JSON"),
        (lambda: st(ok, header_len=1 << 20), "past the end"),
        (lambda: st(ok, header_len=1 << 62), "limit"),
        (lambda: st(b"{not json", b""), "not valid JSON"),
        (lambda: st(b"\xff\xfe", b""), "UTF-8"),
        (lambda: st(b"[" * 100000 + b"]" * 100000, b""), "JSON"),
        (lambda: st([1, 2]), "JSON object"),
        (lambda: st(b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                    b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}'), "twice"),
        (lambda: st({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                     "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}), "overlap"),
        (lambda: st({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}), "needs 12 bytes"),
        (lambda: st({"a": {"dtype": "F32", "shape": [3, 2], "data_offsets": [0, 16]}}), "more bytes"),
        (lambda: st({"a": {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}}), "non-negative"),
        (lambda: st({"a": {"dtype": "F32", "shape": [2.0, 2], "data_offsets": [0, 16]}}), "non-negative"),
        (lambda: st({"a": {"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]}}), "non-negative"),
        (lambda: st({"a": {"dtype": "F32", "shape": [1] * 9, "data_offsets": [0, 4]}}), "at most 8"),
        (lambda: st({"a": {"dtype": "F32", "shape": [0, 1 << 63], "data_offsets": [0, 0]}}), "dimension above"),
        (lambda: st({"a": {"dtype": "F32", "shape": [10 ** 30, 10 ** 30], "data_offsets": [0, 16]}}), "dimension above"),
        (lambda: st({"a": {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 16]}}), "more bytes"),
        (lambda: st({"a": {"dtype": "F64", "shape": [2], "data_offsets": [0, 16]}}), "F64"),
        (lambda: st({"a": {"dtype": "X7", "shape": [4], "data_offsets": [0, 16]}}), "unknown dtype"),
        (lambda: st({"a": {"dtype": 3, "shape": [4], "data_offsets": [0, 16]}}), "dtype"),
        (lambda: st({"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}), "past the"),
        (lambda: st({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}), "begin <= end"),
        (lambda: st({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}), "data_offsets"),
        (lambda: st({"a": {"dtype": "F32", "shape": [2]}}), "data_offsets"),
        (lambda: st({"a": [1, 2]}), "object"),
        (lambda: st({"__metadata__": {"k": 1}, **ok}), "__metadata__"),
    ]
    for make, match in cases:
        path = make()
        raises_qinfer(lambda: read_safetensors(path), match)
    # Truncated data: a valid file cut short.
    path = st(ok)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 3)
    raises_qinfer(lambda: read_safetensors(path), "past the")


# --------------------------------------------------------------------------- HF directories

HF_CFG = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=96,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
              rope_theta=500000.0, max_position_embeddings=256, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=[2, 3], vocab_size=64)


def hf_weights(cfg, seed=0):
    rng = np.random.default_rng(seed)
    from qinfer.readers import ModelConfig, expected_shapes
    mc = ModelConfig(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                     intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
                     num_attention_heads=cfg["num_attention_heads"],
                     num_key_value_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
                     head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
                     tie_word_embeddings=cfg.get("tie_word_embeddings", False))
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in expected_shapes(mc).items()}


def write_hf(directory, cfg=HF_CFG, dtype="F32", shards=1, weights=None, extra=None):
    """A checkpoint directory; returns the float32 values the reader should give back."""
    from safetensors.numpy import save_file
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f)
    weights = dict(hf_weights(cfg) if weights is None else weights, **(extra or {}))
    names = sorted(weights)
    parts = [names[i::shards] for i in range(shards)]
    expect = {}
    weight_map = {}
    for i, part in enumerate(parts):
        fname = "model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        path = os.path.join(directory, fname)
        if dtype == "BF16":
            header, blobs, off = {}, [], 0
            for n in part:
                bits = to_bf16_bits(weights[n])
                header[n] = {"dtype": "BF16", "shape": list(bits.shape), "data_offsets": [off, off + bits.nbytes]}
                blobs.append(bits.tobytes())
                off += bits.nbytes
                expect[n] = (bits.astype(np.uint32) << 16).view(np.float32)
            write_st(path, header, b"".join(blobs))
        else:
            np_dtype = np.float32 if dtype == "F32" else np.float16
            arrays = {n: weights[n].astype(np_dtype) if weights[n].dtype.kind == "f" else weights[n]
                      for n in part}
            save_file(arrays, path)
            expect.update({n: a.astype(np.float32) for n, a in arrays.items()})
        weight_map.update({n: fname for n in part})
    if shards > 1:
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return expect


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("shards", [1, 3])
def test_hf_directory_round_trip(tmp_path, dtype, shards):
    d = str(tmp_path / "m")
    expect = write_hf(d, dtype=dtype, shards=shards)
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        f.write("{}")
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": "{{ messages }}", "add_bos_token": True}, f)
    src = open_model(d)
    c = src.config
    assert src.format == "hf"
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size) == (64, 96, 2, 64)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (4, 2, 16)
    assert c.eos_token_ids == [2, 3] and c.bos_token_id == 1 and not c.tie_word_embeddings
    assert c.rope_theta == 500000.0 and c.rope_scaling is None
    assert src.tokenizer.kind == "hf_json" and src.tokenizer.path.endswith("tokenizer.json")
    assert src.tokenizer.config["add_bos_token"] is True
    assert src.chat_template == "{{ messages }}"
    assert len(src.keepalive) == shards
    assert set(src.tensors) == set(expect)
    for name, ref in expect.items():
        t = src.tensors[name]
        assert (callable(t)) == (dtype != "F32")
        np.testing.assert_array_equal(src.float_tensor(name), ref, err_msg=name)


def test_hf_config_variants(tmp_path):
    # Tied embeddings: lm_head not needed (and ignored if present, as a copy of the embedding:
    # tests/test_hf_config.py refuses one that differs); head_dim given explicitly; llama3 RoPE.
    cfg = dict(HF_CFG, tie_word_embeddings=True, head_dim=16, eos_token_id=2, rope_scaling={
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})
    d = str(tmp_path / "tied")
    w = hf_weights(cfg)
    write_hf(d, cfg, weights=w, extra={"lm_head.weight": w["model.embed_tokens.weight"].copy(),
                            "model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros(8, np.float32)})
    with open(os.path.join(d, "tokenizer.model"), "wb") as f:
        f.write(b"\0")
    with open(os.path.join(d, "chat_template.jinja"), "w") as f:
        f.write("{{ bos_token }}")
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [2, 9]}, f)
    src = open_model(d)
    assert src.config.tie_word_embeddings and "lm_head.weight" not in src.tensors
    assert src.config.rope_scaling["rope_type"] == "llama3" and src.config.rope_scaling["factor"] == 32.0
    assert src.config.eos_token_ids == [2, 9]
    assert src.tokenizer.kind == "sentencepiece_file" and src.tokenizer.config is None
    assert src.chat_template == "{{ bos_token }}"
    # "type": "default" (older key) means no scaling; no tokenizer files -> None.
    d2 = str(tmp_path / "plain")
    write_hf(d2, dict(HF_CFG, rope_scaling={"type": "default"}))
    src = open_model(d2)
    assert src.config.rope_scaling is None and src.tokenizer is None and src.chat_template is None


def test_hf_errors(tmp_path):
    w = hf_weights(HF_CFG)

    def broken(name, cfg=HF_CFG, weights=w, **kw):
        d = str(tmp_path / name)
        write_hf(d, cfg, weights=weights, **kw)
        return d

    missing = {k: v for k, v in w.items() if k != "model.layers.1.mlp.up_proj.weight"}
    raises_qinfer(lambda: open_model(broken("missing", weights=missing)),
                  "model.layers.1.mlp.up_proj.weight.*missing")
    wrong = dict(w, **{"model.layers.0.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)})
    raises_qinfer(lambda: open_model(broken("shape", weights=wrong)),
                  r"k_proj.weight' has shape \[64, 64\], expected \[32, 64\]")
    d = broken("shard", shards=2)
    os.remove(os.path.join(d, "model-00002-of-00002.safetensors"))
    raises_qinfer(lambda: open_model(d), "model-00002-of-00002.safetensors.*does not exist")
    d = broken("traversal", shards=2)
    idx = os.path.join(d, "model.safetensors.index.json")
    with open(idx) as f:
        index = json.load(f)
    index["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    with open(idx, "w") as f:
        json.dump(index, f)
    raises_qinfer(lambda: open_model(d), "plain file name")
    raises_qinfer(lambda: open_model(broken("mistral", dict(HF_CFG, model_type="mistral",
                                                            architectures=["MistralForCausalLM"]))),
                  "model_type 'mistral'", UnsupportedError)
    # A GPTQ checkpoint whose settings are incomplete: named, never guessed.
    raises_qinfer(lambda: open_model(broken("gptq", dict(HF_CFG, quantization_config={
        "quant_method": "gptq", "bits": 4}))), "no 'group_size'", FormatError)
    raises_qinfer(lambda: open_model(broken("yarn", dict(HF_CFG, rope_scaling={"rope_type": "yarn", "factor": 4.0}))),
                  "yarn", UnsupportedError)
    raises_qinfer(lambda: open_model(broken("l3", dict(HF_CFG, rope_scaling={"rope_type": "llama3", "factor": 8.0}))),
                  "low_freq_factor")
    raises_qinfer(lambda: open_model(broken("strhid", dict(HF_CFG, hidden_size="64"))), "hidden_size")
    cfg = dict(HF_CFG)
    del cfg["vocab_size"]
    raises_qinfer(lambda: open_model(broken("novocab", cfg)), "vocab_size.*missing")
    raises_qinfer(lambda: open_model(broken("eos", dict(HF_CFG, eos_token_id="2"))), "eos_token_id")
    raises_qinfer(lambda: open_model(broken("bias", dict(HF_CFG, attention_bias=True))), "attention_bias")
    d = broken("int", weights=dict(w, **{"model.norm.weight": np.zeros(64, np.int32)}))
    raises_qinfer(lambda: open_model(d), "float type")
    d = broken("nocfg")
    with open(os.path.join(d, "config.json"), "w") as f:
        f.write("{oops")
    raises_qinfer(lambda: open_model(d), "config.json.*not valid JSON")
    d = str(tmp_path / "noweights")
    os.makedirs(d)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(HF_CFG, f)
    raises_qinfer(lambda: open_model(d), "no model.safetensors")


def test_open_model_routing(tmp_path):
    raises_qinfer(lambda: open_model(str(tmp_path / "nope")), "no such file or directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    raises_qinfer(lambda: open_model(str(empty)), "no config.json")
    (empty / "x.gguf").write_bytes(b"")
    raises_qinfer(lambda: open_model(str(empty)), "pass the file itself")
    lone = write_st(tmp_path / "model.safetensors", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                    b"\0" * 4)
    raises_qinfer(lambda: open_model(lone), "pass the directory with config.json")
    (tmp_path / "short").write_bytes(b"GG")
    raises_qinfer(lambda: open_model(str(tmp_path / "short")), "not a GGUF file")
