"""eval_preferences refuses a checkpoint without a trained reward head (a random head would
report an accuracy and exit 0)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tulu3.checkpoint.format import make_meta, write_meta
from tulu3.config import UserError
from tulu3.eval.preferences import main as eval_preferences
from tulu3.model.presets import PRESETS
from tulu3.stages.rm.score import check_reward_head


def _hf(folder: Path, arch: str) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": [arch]}))
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def test_only_reward_models_pass(tmp_path: Path, capsys, monkeypatch) -> None:
    check_reward_head(_hf(tmp_path / "rm", "LlamaForSequenceClassification"))
    lm = _hf(tmp_path / "lm", "LlamaForCausalLM")
    with pytest.raises(UserError, match=rf"--rm {lm}: not a reward model \(head "
                                        r"LlamaForCausalLM\)"):
        check_reward_head(lm)
    for head, ok in (("scalar", True), ("lm", False)):
        ckpt = tmp_path / f"tulu3_{head}"
        write_meta(ckpt, make_meta(PRESETS["tiny"], 1, 1, 1, "fp32", head=head))
        if ok:
            check_reward_head(ckpt)
        else:
            with pytest.raises(UserError, match="not a reward model"):
                check_reward_head(ckpt)
    # the command: one line naming --rm, before any process group or model
    monkeypatch.delenv("TULU3_DEBUG", raising=False)
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"chosen": [{"role": "user", "content": "a"},
                                           {"role": "assistant", "content": "b"}],
                                "rejected": [{"role": "user", "content": "a"},
                                             {"role": "assistant", "content": "c"}]}) + "\n")
    from tulu3.config import run_command

    assert run_command(eval_preferences, "tulu3.eval_preferences",
                       ["--rm", str(lm), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a reward model" in err, err
