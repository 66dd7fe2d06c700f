"""TokenizerSpec: what a model file says about its tokenizer, for load(spec) to build it."""
from dataclasses import dataclass
from typing import Optional


@dataclass
class TokenizerSpec:
    """How to build the tokenizer: qinfer.tokenizer.load(spec). Model readers make one."""
    kind: str                          # "sentencepiece_file" | "hf_json" | "gguf"
    path: Optional[str] = None         # tokenizer.model or tokenizer.json
    gguf_metadata: Optional[dict] = None   # tokenizer.ggml.* keys, arrays as lists
    config: Optional[dict] = None      # tokenizer_config.json contents, if any
