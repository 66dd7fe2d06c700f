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
from helpers import needs_tokenizer
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
    assert "context of 2147483647" in str(err) and "GiB" in str(err) and "--ctx" in str(err)


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
    raises_qinfer(lambda: load_tokenizer(d), match="entry '32000' must be a dict")


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


# --------------------------------------------------------------------------- 2. hangs: GPTQ dynamic rules

@pytest.mark.parametrize("pattern", [r"(.*)*z", r"(a+)+$", r"(a|a)*z", r".*.*.*.*.*z", "a" * 2000])
def test_gptq_dynamic_rule_that_could_backtrack_is_refused(pattern):
    from qinfer.errors import FormatError
    from qinfer.quant.dynamic import Rules
    raises_qinfer(lambda: Rules({"-:" + pattern: {}}, "quantize_config.json"), match="refused", kind=FormatError)


def test_gptq_dynamic_usual_rules_still_accepted():
    from qinfer.quant.dynamic import Rules
    r = Rules({r"+:.*\.mlp\.down_proj": {"bits": 8}, r"-:model\.layers\.(0|1)\..*": {},
               r".*\.layers\.\d+\.self_attn\..*": {"group_size": 32}}, "q")
    assert r.resolve("model.layers.3.mlp.down_proj", {"bits": 4})["bits"] == 8
    assert r.resolve("model.layers.1.self_attn.q_proj", {"bits": 4}) is None


@needs_tokenizer
def test_gptq_dynamic_backtracking_rule_from_the_cli(tmp_path):
    from test_quant import write_autogptq
    write_autogptq(tmp_path / "g", 4, 32, False, True, "gptq", dynamic={"-:(.*)*z": {}})
    line = assert_one_error_line(*cli("generate", "--model", str(tmp_path / "g"), "--prompt", "hi",
                                      "--max-new-tokens", "1"))
    assert "(.*)*z" in line and "refused" in line


# --------------------------------------------------------------------------- 2./3. chat templates

class _Tok:
    bos_id, eos_id = 1, 2

    def id_to_piece(self, i):
        return {1: "<s>", 2: "</s>"}[i]


def render(template):
    from qinfer.chat import render_chat
    return render_chat(template, [{"role": "user", "content": "hi"}], _Tok())


@pytest.mark.parametrize("template, match", [
    ("{{ 'a' * 10**9 }}", "repeats a sequence"),
    ("{{ [0] * 10**9 }}", "repeats a sequence"),
    ("{{ 2 ** 100000000 }}", "too large a number"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "loop iterations"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}", "stopped"),
    ("{{ '%0999999999d' % 1 }}", "format width"),
    ("{{ '%0999999999d' | format(1) }}", "format width"),
    ("{{ '{:>999999999}'.format(1) }}", "format width"),
    ("{{ 'a'.center(10**9) }}", "width"),
    ("{{ 'a' | center(10**9) }}", "width"),
    ("{{ 'a' | indent(10**9) }}", "width"),
    ("{% set ns = namespace(s='a') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
     "with '~'"),
    ("{% set ns = namespace(s='a' * 1000) %}{% for i in range(10000) %}{{ ns.s }}{% endfor %}", "output exceeds"),
])
def test_chat_template_runaway_is_stopped(template, match):
    import time
    start = time.monotonic()
    err = raises_qinfer(lambda: render(template), match=match)
    assert "chat template" in str(err)
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("template, match", [
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{{ 1 + 'a' }}", "TypeError"),
    ("{% include 'x' %}", "chat template could not be rendered"),
    ("{% extends 'x' %}", "chat template could not be rendered"),
    ("{% import 'x' as y %}", "chat template could not be rendered"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "chat template could not be rendered"),
    ("{{ 'abcdefgh' | truncate(-5) }}", "chat template could not be rendered"),
    ("{{ 'abc def' | wordwrap(0) }}", "chat template could not be rendered"),
    ("{{ '\\ud800' }}", "not valid Unicode"),
    ("{% for %}", "chat template could not be rendered"),
])
def test_chat_template_errors_are_one_qinfer_error(template, match):
    raises_qinfer(lambda: render(template), match=match)


def test_ordinary_chat_template_still_renders():
    t = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] | trim }}{{ eos_token }}{% endfor %}"
         "{% if add_generation_prompt %}<|assistant|>{% endif %}{{ '%d' % 3 }}{{ 'x'.center(5) }}")
    assert render(t) == "<|user|>hi</s><|assistant|>3  x  "


@needs_tokenizer
def test_chat_template_error_from_the_cli(tiny_dir, tmp_path):
    d = _tok_dir(tiny_dir, tmp_path)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ 'a' * 10**9 }}"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    line = assert_one_error_line(*cli("generate", "--model", str(d), "--prompt", "hi", "--chat",
                                      "--max-new-tokens", "1"), match="chat template")
    assert "repeats a sequence" in line


@needs_tokenizer
def test_prompt_with_a_lone_surrogate(tiny_dir):
    proc = subprocess.run([sys.executable, "-m", "qinfer", "generate", "--model", str(tiny_dir),
                           "--prompt", b"hi \xff".decode("utf-8", "surrogateescape"), "--max-new-tokens", "1"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    line = assert_one_error_line(proc.returncode, proc.stderr, match="not valid Unicode")
    assert "U+DCFF" in line
    from qinfer.tokenizer import load
    tok = load(open_model(tiny_dir).tokenizer)
    raises_qinfer(lambda: tok.encode("a\ud800b"), match="lone surrogate U\\+D800")


# --------------------------------------------------------------------------- 4. accepted silently, then garbage

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_float_weights_in_a_gguf(tmp_path, bad):
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    tensors = tiny_tensors()
    for i, t in enumerate(tensors):
        if t[0] == "blk.0.ffn_down.weight":
            assert t[2] == Q.F32
            w = np.frombuffer(t[3], dtype="<f4").copy()
            w[5] = bad
            tensors[i] = (t[0], t[1], t[2], w.tobytes())
    path = gguf_file(tmp_path, tensors=tensors)
    from qinfer.model import Model
    err = raises_qinfer(lambda: Model(open_model(path)), match="non-finite")
    assert "model.layers.0.mlp.down_proj.weight" in str(err)


@needs_tokenizer
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_non_finite_float_weights_in_safetensors(tmp_path, dtype):
    import numpy as np
    d = tmp_path / "m"
    ref.write_tiny_llama(d, dtype=np.dtype(dtype))
    from safetensors.numpy import load_file, save_file
    t = load_file(str(d / "model.safetensors"))
    t["model.layers.1.input_layernorm.weight"][3] = np.nan
    save_file(t, str(d / "model.safetensors"))
    err = raises_qinfer(lambda: __import__("qinfer").Engine(d), match="non-finite")
    assert "model.layers.1.input_layernorm.weight" in str(err)
    assert_one_error_line(*cli("generate", "--model", str(d), "--prompt", "hi"), match="non-finite")


def test_gguf_vocab_size_differs_from_token_list(tmp_path):
    path = gguf_file(tmp_path, **{"llama.vocab_size": (VT.UINT32, 65)})
    raises_qinfer(lambda: open_model(path), match="vocab_size is 65 but tokenizer.ggml.tokens lists 64")


@needs_tokenizer
def test_hf_num_hidden_layers_smaller_than_the_files(tmp_path):
    d = tmp_path / "m"
    _, cfg = ref.write_tiny_llama(d)
    cfg["num_hidden_layers"] -= 1
    (d / "config.json").write_text(json.dumps(cfg))
    n = cfg["num_hidden_layers"]
    raises_qinfer(lambda: open_model(d), match=f"tensors of layer {n} but config.json's num_hidden_layers is {n}")


def _gptq(tmp_path, **kw):
    from test_quant import write_autogptq
    d = tmp_path / "g"
    write_autogptq(d, 4, 32, kw.pop("act_order", False), True, "gptq", **kw)
    return d


def _edit_qc(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


@needs_tokenizer
@pytest.mark.parametrize("value", ["true", 1, None.__class__.__name__])
def test_gptq_desc_act_not_a_boolean(tmp_path, value):
    d = _gptq(tmp_path)
    _edit_qc(d, desc_act=value)
    raises_qinfer(lambda: open_model(d), match="'desc_act' must be true or false")


@needs_tokenizer
def test_gptq_group_size_disagrees_with_g_idx(tmp_path):
    import numpy as np

    def regroup(tensors):          # g_idx of 64-row groups under a group_size of 32
        for name, t in tensors.items():
            if name.endswith(".g_idx"):
                tensors[name] = (np.arange(t.shape[0]) // 64).astype(np.int32)
    d = _gptq(tmp_path, tensor_hook=regroup, act_order=True)
    raises_qinfer(lambda: open_model(d), match="g_idx disagrees with the group size")


@needs_tokenizer
def test_gptq_layer_stored_both_quantized_and_float(tmp_path):
    import numpy as np

    def both(tensors):
        tensors["model.layers.0.mlp.up_proj.weight"] = np.zeros((96, 64), np.float16)
    d = _gptq(tmp_path, tensor_hook=both)
    raises_qinfer(lambda: open_model(d), match="stored twice")


def test_gguf_unknown_token_id_of_a_normal_token_is_taken_as_unk(tmp_path):
    path = gguf_file(tmp_path, **{"tokenizer.ggml.unknown_token_id": (VT.UINT32, 0)})
    tok = load_tokenizer(path)
    assert tok.encode("tok5") != []


@needs_tokenizer
def test_non_finite_float16_embedding(tmp_path):
    import numpy as np
    d = tmp_path / "m"
    ref.write_tiny_llama(d, dtype=np.float16)
    from safetensors.numpy import load_file, save_file
    t = load_file(str(d / "model.safetensors"))
    t["model.embed_tokens.weight"][7, 1] = np.inf
    save_file(t, str(d / "model.safetensors"))
    raises_qinfer(lambda: open_model(d), match=r"'model.embed_tokens.weight' holds a non-finite value \(inf\) at \[7, 1\]")


def test_chat_template_range_still_behaves_like_range():
    assert render("{{ 'a' ~ 1 ~ none }}{{ range(3)|list }}{{ range(4)|length }}{{ range(5)[2] }}{{ range(3)|reverse|list }}"
                  "{{ 2 in range(3) }}{% for i in range(2) %}{{ loop.index }}{{ loop.length }}{% endfor %}") \
        == "a1None[0, 1, 2]42[2, 1, 0]True1222"


def test_chat_template_long_message_is_not_a_runaway():
    from qinfer.chat import render_chat
    t = "{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] + '</>' }}{% endfor %}"
    text = render_chat(t, [{"role": "user", "content": "x" * 3_000_000}], _Tok())
    assert len(text) == 3_000_000 + 9
