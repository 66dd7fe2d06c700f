"""Imports run one way: qinfer/cli/ -> the library -> qinfer.tokenizer, which imports nothing of qinfer.

The rules are read from the source (every import statement, a function's own
imports too, since a lazy import is a dependency all the same); every module
is also imported in a fresh interpreter, where an import cycle between
modules shows up as an ImportError.
"""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"qinfer": ROOT / "qinfer", "qinfer.tokenizer": ROOT / "tokenizer"}   # setup.py's package_dir


def _modules():
    """{dotted name: path} of every module of the installed package (tokenizer/ is qinfer.tokenizer)."""
    out = {}
    for package, directory in PACKAGE_DIRS.items():
        for path in sorted(directory.rglob("*.py")):
            parts = path.relative_to(directory).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join((package,) + parts)
            if not name.startswith("qinfer.tokenizer") or package == "qinfer.tokenizer":
                out[name] = path
    return out


MODULES = _modules()


def imported_names(name):
    """The dotted names a module's import statements name, relative ones resolved, anywhere in it."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            names.add(target)
            names.update(f"{target}.{a.name}" for a in node.names)
    return names


def _under(name, prefix):
    return name == prefix or name.startswith(prefix + ".")


def test_only_the_command_line_imports_the_command_line():
    for name in MODULES:
        if _under(name, "qinfer.cli") or name == "qinfer.__main__":
            continue
        assert not any(_under(i, "qinfer.cli") for i in imported_names(name)), f"{name} imports qinfer.cli"


def test_the_hf_reader_does_not_import_the_gptq_reader():
    # gptq.py builds on hf.py's public helpers; readers/__init__.py chooses between them
    assert not any(_under(i, "qinfer.readers.gptq") for i in imported_names("qinfer.readers.hf"))
    assert not any(i.rpartition(".")[2].startswith("_") and _under(i, "qinfer.readers.hf")
                   for i in imported_names("qinfer.readers.gptq")), "gptq.py imports hf.py's private names"


def test_the_tokenizer_imports_nothing_of_qinfer():
    for name in MODULES:
        if _under(name, "qinfer.tokenizer"):
            outside = [i for i in imported_names(name) if _under(i, "qinfer") and not _under(i, "qinfer.tokenizer")]
            assert not outside, f"{name} imports {outside}"


def _fresh(code):
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(n for n in MODULES if n != "qinfer.__main__")       # __main__ runs the CLI
    out = _fresh(f"import importlib\nfor name in {names!r}:\n    importlib.import_module(name)\nprint('ok')\n")
    assert out.strip() == "ok"


def test_the_library_runs_without_the_command_line():
    out = _fresh("import sys\nimport qinfer.bench, qinfer.perplexity, qinfer.tune\n"
                 "print(sorted(m for m in sys.modules if m.startswith('qinfer.cli')))\n")
    assert out.strip() == "[]"


def test_qinfer_perplexity_is_the_module_and_stays_callable():
    out = _fresh("import inspect, qinfer.perplexity\n"
                 "import qinfer.perplexity as p\n"
                 "import qinfer\n"
                 "print(inspect.ismodule(qinfer.perplexity), inspect.ismodule(p), p is qinfer.perplexity,\n"
                 "      callable(qinfer.perplexity), p.perplexity.__module__)\n")
    assert out.split() == ["True", "True", "True", "True", "qinfer.perplexity"]


@pytest.mark.parametrize("name", ["qinfer.tokenizer", "qinfer.readers", "qinfer.engine"])
def test_tokenizer_errors_are_qinfer_errors(name):
    # The tokenizer's own base, yet `except QinferError` catches what it raises (qinfer/errors.py).
    out = _fresh(f"import {name}\n"
                 "from qinfer import QinferError\n"
                 "from qinfer.tokenizer import TokenizerError, load\n"
                 "try:\n"
                 "    load(None)\n"
                 "except QinferError as e:\n"
                 "    print(isinstance(e, TokenizerError))\n")
    assert out.strip() == "True"
