"""The loop for stages that train on a fixed dataset: SFT, DPO and the reward model.

Each optimizer step takes this DP rank's micro-batches of the global batch from the sampler,
collates them (padded or packed) and runs the shared train step; evaluation runs the same stage
forward-only over the held-out set.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tulu3.config import Config
from tulu3.data.dataset import build_dataset
from tulu3.data.sampler import GlobalBatchSampler
from tulu3.metrics.profiling import phase
from tulu3.parallel.layout import ParallelLayout
from tulu3.stages.base import Stage
from tulu3.stages.forward import eval_mode
from tulu3.step import run_schedule, train_step


class SupervisedLoop:
    """Dataset + sampler + collate + stage -> optimizer steps.

    ``optimizer_ref`` is the trainer: its optimizer and scheduler at each step, its process
    groups (``groups``: this rank's data-parallel share).
    """

    def __init__(self, cfg: Config, kind: str, tokenizer: Any, chunks: list, optimizer_ref: Any,
                 stage: Stage, collate: Callable, layout: ParallelLayout) -> None:
        self.cfg, self.kind, self.chunks, self.stage = cfg, kind, chunks, stage
        self.layout, self.collate, self.trainer = layout, collate, optimizer_ref
        self.groups = optimizer_ref.groups
        data = cfg.data
        common = dict(tok=tokenizer, max_len=data.max_len, add_bos=data.add_bos,
                      cache_dir=cfg.tokenization_cache,
                      seed=cfg.train.seed, skip_bad_rows=data.skip_bad_rows,
                      progress=self.groups.dp_rank == 0)
        if data.train is None:
            raise ValueError("data.train is not set")
        self.dataset = build_dataset(kind, data.train, **common)
        self.eval_dataset = build_dataset(kind, data.eval, **common) if data.eval else None
        self.has_eval = self.eval_dataset is not None
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        dp_rank, dp = self.groups.dp_rank, self.groups.dp_size
        train = cfg.train
        self.sampler = GlobalBatchSampler(len(self.dataset), train.global_batch,
                                          train.micro_batch, dp_rank, dp, train.seed,
                                          train.epochs)

    def total_steps(self) -> int:
        steps = len(self.sampler)
        return min(steps, self.cfg.train.max_steps) if self.cfg.train.max_steps else steps

    def micro_batches(self, dataset: Any, index_lists: list[list[int]]) -> list[dict]:
        return [self.collate([dataset[i] for i in indices], self.cfg.data.max_len,
                             self.cfg.data.pack, self.pad_id, self.layout.pad_multiple)
                for indices in index_lists]

    def train_step(self, step: int) -> dict[str, Any]:
        with phase("data"):
            batches = self.micro_batches(self.dataset, self.sampler.micro_batches(step))
        self.sampler.consumed_steps = step + 1
        return self._finish(train_step(self.chunks, self.trainer.optimizer,
                                       self.trainer.scheduler, batches, self.stage, self.layout,
                                       step, self.cfg.train.skip_nan))

    def _finish(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Metrics that are not a sum / count (the RM's reward std) are derived by the stage."""
        finish = getattr(self.stage, "finish_metrics", None)
        return finish(metrics) if finish is not None else metrics

    def evaluate(self) -> dict[str, float]:
        """The stage's metrics on the whole eval set (each DP rank takes its share)."""
        if self.eval_dataset is None:
            return {}
        dp_rank, dp = self.groups.dp_rank, self.groups.dp_size
        size = self.cfg.train.micro_batch
        # Every DP rank must run the same number of micro-batches (the schedule is collective
        # and so is the metric reduction): the remainder of the eval set is left out.
        # Interleaved pipelining also needs a multiple of pp micro-batches per rank.
        unit = dp * size * self.layout.micro_batch_multiple
        used = len(self.eval_dataset) // unit * unit
        if used == 0:
            raise ValueError(f"data.eval has {len(self.eval_dataset)} examples, fewer than "
                             f"one evaluation round ({unit} = micro_batch x dp"
                             f"{' x pp' if unit != size * dp else ''})")
        mine = list(range(dp_rank, used, dp))
        groups = [mine[i:i + size] for i in range(0, len(mine), size)]
        with eval_mode(self.chunks):
            metrics = run_schedule(self.chunks, self.micro_batches(self.eval_dataset, groups),
                                   self.stage, self.layout, forward_only=True)
        metrics.pop("tokens", None)
        return self._finish(metrics)

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
