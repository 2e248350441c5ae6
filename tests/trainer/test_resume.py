"""Stop and resume: SIGTERM mid-run, kill -9 inside a save, another layout, bad checkpoints.

The resumed runs must log exactly the losses of the uninterrupted run (same layout), with the
distributed optimizer on, since its state is the hardest part of a checkpoint to restore.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from trainer_harness import losses, run_many, sft_overrides, tiny_data

from tulu3.testing import free_port, run_distributed_test

pytestmark = pytest.mark.distributed

LAYOUT = ["parallel.tp=1", "parallel.pp=1", "parallel.distributed_optimizer=true",
          "train.max_steps=8", "train.save_every=2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list[float]]:
    root = tmp_path_factory.mktemp("resume")
    data = tiny_data(root)
    (full,) = run_distributed_test(run_many, 2, [sft_overrides(data, root / "full", *LAYOUT)])[0]
    assert isinstance(full, list) and len(full) == 8, full
    return root, data, full


def _torchrun(overrides: list[str], env: dict | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(free_port()), "-m", "tulu3.train", "--stage", "sft",
               "--config", "launch/recipes/tiny-sft.yaml", "--set", *overrides]
    return subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigterm_then_resume_matches_uninterrupted(setup: tuple) -> None:
    root, data, full = setup
    run_dir = root / "sigterm"
    overrides = sft_overrides(data, run_dir, *LAYOUT)
    proc = _torchrun(overrides)
    deadline = time.monotonic() + 120
    while len(losses(run_dir)) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    stopped_at = len(losses(run_dir))
    assert 3 <= stopped_at < 8, output[-3000:]
    assert "stopped by signal" in output, output[-3000:]
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{stopped_at}", (latest, stopped_at)
    (resumed,) = run_distributed_test(run_many, 2, [overrides])[0]
    assert resumed == full, (resumed, full)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_kill_9_during_save_keeps_previous_checkpoint(setup: tuple, mode: str) -> None:
    """kill -9 once the policy's weights of step 4 are written (async: by the writer thread,
    while training goes on): ``latest`` still names step 2, and the resume is exact."""
    root, data, full = setup
    run_dir = root / f"killed_{mode}"
    overrides = sft_overrides(data, run_dir, *LAYOUT, f"train.async_save={mode == 'async'}")
    proc = _torchrun(overrides, env={"TULU3_FAULT": "save:4"})
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode != 0, output[-2000:]
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / ".tmp_step_4").exists(), sorted(os.listdir(checkpoints))
    assert (checkpoints / "latest").read_text().strip() == "step_2"
    (resumed,) = run_distributed_test(run_many, 2, [overrides])[0]
    assert resumed == full, (resumed, full)
    assert not (checkpoints / ".tmp_step_4").exists()


def test_resume_at_another_layout(setup: tuple) -> None:
    """TP1xDP2 -> TP2xDP1 (distributed optimizer both times): weights and optimizer state
    are resharded; switching the optimizer type is refused with both layouts named."""
    root, data, full = setup
    step_6 = root / "full" / "checkpoints" / "step_6"
    resume = sft_overrides(data, root / "relayout", *LAYOUT, "parallel.tp=2",
                           f"train.resume={step_6}")
    switch = sft_overrides(data, root / "switch", *LAYOUT, "parallel.distributed_optimizer=false",
                           f"train.resume={step_6}")
    (result, refused) = run_distributed_test(run_many, 2, [resume, switch])[0]
    assert isinstance(result, list) and len(result) == 2, result  # steps 7 and 8
    for step, (got, want) in enumerate(zip(result, full[6:], strict=True)):
        assert abs(got - want) <= 1e-5 * abs(want), f"step {step + 7}: {got} vs {want}"
    assert "cannot be loaded at TP1xPP1xDP2" in refused and "model.load=" in refused, refused


def test_bad_resumes_are_named(setup: tuple) -> None:
    root, data, _ = setup
    base = sft_overrides(data, root / "bad", *LAYOUT, "train.max_steps=2")
    corrupt = root / "corrupt"
    runs = [
        base + [f"train.resume={root / 'does-not-exist'}"],
        base + ["model.load=null", "model.layers=2",
                f"train.resume={root / 'full' / 'checkpoints' / 'step_8'}"],
    ]
    results = run_distributed_test(run_many, 2, runs)[0]
    assert "does-not-exist" in results[0] and "not a complete" in results[0], results[0]
    assert "shape" in results[1] and "layers=2" in results[1], results[1]
    # A checkpoint whose model files are damaged: a clear error, not a hang.
    import shutil

    shutil.copytree(root / "full" / "checkpoints" / "step_8", corrupt)
    for shard in (corrupt / "model").glob("*.distcp"):
        shard.write_bytes(b"garbage")
    (result,) = run_distributed_test(run_many, 2, [base + [f"train.resume={corrupt}"]])[0]
    assert isinstance(result, str) and "corrupt" in result, result


def test_async_saves_wall_clock_exit_and_stop_at_step(setup: tuple) -> None:
    """With train.async_save: a run stopped by train.exit_after_minutes (after its first step)
    and one stopped by train.stop_at_step=5 save, return normally, and resume to exactly the
    uninterrupted losses (the LR schedule still spans train.max_steps); the resumed run also
    writes a profiler trace and per-phase times."""
    from tulu3.metrics import read_metrics

    root, data, full = setup
    timed, stopped = root / "timed", root / "stopped"
    common = [*LAYOUT, "train.async_save=true"]
    runs = [sft_overrides(data, timed, *common, "train.exit_after_minutes=1e-6"),
            sft_overrides(data, timed, *common, "train.profile=2:3"),
            sft_overrides(data, stopped, *common, "train.stop_at_step=5"),
            sft_overrides(data, stopped, *common)]
    first, resumed, until_5, rest = run_distributed_test(run_many, 2, runs)[0]
    assert first == full[:1], (first, full)  # the first check comes after step 1
    assert resumed == full and rest == full, (resumed, rest, full)
    assert until_5 == full[:5], until_5
    for run_dir in (timed, stopped):
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_8"
        assert not list((run_dir / "checkpoints").glob(".tmp_*"))
    assert (timed / "profile" / "trace_rank0.json").is_file()
    record = read_metrics(timed / "metrics.jsonl")[-1]
    for key in ("time/data_s", "time/forward_backward_s", "time/optimizer_s", "time/save_s"):
        assert record[key] >= 0.0, (key, record)
