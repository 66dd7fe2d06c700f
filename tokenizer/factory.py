"""Choosing and building the right tokenizer: from a TokenizerSpec, a GGUF
metadata dict, or a Hugging Face model directory."""
import json
import os
from typing import Optional

from . import gguf_metadata as gm
from . import hf_config
from .base import Tokenizer
from .errors import TokenizerError
from .jsonfile import parse_json
from .spec import TokenizerSpec


def load(spec) -> Tokenizer:
    """Build the tokenizer a TokenizerSpec describes."""
    kind = getattr(spec, "kind", None)
    if kind == "sentencepiece_file":
        return sentencepiece_file(_need_path(spec), getattr(spec, "config", None))
    if kind == "hf_json":
        from .hf_json import bpe_from_tokenizer_json
        return bpe_from_tokenizer_json(_need_path(spec), getattr(spec, "config", None))
    if kind == "gguf":
        meta = getattr(spec, "gguf_metadata", None)
        if not isinstance(meta, dict):
            raise TokenizerError("a 'gguf' tokenizer spec needs gguf_metadata (a dict of tokenizer.ggml.* keys)")
        return from_gguf_metadata(meta)
    raise TokenizerError(f"unknown tokenizer spec kind {kind!r} "
                         "(expected 'sentencepiece_file', 'hf_json' or 'gguf')")


def from_gguf_metadata(meta: dict) -> Tokenizer:
    model = gm.require(meta, gm.MODEL)
    if model == "llama":
        from .sentencepiece_tokenizer import SentencePieceTokenizer
        from .spm_proto import model_proto_from_gguf
        from .specials import AddedToken

        tokens = gm.string_list(meta, gm.TOKENS)
        n = len(tokens)
        types = gm.number_list(meta, gm.TOKEN_TYPE, n, int, default=gm.NORMAL)
        # Control tokens are parsed in text, as llama.cpp does for chat
        # templates; user-defined ones sentencepiece already matches itself.
        controls = [AddedToken(tokens[i], i, special=True)
                    for i in range(n) if types[i] == gm.CONTROL and tokens[i]]
        extra = [gm.token_id(meta, k, n) for k in (gm.EOT_ID, gm.EOM_ID)]
        return SentencePieceTokenizer.from_proto(
            model_proto_from_gguf(meta), source="GGUF llama vocabulary",
            added_tokens=controls,
            bos_id=gm.token_id(meta, gm.BOS_ID, n), eos_id=gm.token_id(meta, gm.EOS_ID, n),
            extra_eos_ids=[i for i in extra if i is not None],
            add_bos_default=gm.flag(meta, gm.ADD_BOS, True))
    if model == "gpt2":
        from .bpe_gguf import bpe_from_gguf
        return bpe_from_gguf(meta)
    raise TokenizerError(f"unsupported GGUF tokenizer model {model!r} ({gm.MODEL}); "
                         "qinfer supports 'llama' (SentencePiece) and 'gpt2' (byte-level BPE)")


def sentencepiece_file(path: str, config: Optional[dict] = None) -> Tokenizer:
    """A tokenizer.model, with the added tokens, BOS/EOS and add_bos_token a
    tokenizer_config.json declares (when given). With a config, the special
    tokens it names are parsed in text as Hugging Face does ("<s>" -> BOS);
    without one, text is plain sentencepiece input."""
    from .sentencepiece_tokenizer import SentencePieceTokenizer, load_model_file
    from .specials import AddedToken

    if config is not None and not isinstance(config, dict):
        raise TokenizerError("tokenizer config must be a dict (the contents of tokenizer_config.json)")
    processor = load_model_file(path)
    added = hf_config.added_tokens(config)
    declared = {t.content for t in added}
    for content in hf_config.named_special_tokens(config):
        i = processor.piece_to_id(content)
        if content not in declared and processor.id_to_piece(i) == content:
            added.append(AddedToken(content, i, special=bool(processor.is_control(i))))

    def id_of(key):
        content = hf_config.token_content((config or {}).get(key), key)
        if content is None:
            return None
        for t in added:
            if t.content == content:
                return t.id
        i = processor.piece_to_id(content)
        if processor.id_to_piece(i) != content:
            raise TokenizerError(f"tokenizer config {key} {content!r} is not in the vocabulary of {path}")
        return i

    add_bos = hf_config.optional_flag(config, "add_bos_token")
    return SentencePieceTokenizer(processor, added_tokens=added, source=path,
                                  bos_id=id_of("bos_token"), eos_id=id_of("eos_token"),
                                  add_bos_default=True if add_bos is None else add_bos)


def from_hf_dir(path: str) -> Tokenizer:
    """The tokenizer of a Hugging Face model directory: tokenizer.json if
    present (it is the complete pipeline), else tokenizer.model, with
    tokenizer_config.json (and special_tokens_map.json) for BOS/EOS."""
    return load(hf_dir_spec(path))


def hf_dir_spec(path: str) -> TokenizerSpec:
    if not os.path.isdir(path):
        raise TokenizerError(f"{path} is not a directory")
    config = _read_json(os.path.join(path, "tokenizer_config.json"))
    special_map = _read_json(os.path.join(path, "special_tokens_map.json"))
    if special_map:
        # Older checkpoints name BOS/EOS only in special_tokens_map.json.
        config = dict(config or {})
        for key in ("bos_token", "eos_token", "unk_token"):
            if config.get(key) is None and special_map.get(key) is not None:
                config[key] = special_map[key]
    for name, kind in (("tokenizer.json", "hf_json"), ("tokenizer.model", "sentencepiece_file")):
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate):
            return TokenizerSpec(kind=kind, path=candidate, config=config)
    raise TokenizerError(f"{path} has no tokenizer.json or tokenizer.model")


def _read_json(path):
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TokenizerError(f"cannot read {path}: {e.strerror or e}") from None
    value = parse_json(data, path, os.path.basename(path))
    if not isinstance(value, dict):
        raise TokenizerError(f"{path} must hold a JSON object")
    return value


def _need_path(spec):
    path = getattr(spec, "path", None)
    if not path:
        raise TokenizerError(f"a {spec.kind!r} tokenizer spec needs a path")
    return path
