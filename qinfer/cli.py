"""The command line: parses arguments and calls the public API, nothing more.

Errors a user can act on (QinferError) print one line on stderr and exit 1;
a usage mistake prints one line and exits 2.
"""
import argparse
import sys

from .errors import QinferError

EXIT_ERROR = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _fmt_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.4g} {unit}"
        n /= 1024


def cmd_info(args):
    from . import __version__, kernels
    from .packing import BITWIDTHS

    built = kernels.machine()
    print(f"qinfer {__version__}")
    print(f"CPU:          {built['cpu_model']}")
    print(f"AVX2 + FMA:   {'yes' if kernels.cpu_has_avx2() else 'no'} (kernel path: {kernels.active_path()})")
    print(f"Caches:       L1d {_fmt_bytes(built['l1d_bytes'])}, L2 {_fmt_bytes(built['l2_bytes'])}, "
          f"L3 {_fmt_bytes(built['l3_bytes'])} (read from {built['cache_source']} at build time)")
    print(f"Threads:      {kernels.get_num_threads()} (OpenMP {'on' if kernels.have_openmp() else 'off'})")
    print("Kernel parameters (performance model; mu x tu: qgemm tile, nv: tiles per qgemv step,")
    print("mb x tb: Mini-GEMV block):")
    print(f"  {'bits':>4} {'mu':>3} {'tu':>3} {'nv':>3} {'mb':>5} {'tb':>4} {'registers':>9} {'L1 bytes':>9}")
    for bits in BITWIDTHS:
        p = kernels.params(bits)
        print(f"  {bits:>4} {p['mu']:>3} {p['tu']:>3} {p['nv']:>3} {p['mb']:>5} {p['tb']:>4} "
              f"{p['registers_used']:>9} {p['l1_bytes_used']:>9}")


def build_parser():
    parser = _Parser(prog="qinfer", description="CPU inference for quantized LLaMA-family models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    info = sub.add_parser("info", help="CPU features, cache sizes and the kernel parameters chosen")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(args) or 0
    except QinferError as exc:
        print(f"qinfer: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("qinfer: interrupted", file=sys.stderr)
        return 130
