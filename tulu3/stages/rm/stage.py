"""Reward model: a Bradley-Terry loss on preference pairs, chosen and rejected in one forward.

The model is :class:`tulu3.model.scalar_head.ScalarHeadModel`; a sequence's reward is its score
at its last token (:func:`tulu3.model.scalar_head.sequence_scores`). Micro-batches come from
``collate_dpo``: sequence 2i is pair i's chosen, 2i+1 its rejected (padded or packed).

Per pair, with r_c, r_r the chosen and rejected rewards (Ouyang et al. 2022; open-instruct's
``reward_modeling.py``)::

    loss = -log sigmoid(r_c - r_r - margin) + center_coef * (r_c + r_r)^2

``margin`` (``rm.margin``) asks for a gap of at least that much (Llama 2's margin loss, here one
constant); the centering term (``rm.center_coef``, Eisenstein et al. 2023, "Helping or Herding?")
keeps rewards near zero, which they are otherwise free to drift from (the loss only sees
differences). The normalizer is the number of pairs: the loss is the mean over the global batch.

Metrics (over the global batch): ``loss``, ``accuracy`` (share of pairs with r_c > r_r),
``margin`` (mean r_c - r_r), ``chosen`` / ``rejected`` (mean rewards), ``reward_mean`` and
``reward_std`` (over all 2 x pairs rewards), ``pairs``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tulu3.model.scalar_head import sequence_scores
from tulu3.stages.base import metric


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0,
                       center_coef: float = 0.0) -> torch.Tensor:
    """Per-pair loss [n] from rewards ``chosen`` [n] and ``rejected`` [n] (fp32)."""
    loss = -torch.nn.functional.logsigmoid(chosen - rejected - margin)
    if center_coef:
        loss = loss + center_coef * (chosen + rejected) ** 2
    return loss


class RMStage:
    name = "rm"
    metric_names = ("loss", "accuracy", "margin", "chosen", "rejected", "reward_mean",
                    "reward_sq", "pairs")
    uses_hidden = False

    def __init__(self, margin: float = 0.0, center_coef: float = 0.0) -> None:
        if center_coef < 0:
            raise ValueError(f"rm.center_coef={center_coef} must be >= 0")
        self.margin = margin
        self.center_coef = center_coef

    def loss(self, batch: dict, output: torch.Tensor, model: torch.nn.Module
             ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``output``: scores [b, s] from the scalar head; returns the loss summed over pairs."""
        num_seqs = int(batch["example_ids"].numel())
        if num_seqs % 2:
            raise ValueError(f"rm: a micro-batch holds {num_seqs} sequences; expected chosen/"
                             "rejected pairs (collate_dpo)")
        rewards = sequence_scores(output, batch["seq_ids"], num_seqs)
        chosen, rejected = rewards[0::2], rewards[1::2]
        per_pair = bradley_terry_loss(chosen, rejected, self.margin, self.center_coef)
        loss_sum = per_pair.sum()
        pairs = torch.tensor(num_seqs // 2)
        gap = (chosen - rejected).detach()
        flat = rewards.detach()
        metrics = {
            "loss": metric(loss_sum, pairs),
            "accuracy": metric((gap > 0).sum(), pairs),
            "margin": metric(gap.sum(), pairs),
            "chosen": metric(chosen.detach().sum(), pairs),
            "rejected": metric(rejected.detach().sum(), pairs),
            "reward_mean": metric(flat.sum(), flat.numel()),
            "reward_sq": metric((flat.double() ** 2).sum(), flat.numel()),
            "pairs": metric(pairs, 0),
        }
        return loss_sum, pairs.to(torch.int), metrics

    @staticmethod
    def finish_metrics(metrics: dict[str, float]) -> dict[str, float]:
        """Global-batch reward std from the reduced mean and mean square (E[r^2] - E[r]^2)."""
        out = dict(metrics)
        if "reward_sq" in out:
            mean_sq = out.pop("reward_sq")
            out["reward_std"] = math.sqrt(max(mean_sq - out.get("reward_mean", 0.0) ** 2, 0.0))
        return out


def build_loop(trainer: Any, tokenizer: Any, chunks: list, shard: Any) -> Any:
    """The RM loop: the shared supervised loop over preference pairs with :class:`RMStage`."""
    from tulu3.data.packing import collate_dpo
    from tulu3.stages.supervised import SupervisedLoop

    cfg = trainer.cfg
    stage = RMStage(cfg.rm.margin, cfg.rm.center_coef)
    return SupervisedLoop(cfg, "dpo", tokenizer, chunks, trainer, stage, collate_dpo,
                          trainer.layout)
