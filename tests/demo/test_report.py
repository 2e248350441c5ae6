"""The demo report explains each stage's effect on the verifiable task from the run's own
numbers (one process, no training: fake run directories)."""

from __future__ import annotations

import json
from pathlib import Path

from tulu3.demo.report import answer_styles, write_report


def _reply(text: str, truth: int) -> dict:
    return {"response": text, "ground_truth": str(truth)}


def _stage(out: Path, name: str, records: list[dict], replies: list[dict]) -> dict:
    run_dir = out / name
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    correct = sum("The answer is" in r["response"] and not r["response"].startswith("The")
                  for r in replies)
    return {"stage": name, "run_dir": str(run_dir), "layout": "tp2pp2", "seconds": 1.0,
            "checkpoint": "ckpt", "eval": {"summary": {"all": {"accuracy": correct / 4}},
                                           "samples": replies}}


def test_styles_and_dpo_explanation(tmp_path: Path) -> None:
    sft_replies = [_reply("1 + 2 = 3. The answer is 3.", 3),
                   _reply("2 + 2 = 4. The answer is 4.", 4),
                   _reply("The answer is 5 = 1 + 4.", 5), _reply("7", 7)]
    dpo_replies = [_reply("1 + 2 = 3. The answer is 3.", 3),
                   _reply("The answer is 4 = 2 + 2.", 4),
                   _reply("The answer is 6 = 1 + 4.", 5), _reply("The answer is 7 = 3 + 4.", 7)]
    assert answer_styles({"samples": dpo_replies}) == {
        "verified": 1, "answer_first": 3, "other": 0, "answer_first_right": 2}
    stages = [
        _stage(tmp_path, "sft", [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}],
               sft_replies),
        _stage(tmp_path, "dpo", [{"step": 1, "loss": 0.7, "rewards/chosen": -0.5,
                                  "rewards/rejected": -0.9}], dpo_replies),
    ]
    report = write_report(tmp_path, stages, {"removed_rows": 3, "train_rows": 10,
                                             "planted": 3, "planted_removed": 3},
                          {"skipped": "no transformers"}, 60.0).read_text()
    assert "rewards/chosen = -0.5 and rewards/rejected = -0.9" in report
    assert "both lost probability" in report
    assert ("Replies in the verified style: 2 after SFT, 1 after DPO (of 4); answer-first "
            "replies after DPO: 3, 2 of them with the right sum") in report
    assert "| sft | 0.5 | 2 of 4 |" in report and "| dpo | 0.25 | 1 of 4 |" in report
    assert "DPO trains on other preference pairs" in report and "SFT teaches the sums" in report
