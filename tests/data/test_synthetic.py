"""Synthetic Tülu-format data: deterministic, valid, correct answers, held-out eval pairs."""

from __future__ import annotations

import re

from tulu3.data import synthetic
from tulu3.data.examples import tokenize_dpo, tokenize_rlvr, tokenize_sft
from tulu3.data.loading import read_rows

ADD = re.compile(r"What is (\d+) \+ (\d+)\?")


def _check_answer(prompt: str, answer: str) -> None:
    if m := ADD.fullmatch(prompt):
        a, b = map(int, m.groups())
        assert answer == f"{a} + {b} = {a + b}. The answer is {a + b}."
        assert not synthetic.is_eval_pair(a, b)
    elif prompt.startswith("Count to "):
        n = int(prompt[len("Count to "):-1])
        assert answer.split() == [str(i) for i in range(1, n + 1)]
    else:
        words = prompt.split(": ", 1)[1].split()
        assert answer.split() == words[::-1]


def test_deterministic():
    assert synthetic.sft_rows(30, seed=1) == synthetic.sft_rows(30, seed=1)
    assert synthetic.sft_rows(30, seed=1) != synthetic.sft_rows(30, seed=2)
    assert synthetic.dpo_rows(10) == synthetic.dpo_rows(10)
    assert synthetic.eval_rows(10) == synthetic.eval_rows(10)


def test_sft_rows_are_valid_and_correct(tok):
    rows = synthetic.sft_rows(200)
    assert any(r["messages"][0]["role"] == "system" for r in rows)
    assert any(sum(m["role"] == "assistant" for m in r["messages"]) == 2 for r in rows)
    for row in rows:
        assert tokenize_sft(row, tok, 256) is not None
        turns = [m for m in row["messages"] if m["role"] != "system"]
        for user, bot in zip(turns[::2], turns[1::2]):
            _check_answer(user["content"], bot["content"])


def test_dpo_rows_prefer_the_correct_answer(tok):
    for row in synthetic.dpo_rows(100):
        _check_answer(row["prompt"], row["chosen"][-1]["content"])
        assert row["rejected"][-1]["content"] != row["chosen"][-1]["content"]
        assert row["chosen"][:-1] == row["rejected"][:-1]
        assert tokenize_dpo(row, tok, 256) is not None


def test_rm_rows_single_digit_sums(tok):
    """rm_rows: dpo_rows' tasks with operands 0..9, a wrong sum in 0..18, never negative; the
    held-out split's additions are exactly the operand pairs the training split never has."""
    rows = synthetic.rm_rows(300)
    held = synthetic.rm_rows(300, held_out=True)
    assert rows == synthetic.rm_rows(300) and rows != synthetic.rm_rows(300, seed=1)
    assert {r["source"] for r in rows} == {"synthetic_add", "synthetic_count",
                                          "synthetic_reverse"}
    train_pairs, held_pairs = ({tuple(map(int, m.groups())) for r in split
                                if (m := ADD.fullmatch(r["prompt"]))}
                               for split in (synthetic.rm_rows(1500), held))
    assert held_pairs == synthetic.SMALL_HELD_OUT and len(train_pairs) == 90
    assert not train_pairs & held_pairs
    for row in rows + held:
        chosen, rejected = row["chosen"][-1]["content"], row["rejected"][-1]["content"]
        assert chosen != rejected and row["chosen"][:-1] == row["rejected"][:-1]
        assert tokenize_dpo(row, tok, 256) is not None
        if not (m := ADD.fullmatch(row["prompt"])):
            _check_answer(row["prompt"], chosen)
            continue
        a, b = map(int, m.groups())
        assert 0 <= a <= 9 and 0 <= b <= 9
        assert chosen == f"{a} + {b} = {a + b}. The answer is {a + b}."
        wrong = int(rejected.rsplit(" ", 1)[1].rstrip("."))
        assert 0 <= wrong <= 18 and wrong != a + b
        assert rejected == f"{a} + {b} = {wrong}. The answer is {wrong}."


def test_rlvr_and_eval_rows(tok):
    train = synthetic.rlvr_rows(100)
    held = synthetic.eval_rows(50)
    for row, held_out in [(r, False) for r in train] + [(r, True) for r in held]:
        a, b = map(int, ADD.fullmatch(row["messages"][0]["content"]).groups())
        assert row["ground_truth"] == str(a + b) and row["dataset"] == "gsm8k"
        assert synthetic.is_eval_pair(a, b) == held_out
        assert tokenize_rlvr(row, tok, 64) is not None


def test_write_splits(tmp_path):
    paths = synthetic.write_splits(tmp_path, n_sft=5, n_dpo=4, n_rlvr=3, n_eval=2)
    counts = {name: len(list(read_rows(p))) for name, p in paths.items()}
    assert counts == {"sft": 5, "dpo": 4, "rlvr": 3, "eval": 2}
