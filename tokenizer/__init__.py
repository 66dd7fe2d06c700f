"""qinfer.tokenizer: SentencePiece and byte-level BPE tokenizers (knows nothing of models)."""
