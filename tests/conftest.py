"""Test-wide settings.

QINFER_TUNE=0: no test run spends time tuning kernels or reads the user's
tuning cache, so every layer runs the performance model's parameters and
results do not depend on the machine's cache. Tests of the tuner turn it on
for themselves (tests/test_tune.py). Set before any test imports qinfer, and
inherited by the subprocesses the CLI tests start.

Shared helpers (CLI runs, skip markers, the reference packer) are in
tests/helpers.py; the fixtures `write_tiny` (a tiny model) and `restore_threads` are here.
"""
import os

os.environ["QINFER_TUNE"] = "0"
# The thread governor (pyx/team.h) may run a 2-thread step on 1 thread when that is
# faster; the results are the same bit for bit, but a test of the decode team must
# run the team it asks for. tests/test_threads.py turns the governor on for itself.
os.environ["QINFER_ADAPT_THREADS"] = "0"
# The KV cache's default is q8 (qinfer/kv_cache.py); tests that hold the engine against
# a float reference compute exact attention, so the tests' default is f32. Tests of the
# coded formats ask for them by name; tests of the default itself unset this.
os.environ["QINFER_KV_CACHE"] = "f32"

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_reference as ref  # noqa: E402
from helpers import REQUIREMENTS, skip_unless_available, skip_without_tokenizer  # noqa: E402  (after the settings)


def pytest_configure(config):
    for name, (_, reason) in REQUIREMENTS.items():
        config.addinivalue_line("markers", f"{name}: skipped when missing ({reason})")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    skip_unless_available(item)        # the needs_* markers of tests/helpers.py


@pytest.fixture
def restore_threads():
    """Puts qinfer's thread count back after a test that sets it (qinfer.set_num_threads)."""
    import qinfer

    before = qinfer.get_num_threads()
    yield
    qinfer.set_num_threads(before)


@pytest.fixture(scope="session")
def write_tiny(tmp_path_factory):
    """write_tiny(name, **options) -> (directory, weights, config): a tiny random Hugging Face
    LLaMA directory in a fresh temporary directory (llama_reference.write_tiny_llama's options:
    tied, seed, chat_template, max_position_embeddings, ...). Skips the test when the LLaMA 2
    tokenizer (../shared) is absent. For module-scoped fixtures of the test modules."""
    def write(name, **options):
        skip_without_tokenizer()
        d = tmp_path_factory.mktemp(name)
        weights, config = ref.write_tiny_llama(d, **options)
        return d, weights, config
    return write
