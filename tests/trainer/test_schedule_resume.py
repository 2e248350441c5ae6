"""The LR schedule on resume: the recipe's wins, the step count is the checkpoint's."""

from __future__ import annotations

import torch

from tulu3.config import OptimConfig
from tulu3.optim import build_scheduler, schedule_changes


def _scheduler(total_steps: int, steps_taken: int = 0) -> tuple:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.0)
    scheduler = build_scheduler(OptimConfig(lr=1e-3, min_lr=0.0, warmup=2, schedule="linear"),
                                optimizer, total_steps)
    for _ in range(steps_taken):
        scheduler.step(1)
    return optimizer, scheduler


def test_longer_run_decays_over_the_new_length() -> None:
    _, short = _scheduler(total_steps=10, steps_taken=6)
    saved = short.state_dict()
    optimizer, resumed = _scheduler(total_steps=20)
    resumed.load_state_dict(saved)
    fresh_optimizer, _ = _scheduler(total_steps=20, steps_taken=6)
    # Linear from 1e-3 at step 2 to 0 at step 20: step 6 is 1e-3 * 14 / 18.
    assert resumed.num_steps == 6
    assert abs(optimizer.param_groups[0]["lr"] - 1e-3 * 14 / 18) < 1e-12
    assert optimizer.param_groups[0]["lr"] == fresh_optimizer.param_groups[0]["lr"]
    assert schedule_changes(saved, resumed) == ["lr_decay_steps 10 -> 20"]


def test_same_recipe_resumes_the_same_schedule() -> None:
    _, before = _scheduler(total_steps=10, steps_taken=6)
    optimizer, resumed = _scheduler(total_steps=10)
    resumed.load_state_dict(before.state_dict())
    assert schedule_changes(before.state_dict(), resumed) == []
    assert optimizer.param_groups[0]["lr"] == before.optimizer.param_groups[0]["lr"]
    assert abs(optimizer.param_groups[0]["lr"] - 1e-3 * 4 / 8) < 1e-12
