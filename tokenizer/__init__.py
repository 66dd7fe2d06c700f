"""qinfer.tokenizer: SentencePiece and byte-level BPE tokenizers (knows nothing of models).

    from qinfer.tokenizer import load, from_hf_dir
    tok = load(source.tokenizer)            # a TokenizerSpec (a model reader's, or TokenizerSpec(kind, path))
    ids = tok.encode("<|im_start|>user\\nHi<|im_end|>\\n", add_bos=tok.add_bos_default)
    stream = tok.decoder()
    text = "".join(stream.push(i) for i in generated) + stream.flush()

Modules: base (the Tokenizer interface), sentencepiece_tokenizer and
spm_proto (SentencePiece, from tokenizer.model or a GGUF "llama"
vocabulary), bpe, bpe_gguf, hf_json and pretokenizers (byte-level BPE via
`tokenizers`), streaming and utf8 (incremental decoding), factory (load),
spec (TokenizerSpec), jsonfile (strict JSON parsing). It imports nothing of qinfer: errors.py is its own base
(qinfer/errors.py makes its errors QinferErrors too).
"""
from .base import Tokenizer
from .bpe import BPETokenizer
from .errors import TokenizerError
from .factory import from_gguf_metadata, from_hf_dir, hf_dir_spec, load, sentencepiece_file
from .sentencepiece_tokenizer import SentencePieceTokenizer
from .spec import TokenizerSpec
from .specials import AddedToken
from .streaming import IncrementalDecoder

__all__ = ["Tokenizer", "SentencePieceTokenizer", "BPETokenizer", "IncrementalDecoder",
           "AddedToken", "TokenizerError", "TokenizerSpec", "load", "from_hf_dir", "from_gguf_metadata",
           "hf_dir_spec", "sentencepiece_file"]
