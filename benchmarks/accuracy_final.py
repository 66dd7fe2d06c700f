"""The final comparison of benchmarks/accuracy.py (--final-windows): the grid's choices on every window.

The grid (accuracy.py) scores every configuration on a few windows and picks, for
each llama.cpp format, qinfer's best model at the same bitwidth and at any bitwidth
within the format's bits per weight. This stage scores those models, the float
baseline and llama.cpp's formats again on the first --final-windows windows (all of
them by default), which is what the accuracy target is judged on.

GPTQ and SpQR need calibration text that no scored token is in, and when every window
is scored no WikiText-2 text is left over. So their rows are cross-fitted: the
windows are cut in two halves, and each half is scored by a model calibrated on
the other half's text (the same settings, another calibration draw). Every scored
token is then unseen by the calibration of the model that scores it; the row's
perplexity is exp of the mean NLL over both halves. Round to nearest needs no
calibration: one model scores every window.
"""
import gc
import math
import os

import qinfer

from qinfer.perplexity import split_windows

from accuracy import (CALIBRATED, SEQLEN, best_cells, best_match, checkpoint_key, ensure_checkpoint, log, pct,
                      run_llamacpp, score, split_method)


def calibration_text(cache, engine, tokens, start, stop, tag):
    """A text file of tokens[start:stop] (decoded), for GPTQ to draw calibration windows from."""
    os.makedirs(os.path.join(cache, "calib"), exist_ok=True)
    path = os.path.join(cache, "calib", f"{tag}-tokens-{start}-{stop}.txt")
    if not os.path.exists(path):
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(engine.tokenizer.decode(tokens[start:stop]))
        os.replace(path + ".tmp", path)
    return path


def chosen(rows, formats, llamacpp_types):
    """The grid rows the final table needs: per format, the best at its bitwidth and at any bitwidth
    within its bits per weight (each once)."""
    picks = []
    for qtype, bits in llamacpp_types:
        for want in (bits, None):
            m = best_match(rows, want, formats[qtype]["linear_bpw"])
            if m is not None and m not in picks:
                picks.append(m)
    return picks


def final_score(args, store, model, cache, row, windows, folds, data_id):
    """{ppl, nll, tokens, windows, folds} of a grid row's configuration on `windows`."""
    method, bits, g = row["method"], row["bits"], row["group_size"]
    if split_method(method)[0] not in CALIBRATED:
        folds = [(None, None, 0, len(windows))]            # one model, no calibration
    total_nll = tokens = 0.0
    for calib, calib_id, lo, hi in folds:
        ckey = checkpoint_key(method, bits, g, args, calib_id) if calib else row["checkpoint"].split(os.sep)[-1]
        key = f"final|{ckey}|windows={lo}..{hi - 1}|seqlen={SEQLEN}|threads={args.threads}|{data_id}"
        rec = store.get(key)
        if rec is None:
            out = os.path.join(cache, "checkpoints", ckey)
            ensure_checkpoint(model, out, method, bits, g, args, calib)
            log(f"  {row['name']}: windows {lo}..{hi - 1} with {ckey}")
            engine = qinfer.Engine(out, ctx=SEQLEN, threads=args.threads)
            rec = store.put(key, dict(score(engine, windows[lo:hi], args.threads), checkpoint=out))
            del engine
            gc.collect()
        total_nll += rec["nll"] * rec["tokens"]
        tokens += rec["tokens"]
    nll = total_nll / tokens
    return dict(ppl=math.exp(nll), nll=nll, tokens=int(tokens), windows=len(windows), folds=len(folds))


def run_final(args, store, model, tokens, total, cache, rows, formats, float_engine):
    """Rows rescored on the final windows, and llama.cpp on as many chunks: (final dict, llama tuple)."""
    n = total if args.final_windows == 0 else min(args.final_windows, total)
    windows = split_windows(tokens, SEQLEN, n)
    data_id = f"{os.path.basename(args.data)}:{os.path.getsize(args.data)}"
    tag = f"{os.path.splitext(os.path.basename(args.data))[0]}{os.path.getsize(args.data)}"
    half = n // 2
    # fold 0 scores windows [0, half) and calibrates on the text from window `half` on; fold 1 the reverse
    folds = [(calibration_text(cache, float_engine, tokens, half * SEQLEN, len(tokens), tag),
              f"{tag}-from{half * SEQLEN}", 0, half),
             (calibration_text(cache, float_engine, tokens, 0, half * SEQLEN, tag),
              f"{tag}-to{half * SEQLEN}", half, n)]
    log(f"final comparison: {n} windows; GPTQ and SpQR rows cross-fitted on windows 0..{half - 1} and {half}..{n - 1}")
    key = f"final|float32|windows=0..{n - 1}|seqlen={SEQLEN}|threads={args.threads}|{data_id}"
    base = store.get(key) or store.put(key, score(float_engine, windows, args.threads))
    log(f"  float32: ppl {base['ppl']:.4f}")
    results = {}
    for row in chosen(rows, formats, args.llamacpp_types):
        results[row["name"]] = dict(final_score(args, store, model, cache, row, windows, folds, data_id),
                                    name=row["name"], method=row["method"], bits=row["bits"],
                                    group_size=row["group_size"], bpw=row["bpw"], grid_ppl=row["ppl"])
        log(f"  {row['name']}: ppl {results[row['name']]['ppl']:.4f} "
            f"({100 * (results[row['name']]['ppl'] / base['ppl'] - 1):+.2f}% vs float)")
    llama = run_llamacpp(args, store, model, cache, n, float_engine)
    return dict(windows=n, half=half, float=base, rows=results), llama


def report(args, final, llama, grid_rows):
    """Markdown lines of the final comparison (grid_rows: the grid's, which chose the models)."""
    formats, check, _, _ = llama
    n, base = final["windows"], final["float"]["ppl"]
    f32 = formats["F32"]
    L = ["", f"## Final comparison: {n} windows", "",
         f"The accuracy target's table. For each llama.cpp format, the grid above picked qinfer's best model at "
         f"the same bitwidth and at any bitwidth within the format's bits per weight; here those models, "
         f"qinfer's float32 and llama.cpp (`llama-perplexity ... --chunks {n}`) are scored on the first {n} "
         f"windows ({final['float']['tokens']:,} predicted tokens for qinfer). GPTQ and SpQR rows are cross-fitted: "
         f"windows 0..{final['half'] - 1} are scored by a model calibrated on the text from window "
         f"{final['half']} on, windows {final['half']}..{n - 1} by one calibrated on the text before it "
         f"(same settings), so no scored token is in the calibration of the model that scores it; round to "
         f"nearest needs no calibration. Degradation: each engine against its own float model.", "",
         "| llama.cpp | bits/weight (linear) | ppl | vs F32 | qinfer best, same bits (bits/weight) | ppl | vs float "
         "| qinfer best, any bits (bits/weight) | ppl | vs float |",
         "| --- | ---: | ---: | ---: | --- | ---: | ---: | --- | ---: | ---: |"]
    for qtype, bits in args.llamacpp_types:
        r = formats[qtype]
        cells = best_cells(grid_rows, bits, r["linear_bpw"], base, ppl=lambda m: final["rows"][m["name"]]["ppl"])
        L.append(f"| {qtype} | {r['linear_bpw']:.3f} | {r['ppl']:.4f} | {pct(r['ppl'] / f32['ppl'] - 1)} | {cells} |")
    L.append(f"| F32 | 32 | {f32['ppl']:.4f} | - | float32 | {base:.4f} | - | float32 | {base:.4f} | - |")
    if check is not None:
        L += ["", f"Cross-check on these {check['chunks']} chunks: llama.cpp F32 {check['llamacpp_ppl']:.4f}, "
                  f"qinfer float32 under llama.cpp's protocol {check['ppl']:.4f} "
                  f"({100 * check['rel_diff']:+.3f}%)."]
    return L
