"""``python -m tulu3.rewards score``, the RLVR reward and the summary helpers."""

import json
import math

import pytest

from tulu3.config import run_command
from tulu3.rewards import VerifyResult, register_verifier, rlvr_reward, verify
from tulu3.rewards.__main__ import main
from tulu3.rewards.base import as_result
from tulu3.rewards.summary import pass_at_k, pass_at_k_by_dataset, summarize

ROWS = [
    {"dataset": "gsm8k", "response": "so 72.", "ground_truth": "#### 72", "id": "a"},
    {"dataset": "MATH", "response": r"$\boxed{\frac12}$", "ground_truth": "0.5"},
    {"dataset": "math", "response": r"$\boxed{3}$", "ground_truth": "4"},
    {"dataset": "ifeval", "response": "hello", "ground_truth": {"func_name": "validate_lowercase"}},
    {"dataset": "gsm8k", "response": "so 72.", "ground_truth": "72", "has_eos": False},
]


def test_score_cli(tmp_path, capsys) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [json.dumps(r) for r in ROWS[:3]] + ["{broken", json.dumps({"dataset": "gsm8k"}),
                                                 json.dumps({**ROWS[0], "dataset": "chess"}),
                                                 ""] + [json.dumps(r) for r in ROWS[3:]]
    src.write_text("\n".join(lines) + "\n")
    status = main(["score", str(src), "--out", str(out), "--workers", "1", "--timeout", "5"])
    captured = capsys.readouterr()
    assert status == 1
    assert "line 4: not JSON" in captured.err
    assert "line 5: missing response, ground_truth" in captured.err
    assert "line 6: no verifier for dataset 'chess'" in captured.err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["reward"] for r in rows] == [10.0, 10.0, 0.0, 10.0, -10.0]
    assert rows[0]["id"] == "a" and rows[0]["extracted"] == "72" and rows[0]["correct"]
    assert rows[2]["reason"].startswith("mismatch")
    summary_lines = {line.split()[0]: line.split() for line in captured.out.splitlines()}
    assert summary_lines["math"][1:3] == ["2", "0.5000"]
    assert summary_lines["all"][1] == "5"
    assert "3 bad rows" in captured.out


def test_rlvr_reward() -> None:
    right, wrong = VerifyResult(True, "1", "match"), VerifyResult(False, "2", "mismatch")
    assert rlvr_reward(right, has_eos=True) == 10.0
    assert rlvr_reward(wrong, has_eos=True) == 0.0
    assert rlvr_reward(right, has_eos=False) == -10.0  # replaces the score, as open-instruct
    assert rlvr_reward(right, True, correct_reward=1.0) == 1.0
    assert rlvr_reward(wrong, False, no_eos_penalty=-1.0) == -1.0


def test_registry() -> None:
    @register_verifier("Test_Contains")
    def contains(response: str, ground_truth: str) -> bool:
        return ground_truth in response

    assert verify("test_contains", "abc", "b") == VerifyResult(True, None, "pass")
    assert verify("TEST_CONTAINS", "abc", "z").reason == "fail"
    with pytest.raises(ValueError, match="already registered"):
        register_verifier("test_contains")(lambda r, g: True)
    with pytest.raises(ValueError, match="known datasets: .*gsm8k.*ifeval.*math"):
        verify("unknown", "", "")
    with pytest.raises(TypeError):
        as_result("yes")


def test_pass_at_k() -> None:
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 10, 5) == 1.0
    assert math.isclose(pass_at_k(4, 1, 1), 0.25)
    assert math.isclose(pass_at_k(4, 1, 2), 0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(3, 2, 2) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_summarize() -> None:
    rows = [{"dataset": "MATH", "correct": True, "reason": "match", "reward": 10.0},
            {"dataset": "math", "correct": False, "reason": "timeout", "reward": 0.0},
            {"dataset": "gsm8k", "correct": False, "reason": "error: x"}]
    s = summarize(rows)
    assert s["math"]["n"] == 2 and s["math"]["accuracy"] == 0.5 and s["math"]["timeouts"] == 1
    assert s["math"]["mean_reward"] == 5.0 and math.isnan(s["gsm8k"]["mean_reward"])
    assert s["all"]["errors"] == 1 and s["all"]["n"] == 3


def test_pass_at_k_by_dataset() -> None:
    groups = [("MATH", [True, False, False, False]), ("math", [False] * 4), ("gsm8k", [True, True])]
    out = pass_at_k_by_dataset(groups, ks=[1, 2, 4])
    assert math.isclose(out["math"]["pass@1"], (0.25 + 0.0) / 2)
    assert math.isclose(out["math"]["pass@4"], 0.5)
    assert out["gsm8k"] == {"pass@1": 1.0, "pass@2": 1.0}  # k=4 > 2 samples: skipped
    assert math.isclose(out["all"]["pass@1"], (0.25 + 0.0 + 1.0) / 3)


def test_score_onto_its_own_input_keeps_every_row(tmp_path, capsys, monkeypatch) -> None:
    """``score X --out X`` (issue: it emptied X and reported "0 scored"): X ends up holding the
    scored rows; a missing input is the commands' one-line error (tulu3.config.run_command) and
    exit 2, with nothing written."""
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert main(["score", str(path), "--out", str(path), "--workers", "1"]) == 0
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == len(ROWS) and all("reward" in r for r in rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]  # no temporary left
    capsys.readouterr()
    missing = tmp_path / "missing.jsonl"
    monkeypatch.delenv("TULU3_DEBUG", raising=False)  # another test's --debug may have set it
    argv = ["score", str(missing), "--out", str(tmp_path / "o.jsonl")]
    assert run_command(main, "tulu3.rewards", argv) == 2
    assert capsys.readouterr().err.strip() == \
        f"tulu3.rewards: error: {missing}: No such file or directory"
    assert not (tmp_path / "o.jsonl").exists()
