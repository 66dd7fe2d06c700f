"""Pre-tokenizers for GGUF byte-level BPE vocabularies, by tokenizer.ggml.pre name.

BPE merges only inside the chunks the pre-tokenizer cuts, so the split rule
is part of the model: the same vocabulary and merges split differently
encode differently. Names follow llama.cpp's (the converter writes them).
"""
from .errors import TokenizerError

# LLaMA 3: case-insensitive contractions, a letter run may take one leading
# non-letter/digit, digits in groups of at most three, newlines kept apart.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Qwen2: LLaMA 3's rule with every digit on its own.
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# name -> (how to build, whether the BPE model looks a whole chunk up in the
# vocabulary before merging: LLaMA 3's tokenizer sets "ignore_merges").
_KINDS = {
    "gpt2": ("gpt2", False),
    "default": ("gpt2", False),
    "smollm": ("digits+gpt2", False),      # SmolLM / StarCoder: each digit alone first
    "starcoder": ("digits+gpt2", False),
    "llama-bpe": ("llama3", True),
    "llama3": ("llama3", True),
    "qwen2": ("qwen2", False),
}

SUPPORTED = tuple(_KINDS)


def pre_tokenizer_for(name):
    """(pre_tokenizer, ignore_merges) for a tokenizer.ggml.pre value."""
    from tokenizers import Regex, pre_tokenizers as pt

    if name is None:
        name = "default"
    if name not in _KINDS:
        raise TokenizerError(f"unsupported GGUF pre-tokenizer {name!r} (tokenizer.ggml.pre); "
                             f"supported: {', '.join(SUPPORTED)}")
    kind, ignore_merges = _KINDS[name]
    # Byte-level mapping last: the split patterns work on the real text.
    if kind == "gpt2":
        pre = pt.ByteLevel(add_prefix_space=False, use_regex=True)
    elif kind == "digits+gpt2":
        pre = pt.Sequence([pt.Digits(individual_digits=True),
                           pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        pattern = LLAMA3_PATTERN if kind == "llama3" else QWEN2_PATTERN
        pre = pt.Sequence([pt.Split(Regex(pattern), behavior="isolated", invert=False),
                           pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    return pre, ignore_merges
