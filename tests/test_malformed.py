"""Issue 41: malformed inputs must give one QinferError (and `qinfer: error:` from the CLI), fast.

Every bad input is built here from the tiny writers of test_readers.py.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("gguf")

from qinfer.errors import QinferError
from qinfer.readers import open_model
from gguf import GGUFValueType as VT

import llama_reference as ref
from test_readers import build_gguf, raises_qinfer, tiny_kvs, tiny_tensors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gguf_file(tmp_path, name="bad.gguf", tensors=None, **kv_override):
    data, _ = build_gguf(tiny_kvs(**kv_override), tiny_tensors() if tensors is None else tensors)
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def load_tokenizer(path):
    from qinfer.tokenizer import load
    return load(open_model(path).tokenizer)


def cli(*args, timeout=60):
    """Run `python -m qinfer ...`: -> (returncode, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "qinfer", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    return proc.returncode, proc.stderr


def assert_one_error_line(rc, err, match=None):
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("qinfer: error:"), err
    if match:
        assert match in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------- 1. GGUF tokenizer metadata

V = 64


@pytest.mark.parametrize("override, match", [
    (dict(**{"tokenizer.ggml.scores": (VT.ARRAY, (VT.FLOAT64, [1e300] * V))}), "tokenizer.ggml.scores"),
    (dict(**{"tokenizer.ggml.scores": (VT.ARRAY, (VT.FLOAT32, [float("nan")] * V))}), "tokenizer.ggml.scores"),
    (dict(**{"tokenizer.ggml.token_type": (VT.ARRAY, (VT.FLOAT32, [float("inf")] * V))}), "token_type"),
    (dict(**{"tokenizer.ggml.token_type": (VT.ARRAY, (VT.FLOAT32, [1.5] * V))}), "token_type"),
    (dict(**{"tokenizer.ggml.unknown_token_id": (VT.FLOAT32, float("inf"))}), "unknown_token_id"),
    (dict(**{"tokenizer.ggml.bos_token_id": (VT.FLOAT64, float("nan"))}), "bos_token_id"),
    (dict(**{"tokenizer.ggml.tokens": (VT.STRING, "abc")}), "tokenizer.ggml.tokens"),
    (dict(**{"tokenizer.ggml.tokens": (VT.UINT32, 7)}), "tokenizer.ggml.tokens"),
    (dict(**{"tokenizer.ggml.scores": (VT.FLOAT32, 1.0)}), "tokenizer.ggml.scores"),
    (dict(**{"tokenizer.ggml.model": (VT.STRING, "gpt2"),
             "tokenizer.ggml.merges": (VT.STRING, "a b")}), "tokenizer.ggml.merges"),
    (dict(**{"tokenizer.ggml.model": (VT.STRING, "gpt2"),
             "tokenizer.ggml.merges": (VT.ARRAY, (VT.STRING, [])),
             "tokenizer.ggml.pre": (VT.ARRAY, (VT.STRING, ["x"]))}), "tokenizer.ggml.pre"),
    (dict(**{"tokenizer.ggml.model": (VT.ARRAY, (VT.STRING, ["llama"]))}), "tokenizer.ggml.model"),
])
def test_gguf_tokenizer_metadata_wrong_type_or_non_finite(tmp_path, override, match):
    path = gguf_file(tmp_path, **override)
    raises_qinfer(lambda: load_tokenizer(path), match=match)


def test_gguf_sentencepiece_vocab_without_unknown_token(tmp_path):
    # tiny_kvs's vocabulary has only NORMAL tokens and no unknown_token_id.
    path = gguf_file(tmp_path)
    raises_qinfer(lambda: load_tokenizer(path), match="no unknown token")


# --------------------------------------------------------------------------- 1. context lengths

def test_gguf_context_length_of_2_31_is_refused(tmp_path):
    path = gguf_file(tmp_path, **{"llama.context_length": (VT.UINT64, 1 << 31)})
    raises_qinfer(lambda: open_model(path), match="max_position_embeddings")
    assert_one_error_line(*cli("generate", "--model", path, "--prompt", "hi"), match="max_position_embeddings")


def test_hf_max_position_embeddings_of_2_31_is_refused(tmp_path):
    ref.write_tiny_llama(tmp_path / "m", max_position_embeddings=1 << 31)
    raises_qinfer(lambda: open_model(tmp_path / "m"), match="max_position_embeddings")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "m"
    ref.write_tiny_llama(d, chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    return d


needs_tokenizer = pytest.mark.skipif(not ref.tokenizer_available(), reason="llama2 tokenizer.model not in ../shared")


@needs_tokenizer
def test_ctx_beyond_2_31_is_a_clean_error(tiny_dir):
    from qinfer import Engine
    raises_qinfer(lambda: Engine(tiny_dir, ctx=1 << 40), match="context length 1099511627776")
    line = assert_one_error_line(*cli("generate", "--model", str(tiny_dir), "--prompt", "hi",
                                      "--ctx", str(1 << 40)), match="context length")
    assert "1099511627776" in line


@needs_tokenizer
def test_ctx_too_large_to_allocate_names_the_bytes(tiny_dir):
    import warnings
    from qinfer import Engine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        err = raises_qinfer(lambda: Engine(tiny_dir, ctx=(1 << 31) - 1))
    assert "context of 2147483647" in str(err) and "bytes" in str(err)


# --------------------------------------------------------------------------- 1. HF tokenizer files

def _tok_dir(tiny_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    return d


@needs_tokenizer
def test_added_tokens_decoder_entries_that_are_strings(tiny_dir, tmp_path):
    d = _tok_dir(tiny_dir, tmp_path)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {"32000": "<x>"}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    raises_qinfer(lambda: load_tokenizer(d), match="added token '32000' must be a dict")


@needs_tokenizer
@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_deeply_nested_tokenizer_json(tiny_dir, tmp_path, name):
    d = _tok_dir(tiny_dir, tmp_path)
    (d / name).write_text('{"model": ' + "[" * 100000 + "]" * 100000 + "}")
    raises_qinfer(lambda: load_tokenizer(d), match=name)


# --------------------------------------------------------------------------- 1. GPTQ settings

@needs_tokenizer
@pytest.mark.parametrize("value", [["gptq"], {"a": 1}])
def test_gptq_checkpoint_format_not_a_string(tmp_path, value):
    from test_quant import write_autogptq
    write_autogptq(tmp_path / "g", 4, 32, False, True, "gptq")
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())
    cfg["quantization_config"]["checkpoint_format"] = value
    (tmp_path / "g" / "config.json").write_text(json.dumps(cfg))
    raises_qinfer(lambda: open_model(tmp_path / "g"), match="'checkpoint_format' must be a string")
