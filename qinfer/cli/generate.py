"""`qinfer generate`: text from a prompt (or the chat template around it), streamed to stdout."""
import sys

from ..errors import QinferError
from .options import add_model_options, kv_cache_args


def add_parser(sub):
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
    return gen


def _read_prompt(args):
    if args.prompt is not None:
        return args.prompt
    if sys.stdin is None or sys.stdin.isatty():
        raise QinferError("no prompt: pass --prompt TEXT or pipe the prompt on stdin")
    prompt = sys.stdin.read()
    if not prompt.strip():
        raise QinferError("the prompt read from stdin is empty")
    return prompt


def run(args):
    from ..engine import Engine

    prompt = _read_prompt(args)
    engine = Engine(args.model, threads=args.threads, ctx=args.ctx, quantize=args.quantize,
                    group_size=args.group_size, dequantize=args.dequantize, activations=args.activations, **kv_cache_args(args))
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
