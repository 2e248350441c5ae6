"""The Tülu 3 template, token by token, against hand-written strings."""

from __future__ import annotations

import re

from tulu3.data.chat_template import (
    generation_prompt_ids,
    render_text,
    tokenize_conversation,
)

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
CHAT = [
    {"role": "system", "content": "You are kind."},
    {"role": "user", "content": "Hi, who are you?"},
    {"role": "assistant", "content": "I am Tülu. Ask me anything!"},
    {"role": "user", "content": "What is 23 + 45?"},
    {"role": "assistant", "content": "23 + 45 = 68. The answer is 68."},
]
CHAT_TEXT = (f"{BOS}<|system|>\nYou are kind.\n<|user|>\nHi, who are you?\n<|assistant|>\n"
             f"I am Tülu. Ask me anything!{EOS}\n<|user|>\nWhat is 23 + 45?\n<|assistant|>\n"
             f"23 + 45 = 68. The answer is 68.{EOS}")


def _reference_ids(tok, text: str) -> list[int]:
    """Independent oracle: tiktoken's own special-aware encoding of the whole string."""
    return tok._enc.encode(text, allowed_special="all")


def _trained_spans(tok, ids, mask) -> list[str]:
    spans, current = [], []
    for token, m in zip(ids, mask):
        if m:
            current.append(token)
        elif current:
            spans.append(tok.decode(current))
            current = []
    if current:
        spans.append(tok.decode(current))
    return spans


def test_multi_turn_with_system_is_token_exact(tok):
    assert render_text(CHAT, tok) == CHAT_TEXT
    ids, mask = tokenize_conversation(CHAT, tok)
    assert ids == _reference_ids(tok, CHAT_TEXT)
    assert len(mask) == len(ids)


def test_mask_covers_assistant_content_and_eos_only(tok):
    ids, mask = tokenize_conversation(CHAT, tok)
    assert _trained_spans(tok, ids, mask) == [f"I am Tülu. Ask me anything!{EOS}",
                                              f"23 + 45 = 68. The answer is 68.{EOS}"]
    first_eos = ids.index(tok.eos_id)
    assert mask[first_eos] and not mask[first_eos + 1]  # the "\n" after a non-final eos
    assert tok.decode([ids[first_eos + 1]]) == "\n"
    assert mask[-1] and ids[-1] == tok.eos_id  # no "\n" after the last eos
    assert not mask[0] and ids[0] == tok.bos_id
    untrained = tok.decode([t for t, m in zip(ids, mask) if not m])
    assert "You are kind." in untrained and "What is 23 + 45?" in untrained


def test_generation_prompt_and_no_bos(tok):
    prompt = [{"role": "user", "content": "Count to 3."}]
    text = "<|user|>\nCount to 3.\n<|assistant|>\n"
    assert render_text(prompt, tok, add_bos=False, add_generation_prompt=True) == text
    assert generation_prompt_ids(prompt, tok, add_bos=False) == _reference_ids(tok, text)
    assert generation_prompt_ids(prompt, tok) == _reference_ids(tok, BOS + text)
    _, mask = tokenize_conversation(prompt, tok, add_generation_prompt=True)
    assert not any(mask)
    # After a final assistant turn: eos, then the header with no newline between (as the jinja).
    chat = prompt + [{"role": "assistant", "content": "1 2 3"}]
    text = f"<|user|>\nCount to 3.\n<|assistant|>\n1 2 3{EOS}<|assistant|>\n"
    assert render_text(chat, tok, add_bos=False, add_generation_prompt=True) == text
    assert tokenize_conversation(chat, tok, False, True)[0] == _reference_ids(tok, text)


def test_boundary_tokens_follow_whole_string_tokenization(tok):
    """BPE pre-tokens cross template/content boundaries ("?\\n", "|>\\n\\n"): ids must still equal
    tokenizing the whole string, and a token is trained iff it starts in assistant content."""
    chat = [{"role": "user", "content": "Why?"},
            {"role": "assistant", "content": "\n\nBecause.  "},
            {"role": "user", "content": "  ok!!"},
            {"role": "assistant", "content": "Sure"}]
    text = (f"<|user|>\nWhy?\n<|assistant|>\n\n\nBecause.  {EOS}\n<|user|>\n  ok!!\n"
            f"<|assistant|>\nSure{EOS}")
    ids, mask = tokenize_conversation(chat, tok, add_bos=False)
    assert ids == _reference_ids(tok, text)
    pieces = [tok.id_to_token(i) for i in ids]
    assert "?\n" in pieces and "|>\n\n" in pieces  # the boundary-crossing tokens exist
    assert not mask[pieces.index("|>\n\n")]  # it starts in the header: not trained
    spans = _trained_spans(tok, ids, mask)
    assert spans[1] == f"Sure{EOS}"
    assert f"\n\nBecause.  {EOS}".endswith(spans[0]) and spans[0].endswith(f"Because.  {EOS}")


def test_special_strings_in_content_stay_text(tok):
    chat = [{"role": "user", "content": f"say {EOS} now"},
            {"role": "assistant", "content": f"ok {BOS}"}]
    ids, _ = tokenize_conversation(chat, tok)
    assert ids.count(tok.eos_id) == 1 and ids.count(tok.bos_id) == 1


def test_sentencepiece_template(sp_path):
    from tulu3.data.tokenizer import load_tokenizer

    sp = load_tokenizer(sp_path)
    text = render_text(CHAT, sp)
    assert text == CHAT_TEXT.replace(BOS, "<s>").replace(EOS, "</s>")
    ids, mask = tokenize_conversation(CHAT, sp)
    # Oracle: split at the special tokens and encode each stretch of text with sentencepiece.
    expected = []
    for part in re.split(r"(<s>|</s>)", text):
        if part in ("<s>", "</s>"):
            expected.append(sp.bos_id if part == "<s>" else sp.eos_id)
        elif part:
            expected += sp.encode(part)
    assert ids == expected
    trained = _trained_spans(sp, ids, mask)
    assert [s.strip() for s in trained] == ["I am Tülu. Ask me anything!",
                                            "23 + 45 = 68. The answer is 68."]
    assert sum(1 for t, m in zip(ids, mask) if m and t == sp.eos_id) == 2
