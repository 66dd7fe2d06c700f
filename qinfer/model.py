"""The model builder: turns a reader's ModelSource into the runtime model.

Linear layers that arrive packed (GGUF block formats, GPTQ) run on the
quantized kernels as they are (or on the lookup-table kernels, kernels.lut_mode),
SpQR ones as SpqrLinear layers and BCQ ones as LutLinear layers (neither is
stacked); float ones stay float32 (read from the file's memory map when
already float32) or are quantized on load when asked
(round to nearest with float16 scales, the model `qinfer quantize --method
rtn` writes, so its scales and zeros are held in float16). An embedding
table stored quantized stays packed, its rows widened when looked up (a 7B
model's Q4_0 table is 70 MB packed, 500 MB in float32), and a tied LM head
is that same layer; a float table is held as stored (float16 or float32).
"""
import math
import os
from typing import NamedTuple

import numpy as np

from . import arena, kernels
from . import kv_cache as kv_formats
from . import memory
from ._forward import Transformer
from .errors import QinferError, UnsupportedError
from .linear import QuantizedLinear
from .int8_linear import Int8Linear, kernel_isa as int8_isa
from .lut_linear import LutLinear, fits as fits_lut
from .readers.source import BcqTensor, PackedTensor, SpqrTensor
from .spqr_linear import SpqrLinear

PREFILL_CHUNK = 512       # tokens per forward call; longer prompts are fed in chunks
# The linear maps of a block: the C side's names and the Hugging Face ones.
LINEAR_NAMES = {
    "wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
    "wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj",
    "w_down": "mlp.down_proj",
}
LM_HEAD_BITS = 8          # a quantized-on-load model keeps its LM head at 8 bits
# Maps of a block that read the same input, run as one stacked layer when
# they are quantized alike: one kernel call instead of three (two), so one
# pass of the threads and one preparation of the input per token.
STACKED = {"wqkv": ("wq", "wk", "wv"), "w_gate_up": ("w_gate", "w_up")}
STACK_ENV = "QINFER_STACK"    # "0": keep them separate (A/B measurements)


def quantize_on_load(weight, bits, group_size):
    """RTN with float16-exact scales and integer zeros (quant/quantizer.py): the
    layer then holds its scales and zeros in float16, a sixth fewer bytes per
    token at 4-bit group 32 than float32 ones, at no cost in accuracy. A group
    size that does not divide the layer's inputs leaves a short last group, as
    `qinfer quantize` does (576 inputs in groups of 128: four of 128 and one of
    64, which the kernels run as groups of 64, each scale repeated)."""
    from .quant.quantizer import rtn_quantize       # quant imports the engine: import on use
    return rtn_quantize(weight, bits, group_size).to_linear()


# The run-time layers a forward pass calls through qmatrix.h's entry points
KERNEL_LAYERS = (QuantizedLinear, SpqrLinear, LutLinear, Int8Linear)


def bcq_layer(t):
    """The LutLinear of a reader's BcqTensor."""
    from .quant.bcq import BcqResult       # quant imports the engine: import on use
    group = t.shape[1] if t.group_size == -1 else t.group_size
    return LutLinear.from_bcq(BcqResult(t.bits, group, t.planes, t.alphas, t.offsets))


def spqr_layer(t):
    """The SpqrLinear of a reader's SpqrTensor."""
    out_features, in_features = t.shape
    return SpqrLinear(t.qweight, t.records, t.outlier_rows, t.outlier_cols, t.outlier_vals, t.bits, t.group_size,
                      t.stat_bits, in_features, out_features, t.perm)


def stack_packed(parts):
    """PackedTensors of one input side by side (their output columns concatenated), e.g.
    q, k and v: one layer is built from them instead of three built and stacked."""
    first = parts[0]
    shape = (sum(t.shape[0] for t in parts), first.shape[1])
    half_exact = all(t.half_exact for t in parts)
    if all(t.fill is not None for t in parts):
        # GGUF blocks: each part converted straight into its rows of the stacked arrays
        # (held column-major, like one GGUF tensor), no copy of the parts to concatenate
        n_groups = shape[1] // first.group_size
        arrays = (np.empty((shape[0], shape[1] * first.bits // 32), dtype=np.uint32),
                  np.empty((shape[0], n_groups), dtype=np.float32), np.empty((shape[0], n_groups), dtype=np.float32))
        row = 0
        for t in parts:
            t.fill(tuple(a[row:row + t.shape[0]] for a in arrays))
            row += t.shape[0]
        words, scales, zeros = (a.T for a in arrays)
        return PackedTensor(bits=first.bits, group_size=first.group_size, qweight=words.view(np.int32),
                            scales=scales, zeros=zeros, shape=shape, half_exact=half_exact)
    parts = [t.load() for t in parts]
    # concatenated as rows of the transposed arrays: GGUF tensors are held column-major
    cat = lambda arrays: np.concatenate([a.T for a in arrays]).T
    return PackedTensor(bits=first.bits, group_size=first.group_size, qweight=cat([t.qweight for t in parts]),
                        scales=cat([t.scales for t in parts]), zeros=cat([t.zeros for t in parts]),
                        shape=shape, half_exact=half_exact)


def _stackable(tensors):
    first = tensors[0]
    return all(isinstance(t, PackedTensor) and t.g_idx is None and t.low_rank is None and
               (t.bits, t.group_size, t.shape[1]) == (first.bits, first.group_size, first.shape[1])
               for t in tensors)


class Cache(NamedTuple):
    """A KV cache of transformer.seqs sequences of ctx tokens each, and the step buffers
    (pyx/_forward.pyx's Transformer)."""
    transformer: Transformer
    ctx: int                  # tokens it holds per sequence


def check_ctx(ctx):
    """ctx, if it is a context length qinfer accepts (tokens a KV cache sequence holds),
    else a QinferError."""
    if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 1:
        raise QinferError(f"context length must be a positive integer, got {ctx!r}")
    if ctx > (1 << 31) - 1:
        raise QinferError(f"context length {ctx} is beyond what qinfer accepts (at most 2**31 - 1)")
    return ctx


def cache_formats(config):
    """{name: KVSpec with the default settings, or the UnsupportedError saying why this
    model cannot use it} for each implemented KV cache format."""
    formats = {}
    for name in kv_formats.IMPLEMENTED:
        try:
            formats[name] = kv_formats.check(name, head_dim=config.head_dim)
        except UnsupportedError as e:
            formats[name] = e
    return formats


def check_cache_fits(config, kv_cache, ctx, seqs=1):
    """The bytes of a full KV cache of `seqs` sequences of ctx tokens in format kv_cache (a
    KVSpec or a name), or a QinferError when the machine has less memory available
    (memory.available_bytes; not checked where that is unknown). The cache is allocated
    whole but its pages become resident only as tokens fill them, so a cache that does
    not fit would load and then fail mid-generation, killed when memory runs out."""
    spec = kv_formats.check(kv_cache)
    need = spec.cache_bytes(config, ctx, seqs)
    available = memory.available_bytes()
    if available is None or need <= available:
        return need
    fit = (available // seqs - spec.fixed_bytes(config)) // spec.bytes_per_token(config)
    smaller = f"a smaller --ctx (at most {fit} tokens fit)" if fit >= 1 else "a smaller --ctx"
    compact = [name for name, other in cache_formats(config).items() if isinstance(other, kv_formats.KVSpec)
               and other.bytes_per_token(config) < spec.bytes_per_token(config)]
    advice = f"{smaller} or a more compact --kv-cache ({', '.join(compact)})" if compact else smaller
    held = f"{ctx} tokens x {seqs} sequences" if seqs > 1 else f"{ctx} tokens"
    raise QinferError(f"the KV cache for a context of {held} ({spec.describe()}) needs "
                      f"{memory.format_bytes(need)}, more than the {memory.format_bytes(available)} of memory "
                      f"available (MemAvailable + SwapFree); use {advice}")


class ContextError(QinferError):
    """More tokens than the context (KV cache) holds."""


def rope_frequencies(head_dim, theta, scaling=None):
    """RoPE inverse frequencies, with Llama 3's long-context scaling when configured."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


class Model:
    """Weights laid out for the forward pass, the KV cache, and one forward call per step."""

    def __init__(self, source, ctx=None, quantize=None, group_size=128, threads=None, dequantize=False,
                 activations=None, stack=None, kv_cache=None, kv_residual=None, kv_group=None,
                 kv_calibration=None):
        cfg = self.config = source.config
        self.ctx = check_ctx(ctx if ctx is not None else cfg.max_position_embeddings)
        # the KV cache's format and settings (qinfer/kv_cache.py), and its name
        self.kv_spec = kv_formats.check(kv_cache, kv_residual, kv_group, head_dim=cfg.head_dim)
        self.kv_cache = self.kv_spec.name
        # kvquant's levels and key ranges (a kv_calibration.Calibration holding this width)
        self.kv_calibration = kv_calibration
        if self.kv_spec.name in kv_formats.CALIBRATED and kv_calibration is None:
            raise QinferError(f"the {self.kv_spec.name} KV cache needs a calibration (qinfer calibrate-kv)")
        self.quantize, self.group_size = quantize, group_size
        self.dequantize = dequantize          # packed tensors become float32 (a float baseline)
        self.threads = kernels.resolve_threads(threads)
        # "int8": one-token steps round activations to int8 (kernels.py); None: the global mode
        self.activations = kernels.check_activations(activations or kernels.active_activations())
        self._keep = []                       # QuantizedLinear objects the C side points into
        self.stack = os.environ.get(STACK_ENV, "1") != "0" if stack is None else bool(stack)
        self._stacked = {}                    # (layer, "wqkv" | "w_gate_up") -> the stacked QuantizedLinear
        self.scale_bytes = {}                 # name of a tensor run packed -> bytes of each scale/zero as held
        self.shared_zero = {}                 # ... -> whether its zeros are held once per column
        self.held_bytes = {}                  # name of a tensor run as SpQR or BCQ -> bytes its layer holds

        # a float tied LM head is the embedding itself, read whole per token
        self._embedding_layer = self._packed_embedding(source)
        self._embedding_table = None if self._embedding_layer is not None else self._table(
            source, "model.embed_tokens.weight", streamed=cfg.tie_word_embeddings and not quantize)
        source.release_pages()
        layers = []
        for i in range(cfg.num_hidden_layers):
            layers.append(self._layer(source, i))
            source.release_pages()        # peak memory: the model as laid out plus one layer of the file
        final_norm = source.float_tensor("model.norm.weight")
        lm_head = self._lm_head(source)
        source.release_pages()
        arena.weights.trim()              # the pages past the last layer's arrays (qinfer/arena.py)
        self.float_lm_head = lm_head if isinstance(lm_head, np.ndarray) else None   # float32 or float16
        inv_freq = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self._keep.append(source)
        self._weights = (self._embedding_spec(), layers, final_norm, lm_head, inv_freq)
        self.transformer = self._transformer(self.ctx)
        self.cache = Cache(self.transformer, self.ctx)

    def _transformer(self, ctx, seqs=1):
        """The C forward pass over this model's weights, with a KV cache of seqs x ctx tokens."""
        cfg = self.config
        spec = self.kv_spec
        check_cache_fits(cfg, spec, ctx, seqs)
        # a windowed cache's ring holds a call's new tokens too: longer prompts go in smaller chunks
        chunk = kv_formats.WINDOWED_CHUNK if spec.windowed else PREFILL_CHUNK
        try:
            return Transformer(
                dict(dim=cfg.hidden_size, hidden_dim=cfg.intermediate_size, n_heads=cfg.num_attention_heads,
                     n_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, vocab_size=cfg.vocab_size,
                     ctx=ctx, eps=cfg.rms_norm_eps),
                *self._weights, min(chunk, ctx), self.threads, seqs, spec.name, spec.residual, spec.group,
                self._kv_calibration_arrays())
        except MemoryError:
            need = spec.cache_bytes(cfg, ctx, seqs)
            raise QinferError(f"out of memory allocating the KV cache for a context of {ctx} tokens "
                              f"(about {need} bytes, {need / 2**30:.1f} GiB); use a smaller ctx/--ctx") from None

    def _kv_calibration_arrays(self):
        """What the C side reads of the calibration for this cache's bit width, or None."""
        cal, bits = self.kv_calibration, self.kv_spec.bits
        if self.kv_spec.name not in kv_formats.CALIBRATED:
            return None
        return dict(key_center=cal.key_center, key_half_range=cal.key_half_range,
                    key_levels=cal.key_levels[bits], value_levels=cal.value_levels[bits])

    def new_cache(self, ctx=None, seqs=1):
        """Another KV cache, of `seqs` sequences of ctx tokens each (default: the model's
        context), with its own step buffers, over the same weights: a server's slots.
        Model.forward(cache=..., seq=...) runs one of its sequences, forward_rows a decode
        step of several. It runs the layers as they are now (replace_linear later changes
        the model's own, and the layers of caches made after it)."""
        ctx = self.ctx if ctx is None else check_ctx(ctx)
        if isinstance(seqs, bool) or not isinstance(seqs, int) or seqs < 1:
            raise QinferError(f"sequences must be a positive integer, got {seqs!r}")
        return Cache(self._transformer(ctx, seqs), ctx)

    # ------------------------------------------------------------ building
    def _packed_embedding(self, source):
        """The embedding as a packed dim -> vocab layer when the file stores it quantized
        and the model runs packed tensors packed; else None (a float table)."""
        t = source.tensors["model.embed_tokens.weight"]
        if not isinstance(t, PackedTensor) or self.dequantize:
            return None
        layer = self._packed(t, "model.embed_tokens.weight")
        if (layer.out_features, layer.in_features) != (self.config.vocab_size, self.config.hidden_size):
            raise QinferError(f"the embedding table has shape {[layer.out_features, layer.in_features]}, "
                              f"expected {[self.config.vocab_size, self.config.hidden_size]}")
        return layer

    def _embedding_spec(self):
        if self._embedding_layer is None:
            return self._embedding_table
        self._keep.append(self._embedding_layer)
        return (self._embedding_layer._matrix.matrix_capsule(),)

    @property
    def embedding(self):
        """The embedding table [vocab, dim] as float (a quantized one is widened whole: for
        calibration, not for running)."""
        if self._embedding_layer is not None:
            return self._embedding_layer.dequantize()
        return self._embedding_table

    @property
    def embedding_packed(self):
        return self._embedding_layer is not None

    @property
    def embedding_nbytes(self):
        """Bytes the model holds for its embedding table."""
        if self._embedding_layer is not None:
            return self._embedding_layer.nbytes
        return self._embedding_table.nbytes

    def _float_matrix(self, source, name):
        """A weight as float32 [out, in]; a quantized one dequantized."""
        t = source.tensors[name]
        if isinstance(t, PackedTensor):
            w = self._packed(t).dequantize()
            return w if t.low_rank is None else w + t.low_rank[1] @ t.low_rank[0]
        if isinstance(t, SpqrTensor):
            return spqr_layer(t).dequantize()
        if isinstance(t, BcqTensor):
            return bcq_layer(t).dequantize()
        return np.ascontiguousarray(source.float_tensor(name))

    def _table(self, source, name, streamed):
        """The embedding table or a float LM head: float16 as stored when the checkpoint
        has it so (the forward pass widens what it reads), float32 otherwise. A float16
        7B checkpoint's two tables are 1 GB in float32. A table only looked up stays a
        view of the file (only the rows used become resident); one streamed whole per
        token (an LM head) is copied: from the file's 4 KiB page-cache pages it read
        about 15% slower (7B-shaped model, decode profile)."""
        half = getattr(source.tensors[name], "half", None)      # readers.lazy.LazyTensor of F16
        if half is None:
            return self._float_matrix(source, name)
        return np.array(half, dtype=np.float16, order="C", copy=True) if streamed else np.ascontiguousarray(half)

    def _packed(self, t, *names):
        """The run-time layer of a PackedTensor; `names`: the source tensors it runs, whose
        held scale width is recorded (scale_bytes: what `qinfer bench` counts)."""
        t = t.load()
        layer = QuantizedLinear.from_packed(t.qweight, t.scales, t.zeros, t.bits, t.group_size, t.g_idx,
                                            known_exact=t.half_exact)
        self.scale_bytes.update(dict.fromkeys(names, np.dtype(layer.scale_dtype).itemsize))
        self.shared_zero.update(dict.fromkeys(names, layer.zero_groups == 1))
        return layer

    def _linear_spec(self, layer):
        """What the C side takes: a float32 array, or (matrix, kernel, int8 kernel or None,
        team kernel of the decode step's activations or None, int8 team kernel of
        several rows or None) capsules."""
        if isinstance(layer, Int8Linear):
            self._keep.append(layer)
            m = layer._matrix
            m.isa = int8_isa()
            m.amx = kernels.int8_amx()
            return (m.matrix_capsule(), m.kernel_capsule(), None, m.team_capsule(), m.rows_team_capsule())
        if isinstance(layer, LutLinear):
            self._keep.append(layer)
            m, fast = layer._matrix, kernels.active_path() == "avx2"
            return (m.matrix_capsule(), m.kernel_capsule(fast), None, m.team_capsule(fast), m.rows_team_capsule(fast))
        if isinstance(layer, (QuantizedLinear, SpqrLinear)):     # the same capsules (SpqrMatrix is a QMatrix's twin)
            self._keep.append(layer)
            m = layer._matrix
            avx2 = kernels.active_path() == "avx2"
            int8 = m.int8_kernel_capsule(avx2) if self.activations == "int8" else None
            # the decode team's kernel is the twin of the one a call runs: int8, or float
            # (float activations, or a bitwidth without int8 kernels: 3-bit)
            team = m.int8_team_capsule(avx2) if int8 is not None else m.team_capsule(avx2)
            rows_team = m.int8_rows_team_capsule(avx2) if int8 is not None else None
            return (m.matrix_capsule(), m.kernel_capsule(avx2), int8, team, rows_team)
        return layer

    def _linear(self, source, name):
        """A QuantizedLinear, an SpqrLinear, a LutLinear, or a float32 [out, in] array."""
        t = source.tensors[name]
        if isinstance(t, PackedTensor) and not self.dequantize:
            return self._packed(t, name)
        if isinstance(t, SpqrTensor) and not self.dequantize:
            layer = spqr_layer(t)
            self.held_bytes[name] = layer.nbytes
            return layer
        if isinstance(t, BcqTensor) and not self.dequantize:
            layer = bcq_layer(t)
            self.held_bytes[name] = layer.nbytes
            return layer
        w = self._float_matrix(source, name)
        if self.quantize:
            return quantize_on_load(w, self.quantize, self.group_size)
        return np.ascontiguousarray(w)

    def _layer(self, source, i):
        p = f"model.layers.{i}."
        names = {c_name: f"{p}{hf_name}.weight" for c_name, hf_name in LINEAR_NAMES.items()}
        maps = {}
        for stacked, parts in STACKED.items():     # packed in the file: stacked before they are laid out
            tensors = [source.tensors[names[c_name]] for c_name in parts]
            if self.stack and not self.dequantize and _stackable(tensors):
                maps[stacked] = self._stacked[i, stacked] = self._packed(
                    stack_packed(tensors), *(names[c_name] for c_name in parts))
        done = {c_name for stacked in maps for c_name in STACKED[stacked]}
        maps.update({c_name: self._linear(source, name) for c_name, name in names.items() if c_name not in done})
        if source.activations == "int8-token" and not self.dequantize:
            self._per_token_int8(i, maps, names, source)
        for stacked, parts in STACKED.items():     # quantized on load (or W8A8 with LoRC): the layers made are stacked
            if stacked in maps:
                continue
            layers = [maps[name] for name in parts]
            if self.stack and all(isinstance(l, (QuantizedLinear, Int8Linear)) and layers[0].can_stack(l)
                                  for l in layers):
                maps[stacked] = self._stacked[i, stacked] = type(layers[0]).stack(layers)
                for name in parts:
                    del maps[name]
        for name, w in maps.items():
            if self._runs_on_lut(w):
                maps[name] = LutLinear.from_quantized(w)
                if (i, name) in self._stacked:
                    self._stacked[i, name] = maps[name]
        return dict(attn_norm=source.float_tensor(p + "input_layernorm.weight"),
                    ffn_norm=source.float_tensor(p + "post_attention_layernorm.weight"),
                    **{name: self._linear_spec(w) for name, w in maps.items()})

    def _per_token_int8(self, i, maps, names, source):
        """A W8A8 / W4A8 checkpoint (source.activations "int8-token"): block i's packed maps
        become Int8Linear layers, whose inputs are rounded to int8 per token
        (qinfer/int8_linear.py), with their low-rank compensation when the file has one."""
        for name, w in list(maps.items()):
            if not isinstance(w, QuantizedLinear):
                continue
            parts = STACKED.get(name, (name,))
            low_rank = source.tensors[names[name]].low_rank if name in names else None
            maps[name] = Int8Linear.from_quantized(w, f"model.layers.{i}.{LINEAR_NAMES[parts[0]]}", low_rank)
            if (i, name) in self._stacked:
                self._stacked[i, name] = maps[name]
            for part in parts:           # held: the codes, float32 scales and int32 code sums
                self.scale_bytes[names[part]], self.shared_zero[names[part]] = 4, False

    def _runs_on_lut(self, layer):
        """Whether a block's packed layer runs on the lookup-table kernels (kernels.lut_mode():
        "on", or "auto" with int8 activations where they measured faster for its shape)."""
        from .tuning import lut_choice

        mode = kernels.lut_mode()
        if mode == "off" or not isinstance(layer, QuantizedLinear) or \
                not fits_lut(layer.bits, layer.group_size, layer.in_features):
            return False
        if mode == "on":
            return True
        return self.activations == "int8" and lut_choice.faster(layer.shape, self.threads, self.activations)

    def _lm_head(self, source):
        name = "model.embed_tokens.weight" if self.config.tie_word_embeddings else "lm_head.weight"
        t = source.tensors[name]
        if name == "model.embed_tokens.weight" and self._embedding_layer is not None:
            return self._linear_spec(self._embedding_layer)          # the same packed layer
        if isinstance(t, PackedTensor) and not self.dequantize:
            layer = self._packed(t, name)
            if source.activations == "int8-token":          # a W8A8 checkpoint's int8 LM head
                layer = Int8Linear.from_quantized(layer, name, t.low_rank)
                self.scale_bytes[name], self.shared_zero[name] = 4, False
            return self._linear_spec(layer)
        if self.quantize:
            w = self.embedding if name == "model.embed_tokens.weight" else self._float_matrix(source, name)
            return self._linear_spec(quantize_on_load(w, LM_HEAD_BITS, self.group_size))
        if name == "model.embed_tokens.weight":
            return self._embedding_table
        return self._table(source, name, streamed=True)

    def quantized_layers(self):
        """The QuantizedLinear, SpqrLinear and LutLinear objects the forward pass runs (each once)."""
        return list({id(k): k for k in self._keep if isinstance(k, KERNEL_LAYERS)}.values())

    def replace_linear(self, layer, name, weight):
        """Swap one linear map of block `layer` (name as in LINEAR_NAMES) for a
        float32 [out, in] array, a QuantizedLinear, an SpqrLinear or a LutLinear (GPTQ, SpQR and BCQ
        do this layer by layer)."""
        if name not in LINEAR_NAMES:
            raise QinferError(f"no linear map named {name!r}; expected one of {sorted(LINEAR_NAMES)}")
        self._unstack(layer, name)
        spec = self._linear_spec(weight) if isinstance(weight, KERNEL_LAYERS) else \
            np.ascontiguousarray(weight, dtype=np.float32)
        self._set_linear(layer, name, spec)

    def _set_linear(self, layer, name, spec):
        """Point block `layer`'s map `name` at spec (None: unset) in the model's forward pass
        and in the weights later caches (new_cache) are built over: those must not keep
        pointing into a layer that replace_linear has let go."""
        self.transformer.set_linear(layer, name, spec)
        self._weights[1][layer][name] = spec

    def _unstack(self, layer, name):
        """Before one part of a stacked map changes, give the parts back their own layers."""
        for stacked, parts in STACKED.items():
            whole = self._stacked.pop((layer, stacked), None) if name in parts else None
            if whole is None:
                continue
            if isinstance(whole, LutLinear):
                raise UnsupportedError(f"block {layer}'s {stacked} runs on the lookup-table kernels, whose "
                                       f"layers are not split; load the model with the lookup tables off")
            widths = [self.transformer.linear_shape(part)[1] for part in parts]
            for part, piece in zip(parts, whole.split(widths)):
                self._set_linear(layer, part, self._linear_spec(piece))
            self._set_linear(layer, stacked, None)
            self._keep = [k for k in self._keep if k is not whole]

    def run_layer(self, layer, x, pos=0, captures=None, threads=None):
        """Block `layer` on hidden states x [n, dim] (float32, C order), in place.

        Positions start at pos; the layer's KV cache keeps the keys so a long
        sequence can be fed in parts. captures: optional dict of float32
        arrays [n, width] for "attn_in", "o_in", "mlp_in", "down_in".
        """
        threads = self.threads if threads is None else kernels.resolve_threads(threads)
        chunk = self.transformer.max_tokens
        for start in range(0, len(x), chunk):
            stop = min(start + chunk, len(x))
            parts = None if captures is None else {k: v[start:stop] for k, v in captures.items()}
            self.transformer.run_layer(layer, x[start:stop], pos + start, parts, threads)

    # ------------------------------------------------------------- running
    def forward(self, tokens, pos, all_logits=False, threads=None, out=None, cache=None, seq=0):
        """Logits for tokens at positions pos..: [n, vocab] if all_logits else [vocab] of the last.

        Feeds the tokens in chunks the buffers hold; the KV cache keeps them (cache: one
        from new_cache(), default the model's own; seq: which of its sequences).
        out: with all_logits, a C-contiguous float32 [n, vocab] array to write the logits
        into (a caller scoring many windows reuses one: a fresh 100 MB array per call
        costs the kernel's page clearing, 8% of a perplexity run).
        """
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        n = len(tokens)
        if n == 0:
            raise QinferError("no tokens to run")
        transformer, ctx = cache or self.cache
        if pos + n > ctx:
            raise ContextError(f"{pos + n} tokens do not fit the context of {ctx} "
                               f"(use a shorter prompt or a larger --ctx)")
        low, high = (int(tokens[0]),) * 2 if n == 1 else (tokens.min(), tokens.max())
        if low < 0 or high >= self.config.vocab_size:
            raise QinferError(f"token ids must lie in [0, {self.config.vocab_size})")
        threads = self.threads if threads is None else kernels.resolve_threads(threads)
        chunk = transformer.max_tokens
        vocab = self.config.vocab_size
        shape = (n if all_logits else 1, vocab)
        if out is None or not all_logits:
            out = np.empty(shape, dtype=np.float32)
        elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise QinferError(f"out must be a C-contiguous float32 array of shape {shape}")
        for start in range(0, n, chunk):
            part = tokens[start:start + chunk]
            last = start + len(part) == n
            if all_logits:
                transformer.forward(part, pos + start, out[start:start + len(part)], True, threads, seq)
            elif last:
                transformer.forward(part, pos + start, out, False, threads, seq)
            else:
                scratch = np.empty((1, vocab), dtype=np.float32)
                transformer.forward(part, pos + start, scratch, False, threads, seq)
        return out if all_logits else out[0]

    def forward_rows(self, tokens, seqs, positions, cache, threads=None, out=None):
        """One decode step of several sequences of `cache` (new_cache): row t is token
        tokens[t] of sequence seqs[t] at position positions[t], each sequence once.
        The linear maps run all rows in one kernel call. Returns logits [n, vocab]
        (out: a C-contiguous float32 [n, vocab] array to write them into; a server
        stepping many times reuses one instead of the kernel clearing fresh pages)."""
        tokens, seqs, positions = (np.ascontiguousarray(a, dtype=np.int32) for a in (tokens, seqs, positions))
        n = len(tokens)
        if n == 0 or not len(seqs) == len(positions) == n:
            raise QinferError("forward_rows needs as many sequences and positions as tokens (at least one)")
        if n > cache.transformer.max_tokens:
            raise QinferError(f"{n} rows are more than a step holds ({cache.transformer.max_tokens})")
        if tokens.min() < 0 or tokens.max() >= self.config.vocab_size:
            raise QinferError(f"token ids must lie in [0, {self.config.vocab_size})")
        if positions.max() >= cache.ctx:
            raise ContextError(f"position {positions.max()} does not fit the context of {cache.ctx}")
        threads = self.threads if threads is None else kernels.resolve_threads(threads)
        shape = (n, self.config.vocab_size)
        if out is None:
            out = np.empty(shape, dtype=np.float32)
        elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise QinferError(f"out must be a C-contiguous float32 array of shape {shape}")
        cache.transformer.forward_rows(tokens, seqs, positions, out, threads)
        return out
