"""python -m tulu3.curate: decontamination (Tülu 3's 8-gram rule), dedup, mix, stats."""

from __future__ import annotations

import json
import subprocess
import sys

from tulu3.data import curate, synthetic
from tulu3.data.loading import read_rows, write_jsonl

EVAL_Q = ("Natalia sold clips to 48 of her friends in April and then she sold half as many "
          "clips in May. How many clips did Natalia sell altogether in April and May?")
OTHER_Q = ("Weng earns 12 dollars an hour for babysitting and yesterday she just did 50 minutes "
           "of babysitting. How much did she earn?")


def _user(text):
    return {"role": "user", "content": text}


def _chat(question, answer="ok"):
    return {"messages": [_user(question), {"role": "assistant", "content": answer}]}


def test_decontaminate_removes_planted_row_and_reports(tmp_path):
    train = synthetic.sft_rows(300, seed=4)
    planted = _chat("Please solve this. " + EVAL_Q.upper() + " Think step by step.")
    train.insert(123, planted)
    train_path = write_jsonl(train, tmp_path / "train.jsonl")
    gsm = write_jsonl([{"question": EVAL_Q}, {"question": OTHER_Q}], tmp_path / "gsm8k.jsonl")
    math = write_jsonl([{"messages": [_user("What is the sum of the first ten primes, "
                                            "counted one by one from two?")]}],
                       tmp_path / "math.jsonl")
    out = tmp_path / "clean.jsonl"
    report = curate.main(["decontaminate", "--train", train_path, "--eval", gsm, math,
                          "--out", str(out)])
    kept = [row for row, _ in read_rows(out)]
    assert len(kept) == 300 and planted not in kept
    assert report["removed_rows"] == 1
    gsm_report = report["eval_sets"]["gsm8k.jsonl"]
    assert gsm_report["overlapping"] == 1 and gsm_report["overlap_frac"] == 0.5
    assert gsm_report["contaminated"] is True
    assert gsm_report["examples"] == [{"eval_row": 0, "train_rows": [123]}]
    assert report["eval_sets"]["math.jsonl"]["overlapping"] == 0


def test_overlap_threshold_is_more_than_half_of_the_eval_words():
    words = EVAL_Q.split()  # 29 words
    evals = {"e": [{"question": EVAL_Q}]}
    for share, expected in ((0.45, []), (0.62, [0])):
        n = int(len(words) * share)
        removed, _ = curate.decontaminate([_chat(" ".join(words[:n]))], evals, n=8)
        assert removed == expected, share
    # Covered by n-grams from two different training rows is not an overlap with either.
    rows = [_chat(" ".join(words[:13])), _chat(" ".join(words[11:24]))]  # 45% each, 83% both
    assert curate.decontaminate(rows, evals, n=8)[0] == []
    assert curate.decontaminate(rows + [_chat(" ".join(words[:16]))], evals)[0] == [2]
    # Answers are not compared by default (prompt side only), but are with train_field="all".
    answer_row = _chat("unrelated question", answer=EVAL_Q)
    assert curate.decontaminate([answer_row], evals)[0] == []
    assert curate.decontaminate([answer_row], evals, train_field="all")[0] == [0]


def test_dedup_and_mix(tmp_path):
    rows = [_chat("a"), _chat("b"), _chat("a"), {**_chat("b"), "id": "other"}]
    src = write_jsonl(rows, tmp_path / "rows.jsonl")
    out = tmp_path / "dedup.jsonl"
    result = curate.main(["dedup", "--input", src, "--out", str(out)])
    assert result["duplicates"] == 2 and [r for r, _ in read_rows(out)] == rows[:2]
    more = write_jsonl([_chat(str(i)) for i in range(10)], tmp_path / "more.jsonl")
    mixed = tmp_path / "mix.jsonl"
    result = curate.main(["mix", "--source", f"{src}:2", f"{more}:0.5", "--out", str(mixed),
                          "--seed", "3"])
    assert result["rows"] == 7 and len(list(read_rows(mixed))) == 7
    assert curate.parse_source("x.jsonl") == {"path": "x.jsonl"}


def test_stats_with_tokenizer_and_png(tmp_path, tiktoken_path):
    src = write_jsonl(synthetic.sft_rows(40), tmp_path / "sft.jsonl")
    png = tmp_path / "hist.png"
    result = curate.main(["stats", "--input", src, "--tokenizer", tiktoken_path, "--png",
                          str(png), "--max-len", "30"])
    assert result["rows"] == 40 and result["unit"] == "tokens"
    assert result["total"] > 40 * 10 and 0 < result["over_max_len"] < 40
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    words = curate.main(["stats", "--input", src])
    assert words["unit"] == "words" and words["total"] < result["total"]


def test_module_entry_point(tmp_path):
    src = write_jsonl([_chat("x"), _chat("x")], tmp_path / "r.jsonl")
    proc = subprocess.run([sys.executable, "-m", "tulu3.curate", "dedup", "--input", src,
                           "--out", str(tmp_path / "o.jsonl")], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["kept"] == 1
