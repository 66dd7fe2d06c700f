"""Per-module quantization settings: GPTQModel's "dynamic" rules.

A GPTQ checkpoint has one `bits` and one `group_size`; GPTQModel's
quantize_config.json may add `dynamic`, an ordered object of rules that
override them for some linear layers (a mixed-precision model, like
llama.cpp's *_M types, which keep the layers that hurt most at more bits):

    "dynamic": {
        "+:.*\\.mlp\\.down_proj": {"bits": 4},              positive rule: these settings
        "+:model\\.layers\\.0\\..*": {"bits": 8, "group_size": 32},
        "-:.*\\.self_attn\\.o_proj": {}                     negative rule: left float
    }

Each key is a Python regular expression matched (re.match: from the start of
the name) against the layer's Hugging Face name without ".weight", e.g.
"model.layers.3.mlp.down_proj"; a key without a "+:" or "-:" prefix is a
positive rule. The first rule that matches decides, in file order; a layer
no rule matches has the checkpoint's own settings. A positive rule's object
overrides "bits" and "group_size" (other keys, such as "sym" or "desc_act",
describe what the packed tensors already say and are not needed to read them).
"""
import re

try:                                   # Python 3.11+
    from re import _constants as _sre_c, _parser as _sre_parse
except ImportError:                    # pragma: no cover - Python 3.10
    import sre_constants as _sre_c
    import sre_parse as _sre_parse

from ..errors import FormatError, UnsupportedError
from ..packing import GPTQ_BITWIDTHS as BITWIDTHS

# Rules are matched with Python's backtracking `re`, so a pattern is checked for
# shape first (there is no time limit on re.match): no repeat inside a repeat
# ("(.*)*z", "(a+)+"), no alternation inside a repeat ("(a|a)*"), at most
# MAX_UNBOUNDED unbounded repeats in all (".*.*.*.*.*z" is polynomial in the
# name's length, with the count as exponent) and at most MAX_PATTERN characters.
MAX_PATTERN = 1000
MAX_UNBOUNDED = 4
_REPEATS = {getattr(_sre_c, n) for n in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT") if hasattr(_sre_c, n)}

SKIP = None      # what resolve() returns for a layer a negative rule leaves float


class Rules:
    """Parsed, validated rules: resolve(name, base) -> settings for that layer, or SKIP."""

    def __init__(self, dynamic, where):
        if dynamic is None:
            dynamic = {}
        if not isinstance(dynamic, dict):
            raise FormatError(f"{where}: 'dynamic' must be an object of rules, got {type(dynamic).__name__}")
        self.rules = []
        for key, overrides in dynamic.items():
            if not isinstance(key, str):
                raise FormatError(f"{where}: dynamic rule {key!r} is not a string")
            positive = not key.startswith("-:")
            pattern = key[2:] if key.startswith(("+:", "-:")) else key
            try:
                regex = re.compile(pattern)
            except (re.error, RecursionError, OverflowError) as e:
                raise FormatError(f"{where}: dynamic rule {key!r} is not a valid regular expression ({e})") from None
            problem = backtracking_risk(pattern)
            if problem:
                raise FormatError(f"{where}: dynamic rule {key!r} is refused: {problem}")
            if not isinstance(overrides, dict):
                raise FormatError(f"{where}: dynamic rule {key!r} must map to an object, got {overrides!r}")
            self.rules.append((key, regex, positive, _check_overrides(overrides, f"{where}: dynamic rule {key!r}")))

    def __bool__(self):
        return bool(self.rules)

    def resolve(self, name, base):
        """The settings of layer `name` ("model.layers.3.mlp.down_proj"): base updated by the first
        matching positive rule, base itself if none matches, SKIP if a negative rule matches first."""
        for _, regex, positive, overrides in self.rules:
            if regex.match(name):
                return dict(base, **overrides) if positive else SKIP
        return dict(base)

    def to_json(self):
        return {key: dict(overrides) for key, _, _, overrides in self.rules}


def backtracking_risk(pattern):
    """Why matching `pattern` could backtrack catastrophically, or None (a structural check)."""
    if len(pattern) > MAX_PATTERN:
        return f"a pattern of {len(pattern)} characters is longer than {MAX_PATTERN}"
    try:
        parsed = _sre_parse.parse(pattern)
    except Exception as e:            # compile() succeeded, so this should not happen
        return f"it cannot be parsed ({e})"
    unbounded = [0]

    def children(av):
        if isinstance(av, _sre_parse.SubPattern):
            yield av
        elif isinstance(av, (tuple, list)):
            for a in av:
                yield from children(a)

    def walk(items, in_repeat):
        for op, av in items:
            if op in _REPEATS:
                lo, hi, body = av
                if in_repeat:
                    return "it nests a repeat inside a repeat (catastrophic backtracking)"
                if hi == _sre_c.MAXREPEAT or hi > 100:
                    unbounded[0] += 1
                why = walk(body, True)
            elif op == _sre_c.BRANCH and in_repeat:
                return "it repeats an alternation (catastrophic backtracking)"
            else:
                why = None
                for sp in children(av):
                    why = why or walk(sp, in_repeat)
            if why:
                return why
        return None

    why = walk(parsed, False)
    if why is None and unbounded[0] > MAX_UNBOUNDED:
        why = f"it has {unbounded[0]} unbounded repeats (at most {MAX_UNBOUNDED})"
    return why


def _check_overrides(overrides, where):
    out = {}
    for key, value in overrides.items():
        if key == "bits":
            if isinstance(value, bool) or not isinstance(value, int) or value not in BITWIDTHS:
                raise UnsupportedError(f"{where}: bits {value!r} is not supported (supported: {BITWIDTHS})")
            out[key] = value
        elif key == "group_size":
            if isinstance(value, bool) or not isinstance(value, int) or not (value == -1 or value > 0):
                raise FormatError(f"{where}: group_size must be a positive integer or -1, got {value!r}")
            out[key] = value
    return out


def parse_cli_rule(text):
    """`--dynamic PATTERN=BITS[gGROUP]` -> (rule key, overrides): ".*down_proj=4" or ".*down_proj=4g32".

    PATTERN is matched like a dynamic key (re.match on "model.layers.<i>.<module>.<proj>")."""
    from ..errors import QinferError

    pattern, sep, value = text.rpartition("=")
    m = re.fullmatch(r"(\d+)(?:g(-1|\d+))?", value.strip())
    if not sep or not pattern or m is None:
        raise QinferError(f"--dynamic {text!r}: expected PATTERN=BITS or PATTERN=BITSgGROUP "
                          f"(e.g. '.*\\.mlp\\.down_proj=4' or '.*v_proj=4g32')")
    overrides = {"bits": int(m.group(1))}
    if m.group(2) is not None:
        overrides["group_size"] = int(m.group(2))
    return "+:" + pattern, overrides
