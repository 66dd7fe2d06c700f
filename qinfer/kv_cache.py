"""The KV cache's formats: the names users choose from, their settings, and their sizes.

    f32       float32 keys and values (4 bytes a value): the reference
    f16       IEEE float16 (2 bytes a value, round to nearest even when stored):
              half the cache's memory and half the bytes attention reads per token
    q8        int8 codes, one float16 scale per 32 values of a token (llama.cpp's q8_0 cache)
    kivi4/2   KIVI: 4- or 2-bit codes, asymmetric (float16 scale and minimum); keys per
              channel over groups of G tokens, values per token over groups of G channels;
              the newest R tokens stay in float16 (the window), keys leaving it a whole
              group at a time
    kvquant4/3/2  KVQuant: 4-, 3- or 2-bit codes indexing each layer's calibrated
              non-uniform levels (qinfer calibrate-kv; qinfer/kv_calibration.py): keys
              per channel before RoPE (rotated as attention reads them), values per
              token, ~1% outliers in float16 beside the codes, position 0 (the
              attention sink) in float16; the newest R tokens also in float16, as
              KIVI's window (default 128; --kv-residual 0 gives the paper's cache,
              where every token but the sink is read through its codes)

Each token attends through the cache exactly as it would when decoded alone:
the window's tokens (its own among them) at float16, the older ones through
their codes. A prefill of many tokens therefore gives the logits of decoding
them one by one, whatever its chunks.

Why kvquant has a window too: on SmolLM2 the newest tokens' float16 is what
puts KIVI ahead at equal bits (benchmarks/kv_error.py; kivi2 without its window:
+55% perplexity, with it +26%), and a window of R tokens is the chunk-of-R
protocol of docs/perplexity.md made real: a token reads the R before it whole.
kvquant codes a token when storing it (its key's range is calibrated, not its
group's), so the window is a float16 copy read instead of the codes, per position.

The layouts are in pyx/kv_cache.c.
"""
import dataclasses
import os

from .errors import UnsupportedError

FORMATS = ("f32", "f16", "q8", "kivi4", "kivi2", "kvquant4", "kvquant3", "kvquant2")
IMPLEMENTED = FORMATS
CALIBRATED = ("kvquant4", "kvquant3", "kvquant2")     # formats that need qinfer calibrate-kv's file
# The default, by measurement: the most compact format whose WikiText-2 perplexity stays
# within 0.1% of f32's (docs/perplexity.md, SmolLM2, 16 windows of 2048: q8 +0.005%, kivi4
# +0.23%), q8, where the model's heads take it (a multiple of 32); else f16. QINFER_KV_CACHE=NAME
# replaces it (the tests set f32, whose attention their float references compute).
DEFAULT = "q8"
FALLBACK = "f16"
DEFAULT_ENV = "QINFER_KV_CACHE"


def default_name(head_dim=None):
    """The format a cache gets when none is asked for (DEFAULT; see above)."""
    name = os.environ.get(DEFAULT_ENV) or DEFAULT
    if name == "q8" and head_dim is not None and head_dim % SCALE_GROUP:
        return FALLBACK
    return name
WINDOWED = ("kivi4", "kivi2", "kvquant4", "kvquant3", "kvquant2")   # with a float16 window (--kv-residual)
GROUPED = ("kivi4", "kivi2")         # with key groups (--kv-group)
DEFAULT_RESIDUAL = 128               # KIVI's R, kvquant's too
DEFAULT_GROUP = 32                   # KIVI's G
GROUPS = (32, 64, 128)               # key groups are whole blocks of 32 positions
SCALE_GROUP = 32                     # q8: values per float16 scale
# A windowed cache takes a call's new tokens a block of WINDOW_BLOCK at a time (forward.c,
# cache_and_attend): its float16 window holds R + G + WINDOW_BLOCK positions (kvquant, no
# group: R + 2 WINDOW_BLOCK).
WINDOW_BLOCK = 32
# The most new tokens one forward call brings to a windowed cache: fewer than the other
# formats' 512, for the smaller buffers a call's rows need (a 7B's: 36 MiB, not 140); KIVI
# prefills no faster in calls of 512 (SmolLM2, 512 tokens at depth 0 and 2048: within 2%).
WINDOWED_CHUNK = 128

BITS = {"q8": 8, "kivi4": 4, "kivi2": 2, "kvquant4": 4, "kvquant3": 3, "kvquant2": 2}


@dataclasses.dataclass(frozen=True)
class KVSpec:
    """A KV cache format and its settings (residual: KIVI and kvquant; group: KIVI)."""
    name: str = "f32"
    residual: int = 0
    group: int = 0

    @property
    def windowed(self):
        """Whether the cache has a float16 window (KIVI always: keys wait there for their group)."""
        return self.name in GROUPED or (self.name in WINDOWED and self.residual > 0)

    @property
    def bits(self):
        return BITS.get(self.name, 0)

    def value_bytes(self, head_dim):
        """Bytes the cache holds per key or value element (keys and values averaged), codes and
        their parameters (pyx/kv_cache.c has the layouts)."""
        if self.name == "f32":
            return 4.0
        if self.name == "f16":
            return 2.0
        if self.name == "q8":
            return 1.0 + 2.0 / SCALE_GROUP
        if self.name in CALIBRATED:
            # keys: outlier slots of 4 bytes; values: a float16 center and half-range, outliers of 4 bytes
            key_slots = max(2, head_dim // 32)
            value_params = 4 + 4 * ((head_dim + 99) // 100)
            return self.bits / 8 + (4 * key_slots + value_params) / (2 * head_dim)
        return self.bits / 8 + 4.0 / self.group       # kivi: a float16 scale and minimum per group

    def bytes_per_token(self, config):
        """Bytes a sequence's cache grows by per token (keys and values, every layer)."""
        return int(round(2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
                         * self.value_bytes(config.head_dim)))

    def window_tokens(self):
        """Tokens of the float16 window (0 without one)."""
        if not self.windowed:
            return 0
        if self.name in GROUPED:
            return -(-(self.residual + self.group + WINDOW_BLOCK) // 32) * 32
        return -(-(self.residual + 2 * WINDOW_BLOCK) // 32) * 32

    def fixed_bytes(self, config):
        """Bytes a sequence's cache holds whatever its length: the float16 window (kivi), or the
        sink's float16 key and value (kvquant)."""
        tokens = self.window_tokens() + (1 if self.name in CALIBRATED else 0)
        return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2 * tokens

    def cache_bytes(self, config, ctx, seqs=1):
        """Bytes the cache of `seqs` sequences of ctx tokens each takes when full (kvquant: and
        its float32 table of every position's RoPE cos and sin)."""
        rope = 4 * ctx * config.head_dim if self.name in CALIBRATED else 0
        return seqs * (self.bytes_per_token(config) * ctx + self.fixed_bytes(config)) + rope

    def describe(self):
        if self.name in GROUPED:
            return f"{self.name} (window {self.residual}, group {self.group})"
        if self.name in WINDOWED:
            return f"{self.name} (window {self.residual})" if self.residual else f"{self.name} (no window)"
        return self.name


def check(name, residual=None, group=None, head_dim=None):
    """The KVSpec of format `name` with these settings, or an UnsupportedError naming the problem."""
    if name is None:
        name = default_name(head_dim)
    if isinstance(name, KVSpec):
        name, residual, group = name.name, name.residual if residual is None else residual, \
            name.group if group is None else group
    if not isinstance(name, str) or name not in FORMATS:
        raise UnsupportedError(f"unknown KV cache format {name!r}; choose from {', '.join(FORMATS)}")
    if name not in IMPLEMENTED:
        raise UnsupportedError(f"KV cache format {name!r} is not implemented yet; "
                               f"available: {', '.join(IMPLEMENTED)}")
    if name in CALIBRATED and head_dim is not None and head_dim % SCALE_GROUP:
        raise UnsupportedError(f"the {name} KV cache needs a head size divisible by {SCALE_GROUP}, "
                               f"the model's is {head_dim}")
    if name == "q8" and head_dim is not None and head_dim % SCALE_GROUP:
        raise UnsupportedError(f"the q8 KV cache needs a head size divisible by {SCALE_GROUP}, "
                               f"the model's is {head_dim}")
    for option, value, formats, which in (("residual window", residual, WINDOWED, "kivi and kvquant"),
                                          ("group", group, GROUPED, "kivi")):
        if value and name not in formats:
            raise UnsupportedError(f"a KV cache {option} applies to the {which} formats, not {name}")
    if name not in WINDOWED:
        return KVSpec(name)
    residual = DEFAULT_RESIDUAL if residual is None else residual
    if name not in GROUPED:
        if isinstance(residual, bool) or not isinstance(residual, int) or residual < 0:
            raise UnsupportedError(f"KV cache residual window {residual!r} must be a non-negative number of tokens")
        return KVSpec(name, residual)
    group = DEFAULT_GROUP if group is None else group
    if isinstance(group, bool) or not isinstance(group, int) or group not in GROUPS:
        raise UnsupportedError(f"KV cache group {group!r} is not one of {', '.join(map(str, GROUPS))}")
    if isinstance(residual, bool) or not isinstance(residual, int) or residual < 0 or residual % group:
        raise UnsupportedError(f"KV cache residual window {residual!r} must be a non-negative "
                               f"multiple of the group ({group})")
    if head_dim is not None and head_dim % group:
        raise UnsupportedError(f"KV cache group {group} does not divide the model's head size {head_dim}")
    return KVSpec(name, residual, group)


def bytes_per_token(config, name):
    """Bytes a sequence's cache holds per token in format `name` (a KVSpec or a name)."""
    return check(name).bytes_per_token(config)
