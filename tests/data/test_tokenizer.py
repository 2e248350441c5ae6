"""Tokenizer loading: Llama 3 tiktoken files, HF tokenizer.json, sentencepiece, directories."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from tulu3.data.tokenizer import (
    build_tiny_tiktoken,
    llama3_special_tokens,
    load_tokenizer,
    train_bpe,
)

TEXTS = ["Hello there! What is 23 + 45?\n", "Ünïcödé naïve café 東京 🙂\tand  spaces  ",
         "<|user|>\nReverse these words: sun cat\n<|assistant|>\ncat sun", ""]


def _num_base(tok) -> int:
    return tok.vocab_size - 256


def test_llama3_special_tokens_at_meta_offsets(tok):
    base = _num_base(tok)
    assert base > 256  # the byte tokens plus learned merges
    expected = {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "<|reserved_special_token_0|>": 2,
                "<|finetune_right_pad_id|>": 4, "<|start_header_id|>": 6,
                "<|end_header_id|>": 7, "<|eom_id|>": 8, "<|eot_id|>": 9, "<|python_tag|>": 10,
                "<|reserved_special_token_3|>": 11, "<|reserved_special_token_247|>": 255}
    for name, offset in expected.items():
        assert tok.token_to_id(name) == base + offset, name
    assert len(set(llama3_special_tokens())) == 256
    assert tok.bos_id == base and tok.eos_id == base + 1  # Tülu 3: eos = <|end_of_text|>
    assert tok.pad_id == base + 4


def test_overrides_and_unknown_token(tiktoken_path, tok):
    other = load_tokenizer(tiktoken_path, eos="<|eot_id|>", pad="<|end_of_text|>")
    assert other.eos_id == tok.token_to_id("<|eot_id|>")
    assert other.pad_id == tok.eos_id
    assert other.name != tok.name  # a cache built with one eos must not serve the other
    with pytest.raises(ValueError, match="not in the tokenizer"):
        load_tokenizer(tiktoken_path, eos="<|nope|>")


def test_encode_decode_and_offsets(tok):
    for text in TEXTS:
        ids, starts = tok.encode_with_offsets(text)
        assert ids.dtype == starts.dtype == np.int64
        ids = ids.tolist()
        assert ids == tok.encode(text)
        assert tok.decode(ids) == text
        data = text.encode("utf-8")
        pieces = [tok._enc.decode_single_token_bytes(i) for i in ids]
        assert b"".join(pieces) == data
        assert starts.tolist() == np.cumsum([0] + [len(p) for p in pieces])[:-1].tolist()
    # Special-token strings inside text stay text: no eos can be injected by content.
    ids = tok.encode("<|end_of_text|>")
    assert tok.eos_id not in ids and tok.decode(ids) == "<|end_of_text|>"


def test_bpe_learns_frequent_words_first():
    merged = train_bpe(["abab abab abab", "cd"], num_merges=3)
    assert merged[0] == b"ab" and merged[1] == b"abab"
    assert train_bpe(["abab abab abab", "cd"], 3) == merged  # deterministic


def test_name_is_stable_and_content_keyed(tiktoken_path, tok, tmp_path):
    assert load_tokenizer(tiktoken_path).name == tok.name
    other = build_tiny_tiktoken(str(tmp_path / "other.model"), ["completely different text"], 20)
    assert load_tokenizer(other).name != tok.name


def test_directory_layouts(tiktoken_path, tok, tmp_path):
    (tmp_path / "a").mkdir()
    shutil.copy(tiktoken_path, tmp_path / "a" / "tokenizer.model")
    (tmp_path / "b" / "original").mkdir(parents=True)
    shutil.copy(tiktoken_path, tmp_path / "b" / "original" / "tokenizer.model")
    for d in ("a", "b"):
        loaded = load_tokenizer(str(tmp_path / d))
        assert loaded.name == tok.name and loaded.encode(TEXTS[0]) == tok.encode(TEXTS[0])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer.model"):
        load_tokenizer(str(tmp_path / "empty"))


def test_bad_tiktoken_file_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_text("YQ== 0\nYg== 1\nnot-a-line\n")
    with pytest.raises(ValueError, match=r"bad.model:3"):
        load_tokenizer(str(bad))
    gap = tmp_path / "gap.model"
    gap.write_text("YQ== 0\nYg== 5\n")
    with pytest.raises(ValueError, match="without gaps"):
        load_tokenizer(str(gap))


def test_hf_tokenizer_json_matches_hf_tokenizers(tiktoken_path, tok, tmp_path, monkeypatch):
    """An independent BPE (HF tokenizers, converted from our file) must give the same ids, and our
    tokenizer.json loader must read it back to the same tokenizer; a Tülu-style <pad> is found."""
    pytest.importorskip("transformers")
    from transformers.convert_slow_tokenizer import TikTokenConverter

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken caches by path otherwise
    specials = llama3_special_tokens() + ["<pad>"]
    hf = TikTokenConverter(vocab_file=tiktoken_path, extra_special_tokens=specials).converted()
    hf.save(str(tmp_path / "tokenizer.json"))
    ours = load_tokenizer(str(tmp_path))
    assert ours.vocab_size == tok.vocab_size + 1
    assert ours.pad_id == tok.vocab_size  # <pad> after the 256 specials, as in Tülu 3's 128256
    assert ours.eos_id == tok.eos_id and ours.bos_id == tok.bos_id
    for text in TEXTS:
        expected = hf.encode(text, add_special_tokens=False).ids
        assert tok.encode(text) == expected
        assert ours.encode(text) == expected


def test_sentencepiece(sp_path, tmp_path):
    sp = load_tokenizer(sp_path)
    assert (sp.bos_id, sp.eos_id, sp.pad_id) == (1, 2, 2)  # no pad piece: pad falls back to eos
    assert sp.vocab_size == 400 and sp.name.startswith("sentencepiece-")
    for text in TEXTS[:3]:
        ids, starts = sp.encode_with_offsets(text)
        assert ids.tolist() == sp.encode(text) and sp.decode(ids) == text
        assert starts[0] == 0 and np.all(np.diff(starts) >= 0)
        assert starts[-1] < len(text.encode("utf-8"))
    assert load_tokenizer(sp_path, eos="<s>").eos_id == 1
    (tmp_path / "hf").mkdir()
    shutil.copy(sp_path, tmp_path / "hf" / "tokenizer.model")
    assert load_tokenizer(str(tmp_path / "hf")).name == sp.name
