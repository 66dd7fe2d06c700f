"""Finding special tokens written literally in text (for the SentencePiece path).

Chat templates write control tokens as text ("<|im_start|>user\\n..."); the
sentencepiece library never turns such a string into its id, so we cut the
text at every occurrence first and encode only the pieces in between. The
`tokenizers` library does this itself for the BPE path.
"""
import re
from dataclasses import dataclass
from typing import Dict, List, Union


@dataclass(frozen=True)
class AddedToken:
    content: str
    id: int
    special: bool = True        # control token: decode() drops it
    lstrip: bool = False        # eats the whitespace before it (Hugging Face flag)
    rstrip: bool = False        # eats the whitespace after it


class SpecialSplitter:
    """Splits text into plain-text strings and AddedToken matches."""

    def __init__(self, tokens):
        self._by_content: Dict[str, AddedToken] = {t.content: t for t in tokens if t.content}
        if self._by_content:
            # Longest first: at a given position the alternation takes the
            # first alternative that matches, so "<|im_end|>" beats "<|im".
            alternatives = sorted(self._by_content, key=len, reverse=True)
            self._pattern = re.compile("|".join(map(re.escape, alternatives)))
        else:
            self._pattern = None

    def __bool__(self):
        return self._pattern is not None

    def split(self, text: str) -> List[Union[str, AddedToken]]:
        if self._pattern is None:
            return [text] if text else []
        out: List[Union[str, AddedToken]] = []
        pos = 0
        strip_next = False
        for m in self._pattern.finditer(text):
            token = self._by_content[m.group(0)]
            chunk = text[pos:m.start()]
            if strip_next:
                chunk = chunk.lstrip()
            if token.lstrip:
                chunk = chunk.rstrip()
            if chunk:
                out.append(chunk)
            out.append(token)
            strip_next = token.rstrip
            pos = m.end()
        chunk = text[pos:]
        if strip_next:
            chunk = chunk.lstrip()
        if chunk:
            out.append(chunk)
        return out

