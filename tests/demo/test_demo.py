"""The one-command demo in a reduced mode: every stage through torchrun, report written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed


def test_demo_reduced(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    command = [sys.executable, "-m", "tulu3.demo", "--out", str(out), "--steps", "3",
               "--eval-samples", "8"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (out / "report.md").read_text()
    for section in ("## Curation", "## SFT", "## DPO", "## RLVR", "## Eval accuracy by stage",
                    "## HF export"):
        assert section in report, section
    assert "3 of 3 planted" in report
    check = json.loads((out / "export_check.json").read_text())
    assert check["max_abs_diff"] < 1e-4, check
    for stage in ("sft", "dpo", "rlvr"):
        assert (out / stage / "metrics.jsonl").exists()
        assert (out / f"eval_{stage}.json").exists()
    assert (out / "sft" / "loss.png").exists()
