"""SFT / DPO / RLVR examples from rows, truncation, and every bad-row case (file and line)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from tulu3.data.chat_template import generation_prompt_ids, tokenize_conversation
from tulu3.data.dataset import build_dataset
from tulu3.data.examples import (
    IGNORE,
    RowError,
    num_trained,
    tokenize_dpo,
    tokenize_rlvr,
    tokenize_sft,
)

EOS = "<|end_of_text|>"
SFT_ROW = {"messages": [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Count to 3."},
                        {"role": "assistant", "content": "1 2 3"},
                        {"role": "user", "content": "Reverse these words: sun cat"},
                        {"role": "assistant", "content": "cat sun"}]}


def _user(text):
    return {"role": "user", "content": text}


def _bot(text):
    return {"role": "assistant", "content": text}


def test_sft_labels_aligned_and_masked(tok):
    ex = tokenize_sft(SFT_ROW, tok, max_len=512)
    ids, mask = tokenize_conversation(SFT_ROW["messages"], tok)
    assert ex.input_ids == ids
    assert ex.labels == [t if m else IGNORE for t, m in zip(ids, mask)]
    assert tok.decode([t for t in ex.labels if t != IGNORE]) == f"1 2 3{EOS}cat sun{EOS}"
    assert num_trained(ex) == sum(mask)


def test_sft_truncation_keeps_start_and_drops_untrainable(tok):
    full = tokenize_sft(SFT_ROW, tok, max_len=512)
    first_trained = next(i for i, label in enumerate(full.labels) if label != IGNORE)
    cut = tokenize_sft(SFT_ROW, tok, max_len=first_trained + 2)
    assert cut.input_ids == full.input_ids[:first_trained + 2] and num_trained(cut) == 2
    stats = Counter()
    assert tokenize_sft(SFT_ROW, tok, max_len=first_trained, stats=stats) is None
    assert stats["dropped_no_trained_tokens"] == 1
    no_bos = tokenize_sft(SFT_ROW, tok, max_len=512, add_bos=False)
    assert no_bos.input_ids == full.input_ids[1:]


def test_dpo_shared_prompt_and_exact_replies(tok):
    prompt = [{"role": "system", "content": "Be brief."}, _user("What is 2 + 3?")]
    row = {"chosen": prompt + [_bot("2 + 3 = 5. The answer is 5.")],
           "rejected": prompt + [_bot("2 + 3 = 6. The answer is 6.")]}
    ex = tokenize_dpo(row, tok, max_len=512)
    assert ex.prompt_ids == generation_prompt_ids(prompt, tok)
    for reply, conv in ((ex.chosen_ids, row["chosen"]), (ex.rejected_ids, row["rejected"])):
        assert ex.prompt_ids + reply == tokenize_conversation(conv, tok)[0]  # same ids as SFT
        assert reply[-1] == tok.eos_id
    assert tok.decode(ex.chosen_ids) == f"2 + 3 = 5. The answer is 5.{EOS}"


def test_dpo_reply_crossing_the_prompt_boundary_keeps_prompt_shared(tok):
    """A reply starting with blank lines merges into the header token; the prompt ids must still be
    the same for both replies (the reply is then tokenized on its own)."""
    row = {"chosen": [_user("Hi"), _bot("\n\nParagraph one.")],
           "rejected": [_user("Hi"), _bot("Paragraph one.")]}
    ex = tokenize_dpo(row, tok, max_len=512)
    assert ex.prompt_ids == generation_prompt_ids([_user("Hi")], tok)
    assert tok.decode(ex.chosen_ids) == f"\n\nParagraph one.{EOS}"
    assert tok.decode(ex.rejected_ids) == f"Paragraph one.{EOS}"


def test_dpo_truncation(tok):
    row = {"chosen": [_user("Count to 9."), _bot("1 2 3 4 5 6 7 8 9")],
           "rejected": [_user("Count to 9."), _bot("1 2 3")]}
    full = tokenize_dpo(row, tok, max_len=512)
    n = len(full.prompt_ids)
    cut = tokenize_dpo(row, tok, max_len=n + 3)
    assert cut.prompt_ids == full.prompt_ids
    assert cut.chosen_ids == full.chosen_ids[:3]
    assert cut.rejected_ids == full.rejected_ids[:3]
    stats = Counter()
    assert tokenize_dpo(row, tok, max_len=n, stats=stats) is None
    assert stats["dropped_prompt_too_long"] == 1


def test_rlvr_prompt(tok):
    row = {"messages": [_user("What is 12 + 30?")], "ground_truth": "42", "dataset": "gsm8k"}
    p = tokenize_rlvr(row, tok, max_len=512)
    assert p.prompt_ids == generation_prompt_ids(row["messages"], tok)
    assert tok.decode(p.prompt_ids).endswith("<|assistant|>\n")
    assert (p.ground_truth, p.dataset, p.messages) == ("42", "gsm8k", row["messages"])
    assert tokenize_rlvr({**row, "ground_truth": 42}, tok, 512).ground_truth == "42"
    ifeval = {"messages": row["messages"], "dataset": "ifeval",
              "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    truth = json.loads(tokenize_rlvr(ifeval, tok, 512).ground_truth)
    assert truth == {"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    stats = Counter()
    assert tokenize_rlvr(row, tok, max_len=len(p.prompt_ids) - 1, stats=stats) is None
    assert stats["dropped_prompt_too_long"] == 1


GOOD_SFT = {"messages": [_user("Count to 2."), _bot("1 2")]}
GOOD_DPO = {"chosen": [_user("Hi"), _bot("Hello")], "rejected": [_user("Hi"), _bot("Go away")]}
GOOD_RLVR = {"messages": [_user("What is 1 + 1?")], "ground_truth": "2", "dataset": "gsm8k"}
BAD_ROWS = [
    ("sft", '{"conversation": []}', "'messages' must be a non-empty list"),
    ("sft", json.dumps({"messages": [{"role": "human", "content": "hi"}, _bot("x")]}),
     "role 'human'"),
    ("sft", json.dumps({"messages": [_user("  "), _bot("x")]}), "empty content"),
    ("sft", json.dumps({"messages": [_user("hi"), {"role": "assistant", "content": ["x"]}]}),
     "content must be a string, got list"),
    ("sft", json.dumps({"messages": [_user("hi")]}), "no assistant message"),
    ("sft", '{"messages": [{"role": "user", "content": "hi"}', "bad JSON"),
    ("sft", "[1, 2]", "row must be a JSON object"),
    ("dpo", json.dumps({"chosen": [_user("Hi"), _bot("a")], "rejected": [_user("Yo"), _bot("b")]}),
     "different prompts"),
    ("dpo", json.dumps({"chosen": [_user("Hi"), _bot("a")]}), "'rejected' must be a non-empty"),
    ("dpo", json.dumps({"chosen": [_user("Hi"), _bot("a")], "rejected": [_user("Hi")]}),
     "'rejected' must end with an assistant message"),
    ("rlvr", json.dumps({"messages": [_user("What is 1 + 1?")], "dataset": "gsm8k"}),
     "ground_truth"),
    ("rlvr", json.dumps({**GOOD_RLVR, "messages": [_user("q"), _bot("a")]}),
     "must end with a user message"),
    ("rlvr", json.dumps({**GOOD_RLVR, "dataset": None}), "'dataset' name"),
]


@pytest.mark.parametrize("kind,bad,problem", BAD_ROWS, ids=[f"{k}:{p}" for k, _, p in BAD_ROWS])
def test_bad_row_names_file_and_line_or_is_skipped(tok, tmp_path, kind, bad, problem):
    good = json.dumps({"sft": GOOD_SFT, "dpo": GOOD_DPO, "rlvr": GOOD_RLVR}[kind])
    path = tmp_path / "train.jsonl"
    path.write_text(f"{good}\n{good}\n{bad}\n{good}\n")
    with pytest.raises(RowError) as err:
        build_dataset(kind, str(path), tok, max_len=256)
    assert str(err.value).startswith(f"{path}:3: ") and problem in str(err.value)
    ds = build_dataset(kind, str(path), tok, max_len=256, skip_bad_rows=True)
    assert len(ds) == 3 and ds.meta["stats"]["bad_rows"] == 1


def test_bad_row_in_json_array_names_its_line(tok, tmp_path):
    path = tmp_path / "train.json"
    path.write_text("[\n" + json.dumps(GOOD_SFT) + ",\n\n"
                    + json.dumps({"messages": [_user("hi"), _bot("")]}) + "\n]\n")
    with pytest.raises(RowError, match=rf"{path}:4: .*empty content"):
        build_dataset("sft", str(path), tok, max_len=256)
