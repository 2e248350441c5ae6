"""bench_step.py: the tiny CPU run gives every row; tulu3 and HF compute the same loss."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).resolve().parent / "bench_step.py"
SYSTEMS = {"tulu3", "hf", "dpo", "logprob_fused", "logprob_naive"}


def _module():
    spec = importlib.util.spec_from_file_location("bench_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_has_every_row_and_equal_losses(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--steps", "2", "--warmup", "1",
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| system | TFLOP/s (model FLOPs) | tokens/s | peak GiB | ratio vs HF |" in proc.stdout
    result = json.loads(out.read_text())
    rows = {r["system"]: r for r in result["rows"]}
    assert set(rows) == SYSTEMS
    for system, r in rows.items():
        assert r["tokens_per_s"] > 0 and r["tflops"] > 0, system
        assert len(r["step_s"]) == 2, system  # the warm-up step is not timed
    # Same weights (HF -> tulu3 through hf_mapping), same batch: same fp32 loss at step 0, and
    # the same optimizer update after it (megatron's Adam == torch AdamW, clip 1.0).
    assert result["loss_step0"]["abs_diff"] < 1e-4, result["loss_step0"]
    assert len(rows["tulu3"]["losses"]) == 3
    for ours, hf in zip(rows["tulu3"]["losses"], rows["hf"]["losses"], strict=True):
        assert abs(ours - hf) < 1e-4, (rows["tulu3"]["losses"], rows["hf"]["losses"])
    assert rows["tulu3"]["losses"][-1] < rows["tulu3"]["losses"][0]  # it trains


def test_dpo_batch_is_pairs_with_a_shared_untrained_prompt() -> None:
    batch = _module().dpo_batch(vocab=50, rows=4, seq=10, seed=0)
    assert batch["example_ids"].tolist() == [0, 0, 1, 1]
    assert torch.equal(batch["tokens"][0, :5], batch["tokens"][1, :5])
    assert (batch["labels"][:, :5] == -100).all()
    assert torch.equal(batch["labels"][:, 5:-1], batch["tokens"][:, 6:])
    assert (batch["labels"][:, -1] == -100).all()
    assert batch["ref_chosen_logps"].shape == (2,)


def test_tiny_preset_sets_the_cpu_shape() -> None:
    args = _module().parse_args(["--tiny", "--steps", "3", "--seq", "32"])
    assert (args.layers, args.hidden, args.vocab, args.dtype) == (2, 64, 512, "fp32")
    assert (args.steps, args.seq) == (3, 32)  # explicit flags win over the preset
    assert _module().parse_args([]).hidden == 4096  # the GPU slice by default


def test_a_failed_system_keeps_the_other_rows() -> None:
    bench = _module()

    def oom() -> dict:
        raise RuntimeError("CUDA out of memory")

    good = {"losses": [1.0], "step_s": [0.5], "peak_gib": 1.0, "resident_gib_at_start": 0.0}
    rows = [bench.attempt("tulu3", "ours", 100, 6.0, oom),
            bench.attempt("hf", "theirs", 100, 6.0, lambda: good)]
    assert rows[0]["error"] == "RuntimeError: CUDA out of memory"
    assert rows[1]["tokens_per_s"] == 200.0
    text = bench.table(rows)
    assert "error: RuntimeError: CUDA out of memory" in text and "| 1.00x |" in text
    assert bench.loss_check(rows) is None
