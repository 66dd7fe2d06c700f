"""A byte-level BPE tokenizer from GGUF metadata (tokenizer.ggml.model == "gpt2").

The vocabulary, merges and split rule (tokenizer.ggml.pre) are assembled
into a `tokenizers` pipeline: pre-tokenizer, BPE model, byte-level decoder.
Tokens typed CONTROL (3) become special added tokens, USER_DEFINED (4)
plain added ones: both are matched whole in the text, as llama.cpp does.
"""
from . import gguf_metadata as gm
from .bpe import BPETokenizer
from .errors import TokenizerError
from .pretokenizers import pre_tokenizer_for


def _split_merge(merge: str, index: int):
    # "Ġ t" -> ("Ġ", "t"). Search from position 1 so that a merge whose left
    # part is itself a space token (possible outside byte-level) still splits.
    cut = merge.find(" ", 1)
    if cut < 0:
        raise TokenizerError(f"GGUF metadata {gm.MERGES!r} entry {index} ({merge!r}) is not two tokens")
    return merge[:cut], merge[cut + 1:]


def bpe_from_gguf(meta: dict) -> BPETokenizer:
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, models
    except ImportError:  # pragma: no cover - a declared dependency
        raise TokenizerError("the 'tokenizers' package is needed for BPE tokenizers: pip install tokenizers") from None

    tokens = gm.string_list(meta, gm.TOKENS)
    n = len(tokens)
    types = gm.number_list(meta, gm.TOKEN_TYPE, n, int, default=gm.NORMAL)
    merges = [_split_merge(m, i) for i, m in enumerate(gm.string_list(meta, gm.MERGES))]
    pre, ignore_merges = pre_tokenizer_for(gm.string(meta, gm.PRE))

    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)      # a duplicated token keeps its first id, as llama.cpp does
    try:
        model = models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges)
    except Exception as e:
        raise TokenizerError(f"GGUF BPE vocabulary rejected by the tokenizers library: {e}") from None
    tk = Tokenizer(model)
    tk.pre_tokenizer = pre
    tk.decoder = decoders.ByteLevel()
    # normalized=False: match the literal text, before any pre-tokenization.
    tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                           for i in range(n) if types[i] == gm.CONTROL and tokens[i]])
    tk.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                   for i in range(n) if types[i] == gm.USER_DEFINED and tokens[i]])

    extra = [gm.token_id(meta, k, n) for k in (gm.EOT_ID, gm.EOM_ID)]
    return BPETokenizer(tk, style="byte_level",
                        bos_id=gm.token_id(meta, gm.BOS_ID, n),
                        eos_id=gm.token_id(meta, gm.EOS_ID, n),
                        extra_eos_ids=[i for i in extra if i is not None],
                        add_bos_default=gm.flag(meta, gm.ADD_BOS, False))
