"""launch/gpu_check.sh (issue 22's prepared device run): every step runs at tiny shapes on CPU,
so the one call on the GPU machine does not fail on a typo."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed  # six subprocesses that each start megatron

REPO = Path(__file__).resolve().parents[2]


def test_every_step_runs_at_tiny_shapes(tmp_path: Path) -> None:
    env = {**os.environ, "GPU_CHECK_TINY": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run(["bash", "launch/gpu_check.sh", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "0 failed" in proc.stdout and "FAILED" not in proc.stdout, log[-4000:]
    for step in ("1.", "2.", "3.", "4.", "5.", "6."):
        assert f"=== {step}" in proc.stdout, step
    for name in ("step", "step_fp8", "step_fused"):
        rows = {r["system"] for r in json.loads((tmp_path / f"{name}.json").read_text())["rows"]}
        assert "tulu3" in rows and "hf" in rows, (name, rows)
    assert "same greedy tokens as HF: True" in proc.stdout
