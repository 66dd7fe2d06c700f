"""The tokenizer files of a checkpoint, from whatever the source model carried.

A Hugging Face source: its tokenizer files are copied as they are. A GGUF
source: the vocabulary in its metadata is written as the Hugging Face files
that say the same thing, so the checkpoint is an ordinary Hugging Face
directory:

  tokenizer.ggml.model "gpt2"   -> tokenizer.json (the byte-level BPE pipeline
                                   qinfer builds from the GGUF: vocabulary,
                                   merges, pre-tokenizer, added tokens)
  tokenizer.ggml.model "llama"  -> tokenizer.model (the SentencePiece model
                                   proto built from pieces, scores and types)
  both                          -> tokenizer_config.json: bos/eos tokens, add_bos_token, the control tokens
                                   as added_tokens_decoder, chat_template

The end-of-turn/end-of-message ids (EOT/EOM) go into config.json's
eos_token_id list, where the Hugging Face reader picks them up.
"""
import json
import os

from ..errors import QinferError

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                      "added_tokens.json", "chat_template.jinja", "generation_config.json")


def tokenizer_files(source, max_length=None):
    """{file name: bytes} to write next to the weights."""
    spec = source.tokenizer
    if spec is None:
        raise QinferError(f"{source.path}: the model has no tokenizer to write into the checkpoint")
    if spec.kind in ("hf_json", "sentencepiece_file"):
        directory = os.path.dirname(spec.path)
        files = {}
        for name in HF_TOKENIZER_FILES:
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    files[name] = f.read()
        return files
    if spec.kind == "gguf":
        return _from_gguf(spec.gguf_metadata, source.chat_template, max_length)
    raise QinferError(f"{source.path}: cannot write a tokenizer of kind {spec.kind!r}")


def _from_gguf(meta, chat_template, max_length):
    from qinfer.tokenizer import gguf_metadata as gm

    model = gm.require(meta, gm.MODEL)
    tokens = gm.string_list(meta, gm.TOKENS)
    n = len(tokens)
    types = gm.number_list(meta, gm.TOKEN_TYPE, n, int, default=gm.NORMAL)
    files = {}
    config = {}
    if model == "gpt2":
        from qinfer.tokenizer.bpe_gguf import bpe_from_gguf

        backend = bpe_from_gguf(meta).backend
        files["tokenizer.json"] = backend.to_str(pretty=True).encode("utf-8")
        added = {int(i): t for i, t in backend.get_added_tokens_decoder().items()}
        config["added_tokens_decoder"] = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "rstrip": t.rstrip, "normalized": t.normalized,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(added.items())}
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        add_bos = gm.flag(meta, gm.ADD_BOS, False)
    elif model == "llama":
        from qinfer.tokenizer.spm_proto import model_proto_from_gguf

        files["tokenizer.model"] = model_proto_from_gguf(meta)
        config["added_tokens_decoder"] = {
            str(i): {"content": tokens[i], "lstrip": False, "rstrip": False, "normalized": False,
                     "single_word": False, "special": True}
            for i in range(n) if types[i] == gm.CONTROL and tokens[i]}
        config["tokenizer_class"] = "LlamaTokenizer"
        add_bos = gm.flag(meta, gm.ADD_BOS, True)
    else:
        raise QinferError(f"cannot write a tokenizer for GGUF tokenizer model {model!r}")
    # Only BOS and EOS are named: a named token is matched whole in text, so
    # naming e.g. a plain padding token would change how text is split.
    for key, gguf_key in (("bos_token", gm.BOS_ID), ("eos_token", gm.EOS_ID)):
        i = gm.token_id(meta, gguf_key, n)
        if i is not None:
            config[key] = tokens[i]
    config["add_bos_token"] = add_bos
    config["add_eos_token"] = False
    config["clean_up_tokenization_spaces"] = False
    if max_length:
        config["model_max_length"] = max_length
    if chat_template is not None:
        config["chat_template"] = chat_template
    files["tokenizer_config.json"] = json.dumps(config, indent=2, ensure_ascii=False).encode("utf-8")
    return files
