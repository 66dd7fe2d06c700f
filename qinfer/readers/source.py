"""What every reader returns: a validated, plain description of a model.

Readers know nothing of kernels: they hand over a config, named tensors in
Hugging Face orientation and names, and what is needed to build the
tokenizer. qinfer/model.py turns that into the runtime model.

Tensor names (Hugging Face LLaMA names):
    model.embed_tokens.weight                      [vocab, hidden]
    model.layers.{i}.input_layernorm.weight        [hidden]
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight   [out, in]
    model.layers.{i}.post_attention_layernorm.weight   [hidden]
    model.layers.{i}.mlp.{gate,up,down}_proj.weight    [out, in]
    model.norm.weight                              [hidden]
    lm_head.weight                                 [vocab, hidden]  (absent when tied)
q_proj/k_proj rows are in Hugging Face order (rotate-half RoPE): a GGUF
reader undoes llama.cpp's interleaving permutation.
"""
import mmap
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Union

import numpy as np

from ..errors import FormatError
from ..tokenizer.spec import TokenizerSpec     # a ModelSource's tokenizer; readers import it from here


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None      # {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = None
    eos_token_ids: List[int] = field(default_factory=list)


@dataclass
class PackedTensor:
    """A linear weight already quantized, in the arguments of QuantizedLinear.from_packed.

    A lazy one (`make` set, the arrays None) is converted by load(): a GGUF
    block tensor is re-laid only when the model builder takes it, and the
    result is not kept here, so a whole model is never held twice.
    """
    bits: int
    group_size: int                 # -1: full column
    qweight: Optional[np.ndarray] = None    # int32 [in * bits / 32, out]
    scales: Optional[np.ndarray] = None     # float32 [groups, out]
    zeros: Optional[np.ndarray] = None      # float32 [groups, out]
    g_idx: Optional[np.ndarray] = None
    shape: tuple = ()               # (out, in), Hugging Face orientation
    make: Optional[Callable[[], "PackedTensor"]] = None
    # A GGUF block tensor's make is fill(into=None, order=None): it converts into given arrays
    # (qweight, scales, zeros transposed: [out, ...]), so tensors of one input are stacked
    # as they are converted (model.stack_packed), and its rows in a given order (unpermute).
    fill: Optional[Callable[..., "PackedTensor"]] = None
    half_exact: bool = False        # every scale and zero is exact in float16 (known from the format)
    # None, or the factors (A float32 [rank, in], B float32 [out, rank]) of a low-rank compensation
    # y += B (A x) (LoRC, qinfer/quant/lorc.py; W8A8/W4A8 checkpoints, readers/gptq.py)
    low_rank: Optional[tuple] = None

    def load(self):
        """This tensor with its arrays: itself, or a new PackedTensor made now (not cached)."""
        return self if self.make is None else self.make()


@dataclass
class SpqrTensor:
    """A linear weight stored with SpQR (readers/spqr.py), in the arguments of
    spqr_linear.SpqrLinear: b-bit codes, their group statistics compressed into
    records of 16 output rows, and float16 outliers in a compressed-sparse-row table.
    Never stacked with other layers."""
    bits: int
    group_size: int                 # beta1: input columns per group
    stat_bits: int                  # bits of each group scale's code
    qweight: np.ndarray             # int32 [in * bits / 32, out], the codes in the weight's column order
    records: np.ndarray             # uint16 [ceil(out / 16), in / group_size, stat_bits + bits + 2]
    outlier_rows: np.ndarray        # int32 [out + 1]: row r's outliers are entries rows[r]:rows[r + 1]
    outlier_cols: np.ndarray        # uint16 [n]
    outlier_vals: np.ndarray        # float16 [n]
    perm: Optional[np.ndarray] = None   # act-order: int32 [in], the columns in the order quantized
    shape: tuple = ()               # (out, in), Hugging Face orientation

    def load(self):
        """Itself (the arrays are read already), as PackedTensor.load."""
        return self


@dataclass
class BcqTensor:
    """A linear weight stored with binary-coding quantization (readers/bcq.py):
    w = sum_i alpha_i b_i + offset per group of input columns and output row,
    b_i = +-1, run by the lookup-table kernels (lut_linear.LutLinear). Never stacked."""
    bits: int
    group_size: int
    planes: np.ndarray              # int8 [bits, out, in], each -1 or +1
    alphas: np.ndarray              # float32 [in / group_size, out, bits] (float16 values)
    offsets: np.ndarray             # float32 [in / group_size, out] (float16 values)
    shape: tuple = ()               # (out, in), Hugging Face orientation

    def load(self):
        return self


def is_quantized(t):
    """Whether a source tensor is stored quantized (packed codes, SpQR or BCQ), not float."""
    return isinstance(t, (PackedTensor, SpqrTensor, BcqTensor))


# A float tensor is a numpy array (any float dtype; mmap-backed where possible)
# or a zero-argument callable that produces one (lazy conversion).
FloatTensor = Union[np.ndarray, Callable[[], np.ndarray]]
Tensor = Union[FloatTensor, PackedTensor, SpqrTensor, BcqTensor]


@dataclass
class ModelSource:
    path: str
    format: str                        # "hf" | "gguf" | "gptq" | "spqr" | "bcq"
    config: ModelConfig
    tensors: Dict[str, Tensor]
    tokenizer: Optional[TokenizerSpec]
    chat_template: Optional[str] = None
    keepalive: list = field(default_factory=list)   # mmaps / file handles the tensors view
    # None, or "int8-token": the checkpoint's linear layers take their inputs rounded to int8
    # per token (W8A8; readers/gptq.py reads it from quantization_config's input_activations)
    activations: Optional[str] = None

    def release_pages(self):
        """Give back the pages of the mapped files that reading has made resident.

        Loading copies the weights into the kernels' layout, yet the file pages it read
        stay resident in this process (counted in its RSS) for as long as the map lives,
        and the map lives as long as any tensor views it: a 4 GB checkpoint would cost
        8 GB to load. The maps are read-only, so dropping the pages changes no data: a
        view that is read again (a float32 norm or embedding used in place) faults its
        pages back in from the page cache."""
        for m in self.keepalive:
            _drop_resident_pages(m)

    def float_tensor(self, name):
        t = self.tensors[name]
        if callable(t):
            t = t()
        t = np.asarray(t, dtype=np.float32)
        check_finite(t, name, self.path)
        return t


def _drop_resident_pages(array):
    # np.memmap keeps its mmap.mmap in ._mmap (slices share it); madvise exists on Linux
    # and some BSDs, and elsewhere the pages simply stay until the map is closed.
    mm = getattr(array, "_mmap", None)
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if mm is None or advice is None or not hasattr(mm, "madvise"):
        return
    try:
        mm.madvise(advice)
    except (OSError, ValueError):    # a closed map, or a kernel that refuses: nothing to give back
        pass


def check_finite(array, name, path):
    """FormatError if a float array holds NaN or Inf (a corrupt or mis-converted file, which
    would otherwise load and generate garbage). A float64 sum of float32 values cannot
    overflow, so it is finite exactly when every value is, without a boolean temporary."""
    if array.size and not np.isfinite(array.sum(dtype=np.float64)):
        bad = np.argwhere(~np.isfinite(array))[0]
        value = array[tuple(bad)]
        raise FormatError(f"{path}: tensor {name!r} holds a non-finite value ({value}) at "
                          f"{list(int(i) for i in bad)}")
