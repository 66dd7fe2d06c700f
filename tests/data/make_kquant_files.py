"""Writes the K-quant test files in tests/data/ with llama.cpp's own llama-quantize.

    python tests/data/make_kquant_files.py     # needs benchmarks/llamacpp.py's build (minutes, once)

A random LLaMA whose matrices have rows of 256 (k-quants' super-block; SmolLM2's
576-wide rows make llama-quantize fall back to Q5_0/Q8_0 on most tensors) is
written as an F32 GGUF with the gguf package, then quantized to the mixes users
download (Q2_K, Q3_K_M, Q4_K_M, Q5_K_M, Q6_K). The F32 file is not kept: the
tests compare every tensor with gguf.quants.dequantize of the same bytes, and
run the model against tests/llama_reference.py with those dequantized weights.
The files are committed (0.5 to 1.1 MB each) so the tests run without llama.cpp.
"""
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, os.pardir, os.pardir, "benchmarks"))

TYPES = ("Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K")
SHAPE = dict(hidden=256, heads=4, kv_heads=2, ffn=512, layers=2, vocab=256)


def write_f32(path, seed=0):
    import gguf

    c, rng = SHAPE, np.random.default_rng(seed)
    head_dim = c["hidden"] // c["heads"]
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(c["layers"])
    w.add_context_length(256)
    w.add_embedding_length(c["hidden"])
    w.add_feed_forward_length(c["ffn"])
    w.add_head_count(c["heads"])
    w.add_head_count_kv(c["kv_heads"])
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_file_type(0)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, c["vocab"])])
    w.add_token_scores([0.0] * c["vocab"])
    w.add_token_types([2, 3, 3] + [1] * (c["vocab"] - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def mat(out_f, in_f, std):
        return (rng.standard_normal((out_f, in_f)) * std).astype(np.float32)

    h, kv, ff = c["hidden"], c["kv_heads"] * head_dim, c["ffn"]
    w.add_tensor("token_embd.weight", mat(c["vocab"], h, 0.5))
    for i in range(c["layers"]):
        w.add_tensor(f"blk.{i}.attn_norm.weight", (1 + 0.1 * rng.standard_normal(h)).astype(np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", (1 + 0.1 * rng.standard_normal(h)).astype(np.float32))
        for name, (o, n) in dict(attn_q=(h, h), attn_k=(kv, h), attn_v=(kv, h), attn_output=(h, h),
                                 ffn_gate=(ff, h), ffn_up=(ff, h), ffn_down=(h, ff)).items():
            w.add_tensor(f"blk.{i}.{name}.weight", mat(o, n, 1 / np.sqrt(n)))
    w.add_tensor("output_norm.weight", np.ones(h, np.float32))
    w.add_tensor("output.weight", mat(c["vocab"], h, 1 / np.sqrt(h)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    import llamacpp

    tools = llamacpp.build()
    with tempfile.TemporaryDirectory() as tmp:
        f32 = os.path.join(tmp, "tiny.F32.gguf")
        write_f32(f32)
        for qtype in TYPES:
            dest = os.path.join(HERE, f"tiny-llama.{qtype}.gguf")
            subprocess.run([tools["llama-quantize"], f32, dest + ".tmp", qtype, "1"], check=True,
                           stdout=subprocess.DEVNULL)
            os.replace(dest + ".tmp", dest)
            print(dest, os.path.getsize(dest))


if __name__ == "__main__":
    main()
