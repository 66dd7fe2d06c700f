"""SpQR's accuracy on SmolLM2 before it has kernels: perplexity of the weights it stands for.

    python benchmarks/spqr_accuracy.py [--windows 4] [--nsamples 8] [--bits 3]
        [--thresholds inf,0.2] [--stat-bits 3] [--group-size 16] [--act-order] [--clip-search]
        [--threads 2]

Each linear map is quantized with qinfer/quant/spqr.py in GPTQ's layer loop
(qinfer.quant.api.calibrated_layers: the same calibration, Hessians, sink
weight 256 and damp 0.01 as docs/results.md's GPTQ rows; --act-order as they
do), and the model then runs the float weights the SpQR layers stand for
(SpqrResult.dequantize: the dense codes with their compressed statistics, plus
the outliers), scored with docs/results.md's protocol (WikiText-2 test, windows
of 2048 tokens, the first --windows of them; calibration on the text after the
last scored window). Printed per threshold: perplexity, its change against the
float model, bits per weight of the linear layers (SpqrResult.bits_per_weight:
the paper's count) and the outlier rate. docs/results.md gives GPTQ's rows
to set them against (issue 38's targets).
"""
import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qinfer  # noqa: E402
from accuracy import SEQLEN, calibration_file, default_cache, score  # noqa: E402
from qinfer.engine import default_model_path  # noqa: E402
from qinfer.perplexity import load_text, split_windows, tokenize  # noqa: E402
from qinfer.quant.api import calibrated_layers  # noqa: E402
from qinfer.quant.calibration import calibration_windows  # noqa: E402
from qinfer.quant.progress import Progress  # noqa: E402
from qinfer.quant.spqr import spqr_quantize  # noqa: E402
from qinfer.readers import open_model  # noqa: E402

SINK_WEIGHT = 256
DAMP = 0.01


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                  "..", "shared", "data", "wikitext-2-raw", "wiki.test.raw"))
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--stat-bits", type=int, default=3)
    p.add_argument("--stat-group", type=int, default=16)
    p.add_argument("--thresholds", default="inf,0.2", help="outlier thresholds, comma-separated (inf: none)")
    p.add_argument("--act-order", action="store_true", help="columns by decreasing Hessian diagonal")
    p.add_argument("--clip-search", action="store_true", help="each group's range by the clip search")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    model_path = default_model_path()
    engine = qinfer.Engine(model_path, dequantize=True, ctx=SEQLEN, threads=args.threads)
    text = load_text(args.data)
    tokens = tokenize(engine, text)
    windows = split_windows(tokens, SEQLEN, args.windows)
    total = len(tokens) // SEQLEN
    calib, note, _ = calibration_file(default_cache(), text, tokens, engine, args.windows, total)
    calib_windows = calibration_windows(calib, engine.tokenizer, args.nsamples, SEQLEN, 0)
    base = score(engine, windows, args.threads)
    print(f"float32: ppl {base['ppl']:.4f} ({args.windows} windows; calibration: {note})", flush=True)
    source = open_model(model_path)
    for threshold in (float(t) for t in args.thresholds.split(",")):
        t0 = time.perf_counter()
        floats = {}                     # base name -> (short name, the weights the layer stands for)

        def spqr(base_name, name, w, h, prepared):
            res = spqr_quantize(w, prepared, args.bits, args.group_size, args.stat_bits, args.stat_group,
                                threshold, clip=args.clip_search)
            floats[base_name] = (name, res.dequantize())
            return res, floats[base_name][1]

        results = calibrated_layers(source, calib_windows, args.threads, False,
                                    Progress(source.config.num_hidden_layers, enabled=True), spqr,
                                    sink_weight=SINK_WEIGHT, damp=DAMP, act_order=args.act_order)
        quantized = qinfer.Engine(model_path, dequantize=True, ctx=SEQLEN, threads=args.threads)
        for base_name, (name, weights) in floats.items():
            layer = int(base_name.split(".")[2])          # model.layers.<i>.<...>
            quantized.model.replace_linear(layer, name, weights)
        got = score(quantized, windows, args.threads)
        weights = sum(r.codes.size for r in results.values())
        bpw = sum(r.bits_per_weight() * r.codes.size for r in results.values()) / weights
        outliers = sum(r.n_outliers for r in results.values()) / weights
        change = (got["ppl"] / base["ppl"] - 1) * 100
        print(f"spqr {args.bits}-bit g{args.group_size} stats {args.stat_bits}-bit/{args.stat_group} rows"
              f"{', act-order' if args.act_order else ''}{', clip search' if args.clip_search else ''}, "
              f"threshold {threshold:g}: ppl {got['ppl']:.4f} ({change:+.2f}%), {bpw:.3f} bits/weight, "
              f"outliers {outliers * 100:.2f}% ({time.perf_counter() - t0:.0f} s)", flush=True)
        del quantized
    return 0 if math.isfinite(base["ppl"]) else 1


if __name__ == "__main__":
    sys.exit(main())
