"""What a stage is (a micro-batch + model output -> (loss_sum, normalizer, metrics)) and what a
loop is (what a stage package gives the trainer: :class:`Loop`).

The trainer is shared; a stage only turns numbers into a loss. ``normalizer`` is what the loss
sum is divided by over the whole global batch (tokens for a per-token mean, sequences for
Tülu 3's sum reduction, pairs for DPO): megatron's schedule sums both over micro-batches and
data-parallel ranks (``calculate_per_token_loss``), so micro-batches of different sizes average
correctly.

Metrics are returned as ``{name: tensor([sum, count])}`` so that they, too, can be summed over
micro-batches and ranks and divided once at the end.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


def metric(total: torch.Tensor | float, count: torch.Tensor | float = 1.0) -> torch.Tensor:
    """A (sum, count) pair; the logged value is sum / count over the global batch."""
    total = torch.as_tensor(total, dtype=torch.float64).detach().reshape(())
    count = torch.as_tensor(count, dtype=torch.float64).detach().reshape(())
    return torch.stack([total, count])


class Stage(Protocol):
    name: str
    metric_names: tuple[str, ...]
    """Every metric key the stage returns, in a fixed order (non-last pipeline stages need it)."""
    uses_hidden: bool
    """Whether the model should return final hidden states (fused log-prob path) or logits."""

    def loss(self, batch: dict, output: torch.Tensor, model: torch.nn.Module
             ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(loss_sum scalar, normalizer scalar, metrics) for one micro-batch on the last stage."""
        ...


class Loop(Protocol):
    """What a stage plugs into the trainer (``build_loop`` of each tulu3/stages/ package).

    Optional: ``extra_models() -> dict[str, TrainedModel]``, the models besides the policy that
    the loop trains (PPO: ``{"value": ...}``); checkpoints save and restore them with the policy
    (tulu3/checkpoint/training.py). Frozen models (the reference policy) are not among them.
    ``close() -> None``: release what the loop holds (RLVR: its verifier pool);
    :meth:`tulu3.trainer.Trainer.fit` calls it when it returns or raises.
    """

    def total_steps(self) -> int: ...
    def train_step(self, step: int) -> dict[str, Any]: ...
    def evaluate(self) -> dict[str, float]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
