"""W8A8 perplexity on SmolLM2: SmoothQuant's alpha sweep against plain W8A8 and the float model.

    python benchmarks/w8a8_accuracy.py [--windows 4] [--nsamples 512] [--seqlen 512]
        [--rows zeroquant,sq:0.5,...] [--threads 2]

Every row is a checkpoint `qinfer.quantize` writes (into the accuracy cache, reused when
present) and the engine runs as a user's would (W8A8 rows on the int8 x int8 kernels),
scored with docs/results.md's protocol (WikiText-2 test, windows of 2048 tokens, the first
--windows of them, or all with --windows 0; calibration on the text after the last scored
window, or the whole text when every window is scored). Rows (--rows, comma-separated):

    float             the float model (the GGUF's weights dequantized)
    zeroquant         plain W8A8: int8 weights per row, int8 activations per token
    w8                the same weights with float activations (the checkpoint dequantized)
    zq4, zq4f         ZeroQuant's W4/8-A8 (the MLP at 4 bits in groups of 64, the attention at
                      8), and the same weights with float activations
    sq:A              SmoothQuant with alpha A (a number, or auto)
    sqd:A             ... and down_proj smoothed too (--smooth-down)
    ...:gG            any of the above with G-input weight groups instead of one scale a row
    ...:lorcR         any W8A8/W4A8 row with LoRC's rank-R compensation (--lorc-rank R)
    ...:head          any W8A8/W4A8 row with the LM head quantized too (--int8-lm-head)
    ...:lkdN[@LR]     any W8A8/W4A8 row trained by ZeroQuant's LKD first: N steps a block
                      (--lkd-steps N, --lkd-lr LR; default the seed's 5e-6), on --lkd-nsamples
                      windows of --seqlen tokens of the calibration text
    rtn4g64, rtn4g64:smoothA
                      4-bit round to nearest in groups of 64 (float activations), and the
                      same after smoothing with alpha A (`--smooth`)

SmoothQuant's calibration (the float model's channel maxima, the same for every alpha) is
run once per calibration text and shared by the rows of one run (smoothquant.calibrate,
memoized here).

--cross-fit (with --windows 0: every window scored, so no WikiText-2 text is left that no
scored token is in): the windows are cut in two halves and each half is scored by a
model calibrated (smoothing, LKD) on the other half's text, as benchmarks/accuracy_final.py
does for the final GPTQ and SpQR rows; a row's perplexity is exp of the mean NLL over
both halves. Without it an all-window run calibrates on the scored text itself.
Prints one line per row: perplexity, its change against the float model, seconds.
"""
import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qinfer  # noqa: E402
from accuracy import SEQLEN, calibration_file, default_cache, score  # noqa: E402
from accuracy_final import calibration_text  # noqa: E402
from qinfer.engine import default_model_path  # noqa: E402
from qinfer.perplexity import load_text, split_windows, tokenize  # noqa: E402
from qinfer.quant import smoothquant  # noqa: E402
from qinfer.quant.api import needs_calibration  # noqa: E402

DEFAULT_ROWS = ("float,w8,zeroquant,sq:0.3,sq:0.5,sq:0.7,sq:0.8,sq:0.9,sq:auto,sqd:0.8,sqd:0.8:g64,zq4f,zq4,"
                "rtn4g64,rtn4g64:smooth0.5")


def parse_row(spec):
    """(quantize keyword arguments or None for float, dequantize, label) of a row spec."""
    parts = spec.split(":")
    head, rest = parts[0], parts[1:]
    group, lorc, int8_head, lkd = -1, None, False, None
    for p in list(rest):
        if p == "head":
            int8_head = True
            rest.remove(p)
        if p.startswith("g") and p[1:].isdigit():
            group = int(p[1:])
            rest.remove(p)
        elif p.startswith("lorc") and p[4:].isdigit():
            lorc = int(p[4:])
            rest.remove(p)
        elif p.startswith("lkd"):
            steps, _, lr = p[3:].partition("@")
            lkd = (int(steps), float(lr) if lr else None)
            rest.remove(p)
    kwargs, dequantize, label = _row(head, rest, group)
    if (lorc or int8_head or lkd) and (kwargs is None or kwargs["method"] not in ("zeroquant", "smoothquant")):
        raise SystemExit(f"row {spec!r}: LoRC, LKD and the int8 head go with the W8A8/W4A8 rows")
    if lorc:
        kwargs, label = dict(kwargs, lorc_rank=lorc), f"{label} LoRC rank {lorc}"
    if int8_head:
        kwargs, label = dict(kwargs, lm_head=True), f"{label}, int8 LM head"
    if lkd:
        kwargs = dict(kwargs, lkd_steps=lkd[0], lkd_lr=lkd[1])
        label = f"{label} LKD {lkd[0]} steps" + (f" lr {lkd[1]:g}" if lkd[1] else "")
    return kwargs, dequantize, label


def _row(head, rest, group):
    if head == "float":
        return None, True, "float32"
    if head in ("zeroquant", "w8"):
        return dict(method="zeroquant", group_size=group), head == "w8", \
            ("W8 (float activations)" if head == "w8" else "zeroquant W8A8") + (f" g{group}" if group > 0 else "")
    if head in ("zq4", "zq4f"):
        return dict(method="zeroquant", bits=4, group_size=64), head == "zq4f", \
            "zeroquant W4/8-A8 g64" + (" (float activations)" if head == "zq4f" else "")
    if head in ("sq", "sqd"):
        alpha = rest[0] if rest[0] == "auto" else float(rest[0])
        label = f"smoothquant W8A8 alpha {rest[0]}" + (" +down" if head == "sqd" else "") + \
            (f" g{group}" if group > 0 else "")
        return dict(method="smoothquant", alpha=alpha, smooth_down=head == "sqd", group_size=group), False, label
    if head == "rtn4g64":
        smooth = float(rest[0][len("smooth"):]) if rest else None
        return dict(method="rtn", bits=4, group_size=64, smooth=smooth), False, \
            "rtn 4-bit g64" + (f" smoothed alpha {smooth:g}" if smooth is not None else "")
    raise SystemExit(f"unknown row {head!r}")


def shared_calibration():
    """Make smoothquant.calibrate compute its statistics once per run (every group, with the
    rows alpha "auto" samples) and hand the same ones to every row after."""
    calibrate, memo = smoothquant.calibrate, {}

    def once(source, windows, threads, progress, keep_sample, groups=smoothquant.GROUPS):
        key = windows.tobytes()
        if key not in memo:
            memo[key] = calibrate(source, windows, threads, progress, True, smoothquant.groups_for(True))
        return memo[key]
    smoothquant.calibrate = once


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                  "..", "shared", "data", "wikitext-2-raw", "wiki.test.raw"))
    p.add_argument("--windows", type=int, default=4, help="scored windows (0: all)")
    p.add_argument("--nsamples", type=int, default=512, help="SmoothQuant's calibration windows")
    p.add_argument("--lkd-nsamples", type=int, default=128, help="LKD's calibration windows (rows ...:lkdN)")
    p.add_argument("--seqlen", type=int, default=512, help="... of this many tokens (SmoothQuant's and LKD's)")
    p.add_argument("--rows", default=DEFAULT_ROWS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cross-fit", action="store_true",
                   help="score each half of the windows by models calibrated on the other half's text")
    args = p.parse_args()
    shared_calibration()

    model_path = default_model_path()
    engine = qinfer.Engine(model_path, dequantize=True, ctx=SEQLEN, threads=args.threads)
    text = load_text(args.data)
    tokens = tokenize(engine, text)
    total = len(tokens) // SEQLEN
    n_eval = total if args.windows == 0 else args.windows
    if args.cross_fit and n_eval < 2:
        p.error("--cross-fit needs at least 2 windows")
    windows = split_windows(tokens, SEQLEN, n_eval)
    cache = default_cache()
    folds = calibration_folds(args, cache, engine, text, tokens, n_eval, total)
    print(f"qinfer {qinfer.__version__}; {n_eval} windows of {SEQLEN} tokens; SmoothQuant calibration: "
          f"{args.nsamples} windows of {args.seqlen} tokens from {folds[0][1]}"
          + (f"; {folds[1][1]}" if len(folds) > 1 else ""), flush=True)
    base = None
    for spec in args.rows.split(","):
        kwargs, dequantize, label = parse_row(spec)
        t0 = time.perf_counter()
        got = score_row(args, model_path, cache, spec, kwargs, dequantize, windows, n_eval, folds)
        if base is None:
            base = got["ppl"] if kwargs is None else None
        change = f"{(got['ppl'] / base - 1) * 100:+.2f}%" if base else "-"
        print(f"{label:<44} ppl {got['ppl']:.4f}  {change:>8}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0 if base is None or math.isfinite(base) else 1     # a run without the float row has no base


def calibration_folds(args, cache, engine, text, tokens, n_eval, total):
    """[(calibration file, its description, its checkpoint tag, first window, end window)]: one
    fold scoring every window, or with --cross-fit two, each calibrated on the other's text."""
    if not args.cross_fit:
        calib, note, _ = calibration_file(cache, text, tokens, engine, n_eval, total)
        return [(calib, note, "", 0, n_eval)]
    half = n_eval // 2
    tag = f"{os.path.splitext(os.path.basename(args.data))[0]}{os.path.getsize(args.data)}"
    cut = half * SEQLEN
    end = len(tokens) if n_eval == total else n_eval * SEQLEN
    return [(calibration_text(cache, engine, tokens, cut, end, tag),
             f"tokens {cut:,}..{end - 1:,} for windows 0..{half - 1}", f"-from{cut}", 0, half),
            (calibration_text(cache, engine, tokens, 0, cut, tag),
             f"tokens 0..{cut - 1:,} for windows {half}..{n_eval - 1}", f"-to{cut}", half, n_eval)]


def score_row(args, model_path, cache, spec, kwargs, dequantize, windows, n_eval, folds):
    """{ppl, nll, tokens} of one row over the windows: each fold's windows scored by the row's
    checkpoint calibrated on that fold's text (written into the cache once)."""
    calibrated = kwargs is not None and needs_calibration(kwargs["method"], kwargs.get("smooth"),
                                                          kwargs.get("lkd_steps"))
    if not calibrated:
        folds = [(None, None, "", 0, n_eval)]       # the float model, or nothing calibrated: one model
    nll_sum = tokens = 0.0
    for calib, _, fold_tag, lo, hi in folds:
        path = model_path
        if kwargs is not None:
            tag = {"w8": "zeroquant", "zq4f": "zq4"}.get(spec, spec.replace(":", "-"))
            lkd = kwargs.get("lkd_steps")
            tag += f"-{args.lkd_nsamples}lkd" if lkd else ""
            path = os.path.join(cache, "w8a8", f"{tag}-{n_eval}w-{args.nsamples}x{args.seqlen}{fold_tag}")
            if not os.path.isdir(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                row = kwargs
                if calib is not None:
                    nsamples = args.nsamples if kwargs["method"] == "smoothquant" else args.lkd_nsamples
                    row = dict(kwargs, calib=calib, nsamples=nsamples, seqlen=args.seqlen)
                qinfer.quantize(model_path, path, threads=args.threads, progress=False,
                                **{k: v for k, v in row.items() if v is not None})
        run = qinfer.Engine(path, dequantize=dequantize, ctx=SEQLEN, threads=args.threads)
        got = score(run, windows[lo:hi], args.threads)
        del run
        nll_sum += got["nll"] * got["tokens"]
        tokens += got["tokens"]
    nll = nll_sum / tokens
    return dict(ppl=math.exp(nll), nll=nll, tokens=int(tokens))


if __name__ == "__main__":
    sys.exit(main())
