"""train.async_save writes the state of the step it was started at, although training changes
the weights while the writer thread runs: the thread is held until the weights have moved, and
the checkpoint still loads the old ones exactly (the tensors are copied before the thread)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from parity_harness import collate, examples, setup_layout

from tulu3.testing import run_distributed_test

pytestmark = pytest.mark.distributed


def _save_while_training(run_dir: str) -> tuple[float, float]:
    from megatron.core import parallel_state as ps

    import tulu3.checkpoint.training as training
    from tulu3.model.presets import resolve_shape
    from tulu3.parallel.ddp import unwrap
    from tulu3.stages.sft import SFTStage
    from tulu3.step import train_step

    setup = setup_layout(1, [])
    stage = SFTStage(setup.shard, setup.cfg.sft.loss_reduction, setup.cfg.model.fused_logprobs)
    batches = [collate(examples(8)[i:i + 2]) for i in range(0, 8, 2)]
    train_step(setup.ddp, setup.optimizer, setup.scheduler, batches, stage, setup.layout)
    params = [p for chunk in setup.ddp for p in unwrap(chunk).parameters()]
    saved = [p.detach().clone() for p in params]
    policy = training.TrainedModel(setup.ddp, setup.optimizer, setup.scheduler,
                                   resolve_shape(setup.cfg.model))
    release, run = threading.Event(), training._Write.run

    def held_run(write: training._Write) -> None:
        release.wait(60)
        run(write)

    training._Write.run = held_run
    try:
        pending = training.start_checkpoint(run_dir, 1, policy, {"loop": {}, "counters": {}},
                                            setup.layout, "fp32", background=True)
        assert not pending.written()
        with torch.no_grad():
            for p in params:
                p.add_(1.0)  # training goes on
        release.set()
        path = pending.finish()
    finally:
        training._Write.run = run
    assert (Path(run_dir) / "checkpoints" / "latest").read_text().strip() == "step_1"
    moved = max(float((p - s).abs().max()) for p, s in zip(params, saved, strict=True))
    training.load_checkpoint(path, policy, setup.layout)
    diff = max(float((p - s).abs().max()) for p, s in zip(params, saved, strict=True))
    ps.destroy_model_parallel()
    return moved, diff


def test_async_save_writes_the_state_it_started_with(tmp_path: Path) -> None:
    ((moved, diff),) = run_distributed_test(_save_while_training, 1, str(tmp_path))
    assert moved > 0.99 and diff == 0.0, (moved, diff)  # moved: 1 + fp32 rounding
