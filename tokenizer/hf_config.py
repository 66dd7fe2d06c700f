"""Reading what tokenizer_config.json (and tokenizer.json's added_tokens) say.

Hugging Face writes special tokens either as plain strings ("<s>") or as
AddedToken dicts ({"content": "<s>", "lstrip": false, ...}); added tokens
appear in tokenizer_config.json's "added_tokens_decoder" ({"32000": {...}})
and in tokenizer.json's "added_tokens" ([{"id": 32000, ...}]).
"""
from typing import List, Optional

from .errors import TokenizerError
from .specials import AddedToken


def token_content(value, key: str) -> Optional[str]:
    """The text of a special-token entry given as a string or an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"tokenizer config {key!r} must be a string or a dict with 'content', got {value!r}")


def added_tokens(config: Optional[dict], tokenizer_json: Optional[dict] = None) -> List[AddedToken]:
    """Added tokens declared in tokenizer_config.json and/or tokenizer.json."""
    found = {}
    entries = []
    if tokenizer_json:
        listed = tokenizer_json.get("added_tokens") or []
        if not isinstance(listed, list):
            raise TokenizerError("tokenizer.json 'added_tokens' must be a list")
        entries += [(e.get("id") if isinstance(e, dict) else None, e) for e in listed]
    if config:
        decoder = config.get("added_tokens_decoder") or {}
        if not isinstance(decoder, dict):
            raise TokenizerError("tokenizer config 'added_tokens_decoder' must be a dict of id -> token")
        entries += list(decoder.items())
    for raw_id, entry in entries:
        try:
            token_id = int(raw_id)
        except (TypeError, ValueError):
            raise TokenizerError(f"added token {entry!r} has no integer id") from None
        if not isinstance(entry, dict):
            raise TokenizerError(f"tokenizer config 'added_tokens_decoder' / tokenizer.json 'added_tokens': "
                                 f"entry {raw_id!r} must be a dict with 'content', got "
                                 f"{type(entry).__name__} {entry!r}"[:200])
        content = token_content(entry, "added token")
        if not content:
            continue
        found[token_id] = AddedToken(content=content, id=token_id,
                                     special=bool(entry.get("special", False)),
                                     lstrip=bool(entry.get("lstrip", False)),
                                     rstrip=bool(entry.get("rstrip", False)))
    return list(found.values())


NAMED_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def named_special_tokens(config: Optional[dict]) -> List[str]:
    """Texts of the special tokens a config names (bos_token... and
    additional_special_tokens): Hugging Face never splits these in text, even
    when added_tokens_decoder does not list them (older configs)."""
    if not config:
        return []
    names = [token_content(config.get(k), k) for k in NAMED_SPECIAL_KEYS]
    extra = config.get("additional_special_tokens") or []
    if not isinstance(extra, list):
        raise TokenizerError("tokenizer config 'additional_special_tokens' must be a list")
    names += [token_content(v, "additional_special_tokens") for v in extra]
    return [n for n in dict.fromkeys(names) if n]


def optional_flag(config: Optional[dict], key: str) -> Optional[bool]:
    if not config or config.get(key) is None:
        return None
    value = config[key]
    if not isinstance(value, bool):
        raise TokenizerError(f"tokenizer config {key!r} must be true or false, got {value!r}")
    return value
