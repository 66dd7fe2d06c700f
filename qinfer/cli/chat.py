"""`qinfer chat`: an interactive chat in the terminal that keeps the conversation in the KV cache.

Each turn renders the whole conversation with the model's chat template, and
Engine.chat prefills only what the cache does not hold yet (the new turn), so
a long conversation does not get slower to answer. Lines are edited with
readline (history kept for the session); Ctrl-C stops a reply (the part
written stays in the conversation), Ctrl-D or /exit ends the chat.
"""
import sys

from ..errors import QinferError
from .options import add_model_options, kv_cache_args

HELP = """commands:
  /reset         forget the conversation (the system message stays)
  /system TEXT   set the system message and start again (/system alone removes it)
  /exit          leave (Ctrl-D too); Ctrl-C stops a reply"""


def add_parser(sub):
    p = sub.add_parser("chat", help="chat with the model in the terminal",
                       description="An interactive chat with the model's chat template. " + HELP.replace("\n", " "))
    add_model_options(p)
    p.add_argument("--system", default=None, metavar="TEXT", help="a system message to start with")
    p.add_argument("--max-new-tokens", type=int, default=512, metavar="N", help="per reply (default 512)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = off (default)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="1 = off (default)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="random seed for sampling")
    return p


class ChatSession:
    """The conversation and its commands, apart from the terminal (the tests drive it)."""

    def __init__(self, engine, system=None, **options):
        if not engine.chat_template:
            raise QinferError("this model has no chat template; use `qinfer generate`")
        self.engine, self.options, self.system = engine, options, system
        self.messages = self._start()

    def _start(self):
        return [{"role": "system", "content": self.system}] if self.system else []

    def command(self, line):
        """Run a /command: a message for the user, or None to leave."""
        name, _, rest = line.strip().partition(" ")
        if name in ("/exit", "/quit"):
            return None
        if name == "/reset":
            self.messages = self._start()
            self.engine.reset()
            return "(conversation cleared)"
        if name == "/system":
            self.system = rest.strip() or None
            self.messages = self._start()
            self.engine.reset()
            return "(system message set; conversation cleared)" if self.system else "(system message removed)"
        if name == "/help":
            return HELP
        return f"unknown command {name}; /help lists them"

    def reply(self, text):
        """Yield the reply's pieces; the reply joins the conversation, whole or as far as it got."""
        self.messages.append({"role": "user", "content": text})
        written = []
        try:
            for piece in self.engine.chat(self.messages, stream=True, reuse_cache=True, **self.options):
                written.append(piece)
                yield piece
        finally:
            self.messages.append({"role": "assistant", "content": "".join(written)})


def _readline():
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass


def run(args):
    from ..engine import Engine

    engine = Engine(args.model, threads=args.threads, ctx=args.ctx, quantize=args.quantize,
                    group_size=args.group_size, **kv_cache_args(args))
    session = ChatSession(engine, system=args.system, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          repetition_penalty=args.repetition_penalty, seed=args.seed)
    _readline()
    print(f"qinfer chat: {engine.model_path} (context {engine.ctx} tokens). /help for commands, "
          "Ctrl-D to leave.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)                      # Ctrl-C at the prompt: a fresh line
            continue
        if not line.strip():
            continue
        if line.lstrip().startswith("/"):
            said = session.command(line)
            if said is None:
                return 0
            print(said, file=sys.stderr)
            continue
        try:
            for piece in session.reply(line):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        except QinferError as exc:                      # e.g. the context is full: say so, keep chatting
            session.messages.pop()                      # the reply that did not happen
            session.messages.pop()
            print(f"\nqinfer: error: {exc} (/reset starts again)", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        s = engine.last_stats
        print(f"[{s.generated_tokens} tokens, {s.decode_tokens_per_second:.1f} tokens/s, "
              f"{s.prompt_tokens - s.cached_tokens} of {s.prompt_tokens} prompt tokens prefilled]",
              file=sys.stderr)
