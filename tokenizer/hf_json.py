"""A tokenizer from a Hugging Face tokenizer.json (+ tokenizer_config.json contents).

tokenizer.json holds the whole pipeline, so the `tokenizers` library loads
it as is. What it does not say reliably comes from tokenizer_config.json:
which tokens are BOS/EOS and whether BOS is added by default. Without a
config we read the post-processor (does it put a special token first?) and
look for the usual end-of-text tokens.
"""
import json
from typing import Optional

from . import hf_config
from .base import END_OF_GENERATION_PIECES
from .bpe import BPETokenizer
from .errors import TokenizerError
from .jsonfile import parse_json

_BOS_GUESSES = ("<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>")


def bpe_from_tokenizer_json(path: str, config: Optional[dict] = None) -> BPETokenizer:
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - a declared dependency
        raise TokenizerError("the 'tokenizers' package is needed for tokenizer.json: pip install tokenizers") from None
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TokenizerError(f"cannot read {path}: {e.strerror or e}") from None
    spec = parse_json(data, path, "tokenizer.json")      # bad UTF-8, JSON or deep nesting
    if not isinstance(spec, dict) or "model" not in spec:
        raise TokenizerError(f"{path} is not a tokenizer.json (no 'model' section)")
    try:
        tk = Tokenizer.from_str(json.dumps(spec))
    except Exception as e:
        raise TokenizerError(f"{path} was rejected by the tokenizers library: {e}") from None
    if config is not None and not isinstance(config, dict):
        raise TokenizerError("tokenizer config must be a dict (the contents of tokenizer_config.json)")

    style, strip_first_space = _decoding_style(spec.get("decoder"), path)
    _add_config_tokens(tk, config)

    def id_of(key):
        content = hf_config.token_content((config or {}).get(key), key)
        if content is None:
            return None
        i = tk.token_to_id(content)
        if i is None:
            raise TokenizerError(f"tokenizer config {key} {content!r} is not in the vocabulary of {path}")
        return i

    bos_id = id_of("bos_token")
    eos_id = id_of("eos_token")
    bos_added = _post_processor_bos(tk)
    if bos_id is None:
        bos_id = bos_added
    if bos_id is None and "bos_token" not in (config or {}):
        # No config to say; an explicit "bos_token": null (Qwen2) means none.
        bos_id = _first_present(tk, _BOS_GUESSES)
    if eos_id is None:
        eos_id = _first_present(tk, END_OF_GENERATION_PIECES)
    add_bos = hf_config.optional_flag(config, "add_bos_token")
    if add_bos is None:
        add_bos = bos_added is not None
    return BPETokenizer(tk, style=style, bos_id=bos_id, eos_id=eos_id,
                        add_bos_default=add_bos, strip_first_space=strip_first_space)


def _decoding_style(decoder, path):
    """(style, strip_first_space) from the tokenizer.json "decoder" section."""
    if not decoder:
        raise TokenizerError(f"{path} declares no decoder; qinfer needs ByteLevel or a SentencePiece-style one")
    steps = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]
    kinds = [s.get("type") for s in steps]
    if "ByteLevel" in kinds:
        return "byte_level", False
    if "Metaspace" in kinds:
        meta = steps[kinds.index("Metaspace")]
        strip = meta.get("prepend_scheme", "always") != "never" and meta.get("add_prefix_space", True)
        return "sentencepiece", bool(strip)
    replaces_space = any(s.get("type") == "Replace" and s.get("content") == " "
                         and (s.get("pattern") or {}).get("String") == "\u2581" for s in steps)
    if replaces_space:
        strip = any(s.get("type") == "Strip" and s.get("content") == " " and s.get("start", 0) >= 1
                    for s in steps)
        return "sentencepiece", strip
    raise TokenizerError(f"{path}: unsupported tokenizer decoder {kinds} "
                         "(qinfer supports byte-level BPE and SentencePiece-style tokenizer.json)")


def _add_config_tokens(tk, config):
    # tokenizer_config.json can name special tokens and declare added tokens
    # that tokenizer.json does not list as added.
    from tokenizers import AddedToken

    for content in hf_config.named_special_tokens(config):
        if tk.token_to_id(content) is None:
            continue        # id_of() reports BOS/EOS missing from the vocabulary
        if not any(t.content == content for t in tk.get_added_tokens_decoder().values()):
            tk.add_special_tokens([AddedToken(content, special=True, normalized=False)])
    for t in hf_config.added_tokens(config):
        known = tk.token_to_id(t.content)
        if known is not None:
            continue
        if t.id != tk.get_vocab_size(with_added_tokens=True):
            raise TokenizerError(f"tokenizer config adds {t.content!r} as id {t.id}, "
                                 "but tokenizer.json does not have it and the id is not the next free one")
        added = AddedToken(t.content, special=t.special, lstrip=t.lstrip, rstrip=t.rstrip, normalized=False)
        (tk.add_special_tokens if t.special else tk.add_tokens)([added])


def _post_processor_bos(tk) -> Optional[int]:
    """The special id the post-processor puts in front of a text, if any."""
    plain = tk.encode("a", add_special_tokens=False).ids
    full = tk.encode("a", add_special_tokens=True).ids
    if len(full) > len(plain) and full[1:1 + len(plain)] == plain:
        return full[0]
    return None


def _first_present(tk, pieces):
    for p in pieces:
        i = tk.token_to_id(p)
        if i is not None:
            return i
    return None
