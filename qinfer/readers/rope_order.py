"""Undoing llama.cpp's q/k row permutation, so rows are in Hugging Face (rotate-half) order.

Hugging Face LLaMA rotates dimension i of a head together with i + head_dim/2
(rotate_half). llama.cpp rotates adjacent pairs (2i, 2i + 1), so its
converter (convert_hf_to_gguf.py, LlamaModel.permute) reorders the output
rows of q_proj (with n_head) and k_proj (with n_head_kv) as

    w.reshape(n_head, 2, head_dim // 2, in).swapaxes(1, 2).reshape(out, in)

i.e. GGUF row  h*head_dim + 2*i + j  is HF row  h*head_dim + j*head_dim/2 + i
(h: head, i < head_dim/2, j in {0, 1}). The inverse gathers, for each HF row,
the GGUF row it came from; see hf_rows_from_gguf.
"""
import numpy as np

from ..errors import FormatError
from .lazy import LazyTensor
from .source import PackedTensor


def hf_rows_from_gguf(n_rows, n_head):
    """index such that hf_weight = gguf_weight[index] (rows = output features)."""
    if n_head < 1 or n_rows % (2 * n_head):
        raise FormatError(f"cannot undo the RoPE row permutation: {n_rows} rows do not split into "
                          f"{n_head} heads of an even size")
    head_dim = n_rows // n_head
    # arange laid out as GGUF's [head, i, j] holds each GGUF row number; read
    # it in HF order [head, j, i].
    return np.arange(n_rows).reshape(n_head, head_dim // 2, 2).transpose(0, 2, 1).reshape(-1)


def unpermute(tensor, n_head):
    """A GGUF-order q/k weight (PackedTensor, float array or LazyTensor) -> HF row order."""
    if isinstance(tensor, PackedTensor) and tensor.fill is not None:
        index = hf_rows_from_gguf(tensor.shape[0], n_head)
        # GGUF blocks: converted in HF row order, with no copy to reorder afterwards

        def fill(into=None, order=None):
            return tensor.fill(into, index if order is None else index[order])
        return PackedTensor(bits=tensor.bits, group_size=tensor.group_size, shape=tensor.shape,
                            half_exact=tensor.half_exact, make=fill, fill=fill)
    if isinstance(tensor, PackedTensor):
        index = hf_rows_from_gguf(tensor.shape[0], n_head)
        tensor = tensor.load()
        # Output rows are PackedTensor columns: gathered as rows of the transposed arrays
        # (GGUF tensors are held column-major, so these are whole contiguous rows).
        rows = lambda a: np.ascontiguousarray(a.T[index]).T
        return PackedTensor(bits=tensor.bits, group_size=tensor.group_size, qweight=rows(tensor.qweight),
                            scales=rows(tensor.scales), zeros=rows(tensor.zeros), g_idx=tensor.g_idx,
                            shape=tensor.shape)
    index = hf_rows_from_gguf(tensor.shape[0], n_head)
    if isinstance(tensor, LazyTensor):
        return LazyTensor(tensor.shape, tensor.source_dtype, lambda: tensor()[index])
    # A float32 view on the file: gather lazily too, so opening a model copies nothing.
    return LazyTensor(tensor.shape, "F32", lambda: np.asarray(tensor, dtype=np.float32)[index])
