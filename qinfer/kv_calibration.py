"""KVQuant calibration (Hooper et al. 2024, arXiv 2401.18079): the levels and key
thresholds the kvquant4/3/2 KV cache formats will read.

This docstring is the specification the C side follows.

What is quantized
-----------------
* Keys are quantized per channel BEFORE RoPE: the pre-RoPE key of a token is
  k = x @ Wk^T, where x is the input of k_proj (the token's hidden state after
  the layer's input RMSNorm) and Wk the k_proj weight as the model runs it
  (a packed weight dequantized). Values are v = x @ Wv^T. Channels are in
  Hugging Face (rotate-half) order, as qinfer's KV cache holds them (GGUF
  q/k rows are un-permuted when read: readers/rope_order.py).
* The first token of each sequence (the attention sink, typically BOS) is
  kept in full precision at run time; calibration leaves position 0 of every
  calibration sequence out of all the statistics below.

Keys: per-channel outlier thresholds
------------------------------------
For each (layer, KV head, channel) c: lo_c and hi_c are the 0.5th and 99.5th
percentiles of that channel's pre-RoPE key values over the calibration
tokens (numpy's default, linear interpolation between order statistics), so
about 1% of the values are outliers. Stored as float32

    key_center[l, h, c]     = (hi_c + lo_c) / 2
    key_half_range[l, h, c] = (hi_c - lo_c) / 2        (> 0; at least FLT_MIN)

At run time a key value x of channel c is an outlier when
|x - center_c| > half_range_c (kept in float16, dense-and-sparse); an inlier
is normalized to x^ = (x - center_c) / half_range_c, in [-1, 1] (float32
arithmetic), and coded as the index of its nearest level.

Values: per-token outliers
--------------------------
Per token and KV head, the vector of head_dim values: its n_out =
ceil(head_dim * 0.01) values (integer arithmetic: (head_dim + 99) // 100)
of largest |x| are outliers (float16; ties broken either way). The others
normalize by the vector's own inlier min lo and max hi:
x^ = (x - (hi + lo)/2) / ((hi - lo)/2), x^ = 0 when hi == lo.

Levels
------
For each bit width b in (2, 3, 4) and each layer l, 2^b non-uniform levels
for keys (key_levels.{b}[l]) and 2^b for values (value_levels.{b}[l]): the
1-D k-means of that layer's normalized inlier calibration values (all KV
heads and channels pooled; at most MAX_SAMPLES of them, drawn without
replacement with numpy's default_rng seeded by (seed, layer, 0 for keys or 1
for values)), each value weighted by its sensitivity (weighting "fisher", the
default: the squared gradient of the window's mean next-token loss with
respect to that key, before RoPE, or value, qinfer/kv_fisher.py; KVQuant's
sensitivity-weighted levels) or not at all (weighting "none"). Lloyd's
algorithm in float64: levels start at the (unweighted) quantiles
(j + 0.5) / 2^b of the sample; each step assigns every value to its nearest
level (a value exactly midway goes to the lower one) and moves each level to
the weighted mean of its values (a level of no weight moves to the value
farthest from its level in the cluster of largest weighted squared error); it
stops when no value changes level, or after MAX_ITERATIONS steps. The levels are stored sorted
ascending and clipped to [-1, 1], float32. A normalized inlier is coded as
the index of its nearest level.

The file
--------
safetensors (written and read by qinfer's own safetensors code; any
safetensors reader opens it), beside the model (default_path):

    key_center       float32 [layers, kv_heads, head_dim]
    key_half_range   float32 [layers, kv_heads, head_dim]
    key_levels.{b}   float32 [layers, 2^b]       for b in 2, 3, 4
    value_levels.{b} float32 [layers, 2^b]

with string metadata: format "qinfer-kv-calibration", version "1", layers,
kv_heads, head_dim, bits "2,3,4", outlier_fraction "0.01", tokens (the
calibration tokens counted, position 0 of each sequence excluded), calib
(the calibration file's name), sequences, seqlen, seed, weighting ("fisher"
or "none"; absent in files written before it, which were "none"), and fingerprint.

The fingerprint (fingerprint()) ties a file to its model: the sha256 of the
config fields that shape the model (FINGERPRINT_FIELDS) and, for each weight
file (a GGUF file; a directory's *.safetensors but the calibration files),
its size and its first and last 64 KiB. A model renamed or moved keeps its
calibration; another model (another shape, or other weights) is refused. It
does not hash whole files (seconds per load on a large model), so two files
that differ only in their middle bytes share a fingerprint.
"""
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np

from .errors import FormatError, QinferError

FORMAT = "qinfer-kv-calibration"
VERSION = "1"
BITS = (2, 3, 4)
OUTLIER_FRACTION = "0.01"            # the fraction of outliers, keys and values alike
KEY_PERCENTILES = (0.5, 99.5)        # lo and hi of a key channel, in percent
MAX_SAMPLES = 1 << 20                # normalized values per layer and kind the k-means sees
MAX_ITERATIONS = 1000                # Lloyd steps; each is O(levels * log samples) on sorted data
MIN_HALF_RANGE = float(np.finfo(np.float32).tiny)   # a constant channel still divides safely
DEFAULT_SEQUENCES, DEFAULT_SEQLEN = 32, 512
FILE_SUFFIX = "kvquant.safetensors"  # M.gguf -> M.gguf.kvquant.safetensors; DIR -> DIR/kvquant.safetensors
FINGERPRINT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
                      "tie_word_embeddings")
FINGERPRINT_SAMPLE = 64 << 10        # bytes hashed at each end of a weight file
WEIGHTINGS = ("fisher", "none")      # what the k-means weighs each calibration value by
DEFAULT_WEIGHTING = "fisher"


class CalibrationError(QinferError):
    """A KV calibration file that cannot be used (missing, malformed, for another model),
    or calibration inputs that cannot be used."""


@dataclass
class Calibration:
    """What calibrate() computes and the file holds (the module docstring says what each is)."""
    key_center: np.ndarray                  # float32 [layers, kv_heads, head_dim]
    key_half_range: np.ndarray              # float32 [layers, kv_heads, head_dim]
    key_levels: dict                        # bits -> float32 [layers, 2^bits]
    value_levels: dict                      # bits -> float32 [layers, 2^bits]
    tokens: int                             # calibration tokens counted (position 0 of each sequence excluded)
    fingerprint: str                        # of the model (fingerprint())
    calib: str = ""                         # the calibration text's file name
    extra: dict = field(default_factory=dict)   # other metadata (sequences, seqlen, seed, weighting)

    @property
    def layers(self):
        return self.key_center.shape[0]

    @property
    def kv_heads(self):
        return self.key_center.shape[1]

    @property
    def head_dim(self):
        return self.key_center.shape[2]

    @property
    def bits(self):
        return tuple(sorted(self.key_levels))


# ------------------------------------------------------------------ where, and for which model
def default_path(model_path):
    """The calibration file beside a model: M.gguf -> M.gguf.kvquant.safetensors; a Hugging
    Face (or GPTQ) directory DIR -> DIR/kvquant.safetensors."""
    model_path = os.fspath(model_path)
    if os.path.isdir(model_path):
        return os.path.join(model_path, FILE_SUFFIX)
    return f"{model_path}.{FILE_SUFFIX}"


def _weight_files(model_path):
    """The files whose bytes the fingerprint samples, in name order."""
    if not os.path.isdir(model_path):
        return [model_path]
    names = sorted(n for n in os.listdir(model_path)
                   if n.endswith(".safetensors") and not n.endswith(FILE_SUFFIX))
    return [os.path.join(model_path, n) for n in names]


def fingerprint(config, model_path):
    """sha256 (hex) of the model's shape (FINGERPRINT_FIELDS of its config) and, per weight
    file, its size and first and last FINGERPRINT_SAMPLE bytes (module docstring)."""
    h = hashlib.sha256()
    shape = {name: getattr(config, name) for name in FINGERPRINT_FIELDS}
    h.update(json.dumps(shape, sort_keys=True).encode())
    for path in _weight_files(os.fspath(model_path)):
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(FINGERPRINT_SAMPLE)
                f.seek(max(0, size - FINGERPRINT_SAMPLE))
                tail = f.read(FINGERPRINT_SAMPLE)
        except OSError as e:
            raise CalibrationError(f"{path}: cannot read ({e.strerror or e})") from None
        h.update(size.to_bytes(8, "little") + head + tail)
    return h.hexdigest()


# ------------------------------------------------------------------ calibration text
def calibration_sequences(path, tokenizer, sequences=DEFAULT_SEQUENCES, seqlen=DEFAULT_SEQLEN, seed=0):
    """int32 [sequences, seqlen]: windows of the tokenized text file at `path` (text_sequences)."""
    from .quant.calibration import read_text
    return text_sequences(read_text(path), tokenizer, sequences, seqlen, seed,
                          what=f"calibration file {os.fspath(path)}")


def text_sequences(text, tokenizer, sequences=DEFAULT_SEQUENCES, seqlen=DEFAULT_SEQLEN, seed=0,
                   what="calibration text"):
    """int32 [sequences, seqlen]: windows of the tokenized text at seeded random offsets
    (quant/calibration.py, GPTQ's windows). When the model expects BOS before a prompt, each
    window is BOS followed by seqlen - 1 text tokens, so the tokens after it see the
    attention sink they see at run time (position 0 itself is left out of the statistics)."""
    from .quant.calibration import token_windows

    if seqlen < 2:
        raise CalibrationError(f"seqlen must be at least 2 (position 0 is not calibrated), got {seqlen}")
    tokens = tokenizer.encode(text, add_bos=False)
    bos = tokenizer.bos_id if tokenizer.add_bos_default else None
    text_len = seqlen - 1 if bos is not None else seqlen
    if len(tokens) < text_len:               # said here: token_windows would name text_len as the seqlen
        raise CalibrationError(f"{what} has {len(tokens)} tokens, fewer than one window of --seqlen {seqlen} "
                               f"(use a longer text or a smaller --seqlen)")
    windows = token_windows(tokens, sequences, text_len, seed, what=what)
    if bos is not None:
        windows = np.concatenate([np.full((sequences, 1), bos, dtype=np.int32), windows], axis=1)
    return windows


# ------------------------------------------------------------------ the statistics
def key_thresholds(keys):
    """keys [tokens, kv_heads, head_dim] -> (center, half_range) float32 [kv_heads, head_dim]
    from the KEY_PERCENTILES of each channel."""
    lo = np.empty(keys.shape[1:], dtype=np.float64)
    hi = np.empty_like(lo)
    for h in range(keys.shape[1]):          # one head at a time: float64 copies stay small
        lo[h], hi[h] = np.percentile(keys[:, h].astype(np.float64), KEY_PERCENTILES, axis=0)
    center = ((hi + lo) / 2).astype(np.float32)
    half_range = np.maximum((hi - lo) / 2, MIN_HALF_RANGE).astype(np.float32)
    return center, half_range


def normalized_key_inliers(keys, center, half_range, weights=None):
    """The inliers of keys [tokens, kv_heads, head_dim], normalized to [-1, 1] (1-D float32);
    with weights (keys' shape), (inliers, their weights)."""
    x = (keys - center) / half_range                 # float32, as the C side computes it
    inlier = np.abs(keys - center) <= half_range
    if weights is None:
        return np.clip(x[inlier], -1, 1)
    return np.clip(x[inlier], -1, 1), weights.reshape(keys.shape)[inlier]


def value_outlier_count(head_dim):
    """n_out = ceil(head_dim * 0.01) in integers (0.01 * 700 is 7.000000000000001 in floats)."""
    return (head_dim + 99) // 100


def normalized_value_inliers(values, weights=None):
    """values [vectors, head_dim] (one token's KV head each) -> the normalized inliers of every
    vector (1-D float32): its n_out values of largest |x| left out, the rest mapped by the
    vector's own inlier min/max onto [-1, 1]; with weights (values' shape), (inliers, their
    weights)."""
    n_out = value_outlier_count(values.shape[1])
    if n_out >= values.shape[1]:
        raise CalibrationError(f"head_dim {values.shape[1]} leaves no value inliers")
    top = np.argpartition(-np.abs(values), n_out - 1, axis=1)[:, :n_out]
    inlier = np.ones(values.shape, dtype=bool)
    np.put_along_axis(inlier, top, False, axis=1)
    lo = np.where(inlier, values, np.inf).min(axis=1, keepdims=True)
    hi = np.where(inlier, values, -np.inf).max(axis=1, keepdims=True)
    half = (hi - lo) / 2
    safe = np.where(half > 0, half, 1)               # a constant vector normalizes to 0
    x = np.where(half > 0, (values - (hi + lo) / 2) / safe, 0)
    if weights is None:
        return np.clip(x[inlier], -1, 1).astype(np.float32)
    return np.clip(x[inlier], -1, 1).astype(np.float32), weights.reshape(values.shape)[inlier]


def subsample(values, max_samples, rng, weights=None):
    """At most max_samples of values, drawn without replacement (all of them when fewer);
    with weights (as many), (values, weights) drawn alike."""
    values = np.asarray(values).reshape(-1)
    take = slice(None) if len(values) <= max_samples else rng.choice(len(values), size=max_samples, replace=False)
    if weights is None:
        return values[take]
    return values[take], np.asarray(weights).reshape(-1)[take]


def fit_levels(values, n_levels, max_iterations=MAX_ITERATIONS, weights=None):
    """n_levels sorted float32 levels in [-1, 1]: Lloyd's 1-D k-means of values (module
    docstring); with weights (>= 0, as many as values), each value counts as much as its
    weight (a level moves to its values' weighted mean: KVQuant's sensitivity-weighted
    levels). Works on the sorted values, where each level's values are one contiguous
    run: a step is a binary search per boundary and prefix sums, not a pass over the data."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    order = np.argsort(x, kind="stable")
    x = x[order]
    if len(x) == 0:
        raise CalibrationError("no calibration values to fit levels to")
    if weights is None:
        wt = np.ones_like(x)
    else:
        wt = np.asarray(weights, dtype=np.float64).reshape(-1)
        if wt.shape != (len(x),) or not np.all(np.isfinite(wt)) or (wt < 0).any() or wt.sum() <= 0:
            raise CalibrationError("level weights must be as many as the values, finite, >= 0, not all 0")
        wt = wt[order] / wt.max()            # scaled: sums of tiny squared gradients stay exact enough
    prefix_w = np.concatenate([[0.0], np.cumsum(wt)])
    prefix = np.concatenate([[0.0], np.cumsum(wt * x)])
    prefix_sq = np.concatenate([[0.0], np.cumsum(wt * x * x)])
    levels = np.quantile(x, (np.arange(n_levels) + 0.5) / n_levels)
    cuts = None
    for _ in range(max_iterations):
        # values up to the midpoint between two levels belong to the lower one
        new_cuts = np.concatenate([[0], np.searchsorted(x, (levels[1:] + levels[:-1]) / 2, side="right"),
                                   [len(x)]])
        if cuts is not None and np.array_equal(new_cuts, cuts):
            break                            # no value changed level: a fixed point
        cuts = new_cuts
        counts = prefix_w[cuts[1:]] - prefix_w[cuts[:-1]]
        sums = prefix[cuts[1:]] - prefix[cuts[:-1]]
        owned = counts > 0
        levels = np.where(owned, sums / np.where(owned, counts, 1), levels)
        if not owned.all():
            levels = _reseed_empty(x, cuts, counts, levels, sums, prefix_sq)
    return np.clip(np.sort(levels), -1, 1).astype(np.float32)


def _reseed_empty(x, cuts, counts, levels, sums, prefix_sq):
    """Levels that own no value, or only values of weight 0 (two levels started equal, e.g.
    on a mass of values at -1) move to the value farthest from its level in the cluster of
    largest (weighted) squared error, so every level ends up used when the data has that many
    distinct values."""
    levels = levels.copy()
    sse = (prefix_sq[cuts[1:]] - prefix_sq[cuts[:-1]]) - sums * sums / np.where(counts > 0, counts, 1)
    for empty in np.flatnonzero(counts <= 0):
        worst = int(np.argmax(sse))
        if sse[worst] <= 0:
            break                            # every cluster is one repeated value: nothing to split
        first, last = x[cuts[worst]], x[cuts[worst + 1] - 1]
        far = first if levels[worst] - first > last - levels[worst] else last
        levels[empty] = far
        sse[worst] = 0                       # split once per step
    return np.sort(levels)


# ------------------------------------------------------------------ running the model
def _unwrap(engine_or_model):
    """(model, source, model path) of an Engine or a model.Model."""
    from .model import Model
    from .readers.source import ModelSource

    if isinstance(engine_or_model, Model):
        model = engine_or_model
        # the Model keeps its ModelSource alive (the C side may point into its memory maps)
        source = next((k for k in model._keep if isinstance(k, ModelSource)), None)
        if source is None:
            raise CalibrationError("this Model does not hold its source; pass the Engine instead")
        return model, source, source.path
    model = getattr(engine_or_model, "model", None)
    if not isinstance(model, Model):
        raise CalibrationError(f"calibrate needs an Engine or a Model, got {type(engine_or_model).__name__}")
    return model, engine_or_model.source, engine_or_model.model_path


def _check_sequences(sequences, model):
    seq = np.asarray(sequences)
    if seq.ndim != 2 or seq.shape[0] < 1 or seq.shape[1] < 2 or not np.issubdtype(seq.dtype, np.integer):
        raise CalibrationError(f"sequences must be integer token ids [sequences, seqlen] with seqlen >= 2, "
                               f"got shape {seq.shape} of {seq.dtype}")
    if seq.min() < 0 or seq.max() >= model.config.vocab_size:
        raise CalibrationError(f"token ids must lie in [0, {model.config.vocab_size})")
    if seq.shape[1] > model.ctx:
        raise CalibrationError(f"sequences of {seq.shape[1]} tokens do not fit the model's context of "
                               f"{model.ctx} (build it with ctx >= seqlen)")
    return np.ascontiguousarray(seq, dtype=np.int32)


def _check_bits(bits):
    bits = tuple(sorted(set(bits)))
    if not bits or any(b not in BITS for b in bits):
        raise CalibrationError(f"bits must be taken from {BITS}, got {bits!r}")
    return bits


def linear_weight(model, source, full):
    """The linear map `full` (a tensor name) as float32 [out, in], as the model runs it: a
    packed weight dequantized, a float one quantized on load first when the model does that."""
    from .model import quantize_on_load
    from .quant.writer import float_weight
    from .readers.source import is_quantized

    w = float_weight(source, full)
    # as Model._linear builds it: a packed (or SpQR) weight runs so unless the model dequantizes
    runs_packed = is_quantized(source.tensors[full]) and not model.dequantize
    if model.quantize and not runs_packed:
        w = quantize_on_load(w, model.quantize, model.group_size).dequantize()
    return np.ascontiguousarray(w, dtype=np.float32)


def _kv_weights(model, source, layer):
    """k_proj and v_proj of block `layer` as float32 [out, in] (linear_weight)."""
    from .model import LINEAR_NAMES

    return [linear_weight(model, source, f"model.layers.{layer}.{LINEAR_NAMES[name]}.weight")
            for name in ("wk", "wv")]


def _layer_inputs(model, layer, hidden, threads, bar):
    """Run block `layer` on each sequence of hidden [n, seqlen, dim] in place (giving the next
    block's input) and return what k_proj/v_proj read, positions 1.. only: [n * (seqlen - 1), dim]."""
    n, seqlen, dim = hidden.shape
    x = np.empty((n, seqlen - 1, dim), dtype=np.float32)
    capture = np.empty((seqlen, dim), dtype=np.float32)
    for s in range(n):
        model.run_layer(layer, hidden[s], 0, {"attn_in": capture}, threads)
        x[s] = capture[1:]                   # position 0, the attention sink, stays full precision
        bar.update()
    return x.reshape(-1, dim)


def _fisher(model, source, sequences, bar):
    """KVQuant's sensitivity weights of every calibration key and value, positions 1..:
    (keys, values) float32 [layers, n * (seqlen - 1), kv_heads * head_dim] (kv_fisher.py)."""
    from .kv_fisher import key_value_fisher, model_weights

    weights = model_weights(model, source)
    n, seqlen = sequences.shape
    cfg = model.config
    shape = (cfg.num_hidden_layers, n, seqlen - 1, cfg.num_key_value_heads * cfg.head_dim)
    fk, fv = np.empty(shape, dtype=np.float32), np.empty(shape, dtype=np.float32)
    for s in range(n):
        k, v = key_value_fisher(weights, sequences[s])
        fk[:, s], fv[:, s] = k[:, 1:], v[:, 1:]       # position 0, the sink, as the samples leave it out
        bar.update()
    return fk.reshape(shape[0], -1, shape[3]), fv.reshape(shape[0], -1, shape[3])


def calibrate(engine_or_model, sequences, bits=BITS, progress=None, calib="", seed=0, threads=None,
              weighting=DEFAULT_WEIGHTING):
    """Calibration of the model's KV cache on token sequences [n, seqlen] (int; e.g. from
    calibration_sequences): per-channel key thresholds and per-layer levels for each bit width
    (module docstring). engine_or_model: an Engine, or a model.Model (its context must hold
    seqlen tokens). progress: a bar on stderr (None: only on a terminal). calib: the text's
    file name, recorded in the file. seed: the k-means subsamples'. weighting: "fisher", the
    k-means weighted by each value's squared loss gradient, or "none"."""
    from .progress import bar as progress_bar
    from .progress import is_terminal

    if weighting not in WEIGHTINGS:
        raise CalibrationError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    model, source, model_path = _unwrap(engine_or_model)
    sequences = _check_sequences(sequences, model)
    bits = _check_bits(bits)
    cfg = model.config
    n_layers, kv_heads, head_dim = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    n, seqlen = sequences.shape
    key_center = np.empty((n_layers, kv_heads, head_dim), dtype=np.float32)
    key_half_range = np.empty_like(key_center)
    key_levels = {b: np.empty((n_layers, 1 << b), dtype=np.float32) for b in bits}
    value_levels = {b: np.empty((n_layers, 1 << b), dtype=np.float32) for b in bits}

    hidden = np.ascontiguousarray(model.embedding[sequences], dtype=np.float32)   # [n, seqlen, dim]
    fisher = weighting == "fisher"
    bar = progress_bar(n_layers * (n + 1) + (n if fisher else 0), "calibrate-kv", "step", enabled=progress,
                       mininterval=0.5 if is_terminal(sys.stderr) else 5.0)
    with bar:
        fk, fv = _fisher(model, source, sequences, bar) if fisher else (None, None)
        for layer in range(n_layers):
            x = _layer_inputs(model, layer, hidden, threads, bar)
            wk, wv = _kv_weights(model, source, layer)
            keys = (x @ wk.T).reshape(-1, kv_heads, head_dim)
            values = (x @ wv.T).reshape(-1, head_dim)
            del x
            key_center[layer], key_half_range[layer] = key_thresholds(keys)
            if fisher:
                samples = (normalized_key_inliers(keys, key_center[layer], key_half_range[layer], fk[layer]),
                           normalized_value_inliers(values, fv[layer]))
            else:
                samples = ((normalized_key_inliers(keys, key_center[layer], key_half_range[layer]), None),
                           (normalized_value_inliers(values), None))
            del keys, values
            for kind, ((sample, weights), levels) in enumerate(zip(samples, (key_levels, value_levels))):
                rng = np.random.default_rng([seed, layer, kind])
                if fisher:
                    sample, weights = subsample(sample, MAX_SAMPLES, rng, weights)
                else:
                    sample = subsample(sample, MAX_SAMPLES, rng)
                for b in bits:
                    levels[b][layer] = fit_levels(sample, 1 << b, weights=weights)
            bar.update()
    return Calibration(key_center=key_center, key_half_range=key_half_range, key_levels=key_levels,
                       value_levels=value_levels, tokens=n * (seqlen - 1),
                       fingerprint=fingerprint(cfg, model_path), calib=calib,
                       extra=dict(sequences=str(n), seqlen=str(seqlen), seed=str(seed), weighting=weighting))


def calibrate_file(model=None, calib=None, out=None, sequences=DEFAULT_SEQUENCES, seqlen=DEFAULT_SEQLEN,
                   seed=0, threads=None, progress=True, weighting=DEFAULT_WEIGHTING):
    """`qinfer calibrate-kv`: calibrate the model at path `model` (None: the default model)
    on `sequences` windows of `seqlen` tokens of the text file `calib`, and save the result
    to `out` (default: default_path(model)). Returns (Calibration, the path written)."""
    from .engine import default_model_path
    from .model import Model
    from .quant.calibration import read_text
    from .readers import open_model
    from .tokenizer import load as load_tokenizer

    if calib is None:
        raise CalibrationError("KV calibration needs a text file: pass --calib FILE "
                               "(e.g. WikiText-2's wiki.train.raw)")
    text = read_text(calib)                  # a wrong path fails before the model is read
    model_path = os.fspath(model) if model is not None else default_model_path()
    source = open_model(model_path)
    if source.tokenizer is None:
        raise CalibrationError(f"{model_path}: no tokenizer found (tokenizer.json or tokenizer.model)")
    if seqlen > source.config.max_position_embeddings:
        raise CalibrationError(f"seqlen {seqlen} is longer than the model's context "
                               f"({source.config.max_position_embeddings} tokens)")
    out = os.fspath(out) if out is not None else default_path(model_path)
    _check_writable(out)                     # before minutes of work, not after
    windows = text_sequences(text, load_tokenizer(source.tokenizer), sequences, seqlen, seed,
                             what=f"calibration file {os.fspath(calib)}")
    runner = Model(source, ctx=seqlen, threads=threads)
    result = calibrate(runner, windows, progress=progress, calib=os.path.basename(os.fspath(calib)), seed=seed,
                       threads=threads, weighting=weighting)
    save(result, out)
    return result, out


# ------------------------------------------------------------------ the file
def _check_writable(path):
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise CalibrationError(f"cannot write {path}: it is a directory")
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise CalibrationError(f"cannot write {path}: {parent} is not a writable directory")


def save(calibration, path):
    """Write the calibration to `path` (safetensors) atomically: a temporary file beside it,
    renamed over `path` once complete, so a reader never sees half a file."""
    from .quant.checkpoint import write_safetensors

    c = calibration
    path = os.fspath(path)
    tensors = {"key_center": c.key_center, "key_half_range": c.key_half_range}
    tensors.update({f"key_levels.{b}": c.key_levels[b] for b in c.bits})
    tensors.update({f"value_levels.{b}": c.value_levels[b] for b in c.bits})
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
    metadata = dict(c.extra, format=FORMAT, version=VERSION, layers=str(c.layers), kv_heads=str(c.kv_heads),
                    head_dim=str(c.head_dim), bits=",".join(map(str, c.bits)),
                    outlier_fraction=OUTLIER_FRACTION, tokens=str(c.tokens), calib=c.calib,
                    fingerprint=c.fingerprint)
    _check_writable(path)
    # hidden, this process's own, and not ending in .safetensors: the fingerprint never samples it
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                       f".{os.path.basename(path)}.qinfer-partial-{os.getpid()}.tmp")
    try:
        write_safetensors(tmp, tensors, metadata)
        os.replace(tmp, path)
    except OSError as e:
        raise CalibrationError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _meta_int(meta, key, path):
    text = meta.get(key)
    if text is None or not text.isdigit():
        raise CalibrationError(f"calibration file {path}: metadata {key!r} is {text!r}, not a count")
    return int(text)


def load(path, config, model_path=None, bits=BITS):
    """The Calibration in `path`, checked against the model: its config (a ModelConfig: layers,
    KV heads, head_dim) and, given model_path, its fingerprint. Every problem (a missing or
    corrupt file, another format or version, another model, a missing bit width, a bad array)
    is a CalibrationError naming it in one line."""
    from .readers.safetensors import read_safetensors

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CalibrationError(f"calibration file {path}: no such file (make it with qinfer calibrate-kv)")
    try:
        f = read_safetensors(path)
    except FormatError as e:                 # its message starts with the path
        raise CalibrationError(f"calibration file {e}") from None
    except QinferError as e:
        raise CalibrationError(f"calibration file {path}: {e}") from None
    meta = f.metadata or {}
    if meta.get("format") != FORMAT:
        raise CalibrationError(f"calibration file {path}: not a qinfer KV calibration file "
                               f"(format {meta.get('format')!r}, expected {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise CalibrationError(f"calibration file {path}: version {meta.get('version')!r}; this qinfer reads "
                               f"version {VERSION}")
    _check_shape_matches(meta, config, path)
    if meta.get("outlier_fraction") != OUTLIER_FRACTION:
        raise CalibrationError(f"calibration file {path}: outlier fraction {meta.get('outlier_fraction')!r}, "
                               f"this qinfer uses {OUTLIER_FRACTION}")
    if model_path is not None and meta.get("fingerprint") != fingerprint(config, model_path):
        raise CalibrationError(f"calibration file {path} was made for another model than {model_path} "
                               f"(fingerprint differs: other weights or config); run qinfer calibrate-kv "
                               f"--model {model_path} again")
    stored_bits = _stored_bits(meta, path)
    layers, heads, head_dim = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    arrays = {"key_center": (layers, heads, head_dim), "key_half_range": (layers, heads, head_dim)}
    for b in bits:
        if b not in stored_bits:
            raise CalibrationError(f"calibration file {path} has no {b}-bit levels (its bits: "
                                   f"{','.join(map(str, stored_bits)) or 'none'}); run qinfer calibrate-kv again")
        arrays.update({f"key_levels.{b}": (layers, 1 << b), f"value_levels.{b}": (layers, 1 << b)})
    data = {name: _array(f, name, shape, path) for name, shape in arrays.items()}
    if not (data["key_half_range"] > 0).all():
        raise CalibrationError(f"calibration file {path}: key_half_range has values <= 0")
    for b in bits:
        for kind in ("key_levels", "value_levels"):
            levels = data[f"{kind}.{b}"]
            if (levels < -1).any() or (levels > 1).any() or (np.diff(levels, axis=1) < 0).any():
                raise CalibrationError(f"calibration file {path}: {kind}.{b} is not sorted ascending "
                                       f"within [-1, 1]")
    tokens = _meta_int(meta, "tokens", path)
    extra = {k: meta[k] for k in ("sequences", "seqlen", "seed", "weighting") if k in meta}
    return Calibration(key_center=data["key_center"], key_half_range=data["key_half_range"],
                       key_levels={b: data[f"key_levels.{b}"] for b in bits},
                       value_levels={b: data[f"value_levels.{b}"] for b in bits},
                       tokens=tokens, fingerprint=meta.get("fingerprint", ""), calib=meta.get("calib", ""),
                       extra=extra)


def _check_shape_matches(meta, config, path):
    for key, what, ours in (("layers", "layers", config.num_hidden_layers),
                            ("kv_heads", "KV heads", config.num_key_value_heads),
                            ("head_dim", "a head_dim of", config.head_dim)):
        theirs = _meta_int(meta, key, path)
        if theirs != ours:
            if key == "head_dim":
                raise CalibrationError(f"calibration file {path} is for a model with a head_dim of {theirs}; "
                                       f"this model's is {ours}")
            raise CalibrationError(f"calibration file {path} is for a model with {theirs} {what}; "
                                   f"this model has {ours}")


def _stored_bits(meta, path):
    try:
        return tuple(int(b) for b in meta.get("bits", "").split(",") if b.strip())
    except ValueError:
        raise CalibrationError(f"calibration file {path}: metadata 'bits' is {meta.get('bits')!r}, "
                               f"not bit widths separated by commas") from None


def _array(f, name, shape, path):
    """Tensor `name` of the file as a float32 array of `shape` (a copy: the file may be replaced)."""
    if name not in f:
        raise CalibrationError(f"calibration file {path}: tensor {name!r} is missing")
    if f.dtypes[name] != "F32":
        raise CalibrationError(f"calibration file {path}: tensor {name!r} is {f.dtypes[name]}, expected F32")
    a = np.array(f[name], dtype=np.float32)
    if a.shape != shape:
        raise CalibrationError(f"calibration file {path}: tensor {name!r} has shape {list(a.shape)}, "
                               f"expected {list(shape)}")
    if not np.isfinite(a).all():
        raise CalibrationError(f"calibration file {path}: tensor {name!r} holds values that are not finite")
    return a
