"""The sweep's table: one markdown row per configuration, written whole or not at all.

Perplexity is compared with the float row's wherever each ran (it does not depend on
the machine); decode speed only with a float row measured on the same node, and
"-" otherwise: a ratio of two machines' speeds says nothing about the method.
"""
import os

from .runner import float_row

HEADER = ("| configuration | ppl | vs float | size MiB | bits/weight | decode tok/s | decode vs float (same node) "
          "| node | status |")


def markdown(result, sweep):
    rows = result.rows
    base = float_row(rows)
    lines = [HEADER, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | - | - | - | - | - | - | {r['node']} | failed: {_cell(r['reason'])} |")
            continue
        vs = f"{100 * (r['ppl'] / base['ppl'] - 1):+.2f}%" if base and r is not base else "-"
        tps = f"{r['decode_tps']:.1f}" if r.get("decode_tps") else "-"
        same = base and r is not base and base["node"] == r["node"] and r.get("decode_tps") and base.get("decode_tps")
        ratio = f"{r['decode_tps'] / base['decode_tps']:.2f}x" if same else "-"
        lines.append(f"| {r['name']} | {r['ppl']:.4f} | {vs} | {r['size_mib']:.1f} | {r['bpw']:.3f} | {tps} | "
                     f"{ratio} | {r['node']} | ok |")
    nodes = sorted({r["node"] for r in rows})
    notes = [f"{len(rows)} configurations ({result.ran} run now, {result.cached} from the cache, {result.failed} "
             f"failed); {result.rows[0].get('windows', sweep.windows) if rows else sweep.windows} windows of "
             f"{sweep.seqlen} tokens of {os.path.basename(sweep.data)}; {sweep.threads} threads a configuration; "
             f"node{'s' if len(nodes) > 1 else ''}: {', '.join(nodes)}."]
    if result.calibration:
        notes.append(f"Calibration ({sweep.nsamples} windows of {sweep.seqlen} tokens, seed {sweep.seed}): "
                     f"{result.calibration}.")
    return "\n".join(lines + [""] + notes) + "\n"


def _cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def write_atomic(path, text):
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
