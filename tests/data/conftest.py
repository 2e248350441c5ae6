"""Tiny tokenizers built from scratch once per session (no downloads)."""

from __future__ import annotations

import pytest

from tulu3.data.synthetic import tokenizer_corpus
from tulu3.data.tokenizer import Tokenizer, build_tiny_tiktoken, load_tokenizer

EXTRA_TEXT = [
    "Hello there! How are you today? I am fine, thanks.",
    "What is the capital of France? The capital of France is Paris.",
    "Write a haiku about the sea.\nWaves fold into foam,\nthe tide keeps its quiet time.",
    "Ünïcödé tëxt: naïve café, 東京, emoji 🙂 and tabs\tand  double  spaces.",
    # Teaches a merge across the header/content boundary ("|>\n\n"), which tests exercise.
] + ["<|assistant|>\n\nParagraph one."] * 12


@pytest.fixture(scope="session")
def tiktoken_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return build_tiny_tiktoken(str(path), tokenizer_corpus(200) + EXTRA_TEXT * 5, num_merges=300)


@pytest.fixture(scope="session")
def tok(tiktoken_path) -> Tokenizer:
    return load_tokenizer(tiktoken_path)


@pytest.fixture(scope="session")
def sp_path(tmp_path_factory) -> str:
    import sentencepiece as spm

    out = tmp_path_factory.mktemp("sp")
    corpus = out / "corpus.txt"
    lines = [t.replace("\n", " ") for t in tokenizer_corpus(300) + EXTRA_TEXT * 5]
    corpus.write_text("\n".join(lines) + "\n")
    # Llama 2 style: BPE, byte fallback, no normalisation, bos=1 eos=2.
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out / "sp"), vocab_size=400, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
        num_threads=1)
    return str(out / "sp.model")
