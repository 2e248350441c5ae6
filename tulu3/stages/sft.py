"""Supervised fine-tuning: cross entropy on assistant tokens.

``sft.loss_reduction``:
- ``sum`` (Tülu 3's runs): token losses are summed, and the sum over the global batch is divided
  by the number of sequences, so every trained token weighs the same whatever the padding,
  packing or micro-batching (open-instruct divides by a constant too; its constant depends on
  the world size, ours does not).
- ``mean``: the sum over the global batch divided by its number of trained tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from tulu3.stages.base import metric
from tulu3.stages.logprobs import VocabShard, token_logprobs


class SFTStage:
    name = "sft"
    metric_names = ("loss", "token_loss", "trained_tokens", "sequences")

    def __init__(self, shard: VocabShard, reduction: str = "sum", fused: bool = True) -> None:
        if reduction not in ("sum", "mean"):
            raise ValueError(f"sft.loss_reduction: {reduction!r} is not sum or mean")
        self.shard = shard
        self.reduction = reduction
        self.uses_hidden = fused

    def loss(self, batch: dict, output: torch.Tensor, model: torch.nn.Module
             ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        labels = batch["labels"]
        logprobs, _ = token_logprobs(model, output, labels, self.shard, self.uses_hidden)
        trained = labels != -100
        loss_sum = -(logprobs * trained).sum()
        tokens = trained.sum()
        sequences = torch.tensor(int(batch["example_ids"].numel()))
        normalizer = sequences if self.reduction == "sum" else tokens
        metrics = {
            "loss": metric(loss_sum, normalizer),
            "token_loss": metric(loss_sum, tokens),
            "trained_tokens": metric(tokens, 0),
            "sequences": metric(sequences, 0),
        }
        return loss_sum, normalizer.to(torch.int), metrics


def build_loop(trainer: Any, tokenizer: Any, chunks: list, shard: VocabShard) -> Any:
    """The SFT loop: the shared supervised loop over chat rows with :class:`SFTStage`."""
    from tulu3.data.packing import collate_sft
    from tulu3.stages.supervised import SupervisedLoop

    cfg = trainer.cfg
    stage = SFTStage(shard, cfg.sft.loss_reduction, cfg.model.fused_logprobs)
    return SupervisedLoop(cfg, "sft", tokenizer, chunks, trainer, stage, collate_sft,
                          trainer.layout)
