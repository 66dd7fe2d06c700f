"""Rendering a conversation with the model's own chat template (jinja2, sandboxed).

A chat template is data from the model file, so rendering is bounded: jinja2's
immutable sandbox, plus limits on what one expression can build (sequence
repetition, `+` of sequences, `**`, printf/format widths, padding filters and
methods, range() lengths), a budget of loop iterations, a time limit and an
output-size cap. Any failure while rendering, whatever Python raises inside
the template (1/0, 1 + 'a', include without a loader, runaway recursion...),
becomes a ChatTemplateError naming the problem.
"""
import operator
import re
import time

from .errors import QinferError

# Far above any real chat prompt's scaffolding (the messages' own text is added on top).
MAX_OUTPUT_CHARS = 1 << 20
MAX_ITEMS = 1 << 20             # length of a string/list one expression may build
MAX_WIDTH = 10_000              # printf/format width or precision, center()/ljust()/indent() width
MAX_ITERATIONS = 1_000_000      # range() steps over the whole render
MAX_POW_BITS = 4096
TIME_LIMIT = 3.0                # seconds

_PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_FORMAT_SPEC = re.compile(r"\{[^{}]*?:[^{}]*?(\d+)[^{}]*\}")
_WIDTH_METHODS = {"center", "ljust", "rjust", "zfill", "expandtabs"}


class ChatTemplateError(QinferError):
    """The model has no chat template, or rendering it failed."""


class _Limit(Exception):
    """A rendering limit was hit (turned into ChatTemplateError by render_chat)."""


def _raise(message):
    raise ChatTemplateError(f"the chat template refused the conversation: {message}")


def check_messages(messages):
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatTemplateError("messages must be a non-empty list of {'role', 'content'} dicts")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ChatTemplateError(f"each message needs string 'role' and 'content', got {m!r}")


def _check_width(value, what):
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_WIDTH:
        raise _Limit(f"{what} of {value} is over the limit of {MAX_WIDTH}")


def _check_printf(fmt):
    for m in _PRINTF_SPEC.finditer(fmt):
        for g in m.groups():
            if g and g != "*":
                _check_width(int(g), "a format width")
            elif g == "*":
                raise _Limit("a '*' width in a format string is not allowed")


def _check_format(fmt):
    for m in _FORMAT_SPEC.finditer(fmt):
        _check_width(int(m.group(1)), "a format width")


def _sized(x):
    return isinstance(x, (str, bytes, list, tuple))


def _make_env():
    import jinja2.sandbox as sandbox

    from jinja2.compiler import CodeGenerator, optimizeconst

    class BoundedCodeGenerator(CodeGenerator):
        # `a ~ b` compiles to a bare "".join, which no sandbox hook sees; route it through the
        # environment so that repeated doubling ({% set ns.s = ns.s ~ ns.s %}) is bounded too.
        # (Autoescape is off here, so markup_join is never needed.)
        @optimizeconst
        def visit_Concat(self, node, frame):
            self.write("environment.bounded_join((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class BoundedEnvironment(sandbox.ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**", "%", "+"])
        code_generator_class = BoundedCodeGenerator

        def bounded_join(self, parts):
            self.tick()
            parts = [p if isinstance(p, str) else str(p) for p in parts]
            total = sum(map(len, parts))
            if total > self.max_items:
                raise _Limit(f"it builds a string of {total} characters with '~' (limit {self.max_items})")
            return "".join(parts)

        def __init__(self, **kw):
            super().__init__(**kw)
            self.deadline = time.monotonic() + TIME_LIMIT
            self.iterations = 0
            self.max_items = MAX_ITEMS       # raised by render_chat by the messages' own length

        def tick(self, n=1):
            self.iterations += n
            if self.iterations > MAX_ITERATIONS:
                raise _Limit(f"it runs more than {MAX_ITERATIONS} loop iterations")
            if time.monotonic() > self.deadline:
                raise _Limit(f"rendering took more than {TIME_LIMIT:g} s")

        def call_binop(self, context, operator_name, left, right):
            self.tick()
            if operator_name == "*":
                seq, n = (left, right) if _sized(left) else (right, left)
                if _sized(seq) and isinstance(n, int) and len(seq) * max(n, 0) > self.max_items:
                    raise _Limit(f"it repeats a sequence to {len(seq) * n} items (limit {self.max_items})")
            elif operator_name == "+":
                if _sized(left) and _sized(right) and len(left) + len(right) > self.max_items:
                    raise _Limit(f"it builds a sequence of {len(left) + len(right)} items "
                                 f"(limit {self.max_items})")
            elif operator_name == "**":
                if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 \
                        and right * abs(left).bit_length() > MAX_POW_BITS:
                    raise _Limit(f"{left} ** {right} is too large a number")
            elif operator_name == "%" and isinstance(left, str):
                _check_printf(left)
            return super().call_binop(context, operator_name, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's signature)
            __self.tick()
            name = getattr(__obj, "__name__", None)
            owner = getattr(__obj, "__self__", None)
            if owner is None:          # jinja2 wraps str.format/format_map for its sandboxed formatter
                owner = getattr(getattr(__obj, "__wrapped__", None), "__self__", None)
            if isinstance(owner, str):
                if name in _WIDTH_METHODS:
                    for a in list(args) + list(kwargs.values()):
                        _check_width(a, f"str.{name}() width")
                elif name in ("format", "format_map"):
                    _check_format(owner)
            return super().call(__context, __obj, *args, **kwargs)

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True)

    class CountedRange:
        """range() whose iteration spends the render's loop budget (len, indexing, `in` as a range)."""

        def __init__(self, r):
            self.r = r

        def __iter__(self):
            for i in self.r:
                env.tick()
                yield i

        def __reversed__(self):
            return iter(CountedRange(self.r[::-1]))

        def __len__(self):
            return len(self.r)

        def __getitem__(self, i):
            v = self.r[i]
            return CountedRange(v) if isinstance(v, range) else v

        def __contains__(self, x):
            return x in self.r

        def __repr__(self):
            return repr(self.r)

    def bounded_range(*args):
        r = range(*args)
        if len(r) > sandbox.MAX_RANGE:
            raise _Limit(f"range() of {len(r)} items is over the limit of {sandbox.MAX_RANGE}")
        return CountedRange(r)

    env.globals["range"] = bounded_range
    env.globals["raise_exception"] = _raise

    def width_filter(name, *positions):
        orig = env.filters[name]

        def wrapped(*args, **kwargs):
            for p in positions:
                a = args[p] if p < len(args) else None
                _check_width(a, f"the {name} filter's width")
            for a in kwargs.values():
                _check_width(a, f"the {name} filter's argument")
            return orig(*args, **kwargs)
        wrapped.__name__ = name
        for attr in ("jinja_pass_arg",):
            if hasattr(orig, attr):
                setattr(wrapped, attr, getattr(orig, attr))
        env.filters[name] = wrapped

    # positional indexes after any pass_environment/pass_eval_context argument
    width_filter("center", 1)
    width_filter("indent", 1)
    width_filter("wordwrap", 2)
    width_filter("truncate", 2)
    width_filter("batch", 1)
    width_filter("slice", 1)

    orig_format = env.filters["format"]

    def format_filter(value, *args, **kwargs):
        if isinstance(value, str):
            _check_printf(value)
        return orig_format(value, *args, **kwargs)
    env.filters["format"] = format_filter
    return env


def render_chat(template, messages, tokenizer, add_generation_prompt=True):
    if not template:
        raise ChatTemplateError("this model has no chat template; use generate() with a plain prompt")
    check_messages(messages)
    import jinja2

    env = _make_env()
    piece = lambda i: tokenizer.id_to_piece(i) if i is not None else ""
    limit = MAX_OUTPUT_CHARS + 2 * sum(len(m["content"]) for m in messages)
    env.max_items = MAX_ITEMS + limit
    try:
        compiled = env.from_string(template)
        parts, size = [], 0
        for chunk in compiled.generate(
                messages=list(messages), add_generation_prompt=add_generation_prompt,
                bos_token=piece(tokenizer.bos_id), eos_token=piece(tokenizer.eos_id)):
            size += len(chunk)
            if size > limit:
                raise _Limit(f"its output exceeds {limit} characters")
            env.tick(0)
            parts.append(chunk)
        text = "".join(parts)
    except ChatTemplateError:
        raise
    except _Limit as exc:
        raise ChatTemplateError(f"the chat template was stopped: {exc}") from None
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"the chat template could not be rendered: {exc}") from None
    except RecursionError:
        raise ChatTemplateError("the chat template could not be rendered: it recurses too deeply") from None
    except MemoryError:
        raise ChatTemplateError("the chat template could not be rendered: it ran out of memory") from None
    except Exception as exc:       # whatever the template's own expressions raise
        raise ChatTemplateError(f"the chat template could not be rendered: "
                                f"{type(exc).__name__}: {exc}"[:300]) from None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ChatTemplateError(f"the chat template produced text that is not valid Unicode (lone surrogate "
                                f"U+{ord(text[e.start]):04X} at character {e.start})") from None
    return text
