"""The command line: parses arguments and calls the public API, nothing more.

One module per subcommand (info, generate, chat, serve, quantize, calibrate_kv, perplexity, bench,
sweep, tune), each with add_parser(sub) and run(args); options.py holds what they share.
The library never imports this package: imports run cli -> library only.

Errors a user can act on (QinferError) print one line on stderr and exit 1;
a usage mistake prints one line and exits 2. A setting that runs but may not
do what was meant (engine.QinferWarning) prints one "qinfer: warning:" line.
"""
import argparse
import os
import sys
import warnings

from ..errors import QinferError
from . import bench, calibrate_kv, chat, generate, info, perplexity, quantize, serve, sweep, tune

EXIT_ERROR = 1
EXIT_USAGE = 2
# in `qinfer --help`'s order
SUBCOMMANDS = (info, generate, chat, serve, quantize, calibrate_kv, perplexity, bench, sweep, tune)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser():
    from .. import __version__

    parser = _Parser(prog="qinfer", description="CPU inference for quantized LLaMA-family models.")
    parser.add_argument("--version", action="version", version=f"qinfer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for command in SUBCOMMANDS:
        command.add_parser(sub).set_defaults(func=command.run)
    return parser


def _one_line_warnings(show):
    """A warnings.showwarning that prints qinfer's own warnings as one "qinfer: warning:" line."""
    def showwarning(message, category, filename, lineno, file=None, line=None):
        from ..engine import QinferWarning
        if issubclass(category, QinferWarning):
            print(f"qinfer: warning: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)
    return showwarning


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings(warnings.showwarning)
            return args.func(args) or 0
    except QinferError as exc:
        print(f"qinfer: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("qinfer: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, and keep the
        # interpreter's final flush of stdout from raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except MemoryError:
        print("qinfer: error: out of memory (try a smaller --ctx)", file=sys.stderr)
        return EXIT_ERROR
