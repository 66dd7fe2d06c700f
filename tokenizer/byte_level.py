"""GPT-2's byte-level alphabet: every byte has a printable stand-in character.

Byte-level BPE vocabularies (GPT-2, LLaMA 3, Qwen2, SmolLM2) store tokens in
this alphabet, so "ĠParis" is the bytes b" Paris". The mapping is fixed by
the format: printable Latin-1 bytes stand for themselves, and the 68 others
(controls, space, DEL, NBSP, soft hyphen...) take the characters from
U+0100 upward, in byte order.
"""


def _build_tables():
    printable = (list(range(ord("!"), ord("~") + 1))
                 + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    kept = set(printable)
    byte_to_char = {}
    spare = 0
    for b in range(256):
        if b in kept:
            byte_to_char[b] = chr(b)
        else:
            byte_to_char[b] = chr(256 + spare)
            spare += 1
    return byte_to_char, {c: b for b, c in byte_to_char.items()}


BYTE_TO_CHAR, CHAR_TO_BYTE = _build_tables()


def piece_to_bytes(piece: str) -> bytes:
    """The bytes a byte-level token stands for.

    A token with a character outside the alphabet cannot have come from the
    byte-level encoder; like the `tokenizers` ByteLevel decoder we then take
    the token's own UTF-8 text rather than drop it.
    """
    try:
        return bytes(CHAR_TO_BYTE[c] for c in piece)
    except KeyError:
        return piece.encode("utf-8")
