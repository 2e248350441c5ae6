"""The DPO loop: SupervisedLoop over preference pairs, with reference log-probs in every batch.

Pairs whose chosen and rejected responses are the same tokens (after truncation) teach nothing
(every loss has a zero gradient there) and would only dilute the metrics: they are left out of
the sampler and counted. Malformed rows (different prompts, empty responses, ...) are refused
or skipped-and-counted by the data layer (tulu3/data/examples.py, ``data.skip_bad_rows``).

Reference log-probs (:mod:`.reference`) are attached to every collated micro-batch, training
and eval alike: looked up in the cached table (``dpo.reference_mode=cached``), or computed by
the frozen reference copy over the same micro-batches (``online``). simpo needs none.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tulu3.config import Config, ConfigError
from tulu3.data.packing import collate_dpo
from tulu3.data.sampler import GlobalBatchSampler
from tulu3.metrics.profiling import phase
from tulu3.model.presets import resolve_shape
from tulu3.parallel.layout import ParallelLayout
from tulu3.stages.dpo import reference as ref
from tulu3.stages.dpo.stage import DPOStage, ReferenceLogps
from tulu3.stages.forward import frozen_copy
from tulu3.stages.supervised import SupervisedLoop

log = logging.getLogger(__name__)


class PairView:
    """The trainable pairs of a DPO dataset (chosen != rejected); ``view[i]`` keeps the pair's
    dataset index, which is the key of the reference table."""

    def __init__(self, dataset: Any, split: str) -> None:
        self.dataset, self.split = dataset, split
        chosen, rejected = dataset.chosen, dataset.rejected
        same_length = np.flatnonzero(chosen.lengths() == rejected.lengths())
        identical = {int(i) for i in same_length if np.array_equal(chosen[i], rejected[i])}
        self.keep = np.array([i for i in range(len(dataset)) if i not in identical],
                             dtype=np.int64)
        self.skipped_identical = len(identical)

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[int(self.keep[i])]


class DPOLoop(SupervisedLoop):
    """Preference pairs -> DPOStage steps, reference log-probs from a cache or a frozen copy."""

    def __init__(self, cfg: Config, tokenizer: Any, chunks: list, trainer: Any, stage: DPOStage,
                 layout: ParallelLayout) -> None:
        super().__init__(cfg, "dpo", tokenizer, chunks, trainer, stage, collate_dpo, layout)
        self.dataset = self._view(self.dataset, "train")
        self.eval_dataset = self._view(self.eval_dataset, "eval") if self.eval_dataset else None
        s = self.sampler
        self.sampler = GlobalBatchSampler(len(self.dataset), s.global_batch, s.micro_batch,
                                          s.dp_rank, s.dp_size, s.seed, s.epochs)
        self.tokenizer_name = tokenizer.name
        self.ref_measure = ReferenceLogps(stage.shard, stage.uses_hidden)
        self.tables: dict[str, ref.ReferenceTable] = {}
        self.reference_chunks: list | None = None
        if not stage.needs_reference:
            return
        if cfg.dpo.reference_mode == "online":
            self.reference_chunks = frozen_copy(cfg.model, layout, self.groups, chunks,
                                                cfg.dpo.reference, resolve_shape(cfg.model))
        elif cfg.dpo.reference_mode == "cached":
            self._build_tables()
        else:
            raise ConfigError(f"dpo.reference_mode: {cfg.dpo.reference_mode!r} is not cached "
                              "or online")

    def _view(self, dataset: Any, split: str) -> PairView:
        view = PairView(dataset, split)
        if view.skipped_identical:
            log.info(f"dpo: skipped {view.skipped_identical} of {len(dataset)} {split} "
                     "pairs whose chosen and rejected responses are identical")
        return view

    # --- reference log-probs ------------------------------------------------------------------

    def _build_tables(self) -> None:
        cfg = self.cfg
        path = cfg.dpo.reference or cfg.model.load
        fingerprint = ref.checkpoint_fingerprint(path, cfg.model, cfg.train.seed)
        settings = {"tokenizer": self.tokenizer_name, "max_len": cfg.data.max_len,
                    "add_bos": cfg.data.add_bos, "dtype": cfg.model.dtype,
                    "spec": cfg.model.spec, "fp8": cfg.model.fp8}
        views = [v for v in (self.dataset, self.eval_dataset) if v is not None]
        swap = cfg.dpo.reference is not None and not _same_dir(cfg.dpo.reference, cfg.model.load)
        pending = {}
        for view in views:
            key = ref.cache_key(view.dataset.meta["cache_key"], fingerprint, settings)
            pending[view.split] = (view, Path(cfg.train.run_dir) / ref.CACHE_DIR /
                                   f"{view.split}-{key}.pt")
        context = (ref.swapped_weights(self.chunks, cfg.dpo.reference, resolve_shape(cfg.model),
                                       self.groups) if swap and not self._all_cached(pending)
                   else contextlib.nullcontext())
        with context:
            for split, (view, file) in pending.items():
                self.tables[split] = ref.load_or_compute(file, len(view.dataset),
                                                         lambda v=view: self._compute(v))
                self._report(split, self.tables[split])

    @staticmethod
    def _all_cached(pending: dict) -> bool:
        """Whether rank 0 finds every table file (then no reference weights are loaded)."""
        found = torch.distributed.get_rank() == 0 and all(f.is_file() for _, f in
                                                           pending.values())
        flag = torch.tensor([float(found)])
        ref.world_all_reduce(flag, torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def _compute(self, view: PairView) -> torch.Tensor:
        """The pre-pass of one split. Training pairs go in exactly the micro-batches of the
        first epoch (then the pairs no epoch-0 step takes), so a one-epoch run (Tülu 3's) sees
        bit for bit the values the online reference would compute; eval pairs go as
        ``evaluate`` groups them."""
        size = self.cfg.train.micro_batch
        if view is self.dataset:
            steps = self.sampler.steps_per_epoch
            groups = [g for step in range(steps) for g in self.sampler.micro_batches(step)]
            taken = set(self.sampler.permutation(0)[:steps * self.sampler.global_batch].tolist())
            rest = [i for i in range(len(view)) if i not in taken]
            groups += ref.shard(rest, size, self.groups)
        else:
            groups = ref.shard(list(range(len(view))), size, self.groups)

        def collate(index_lists: list[list[int]]) -> list[dict]:
            return SupervisedLoop.micro_batches(self, view, index_lists)

        return ref.compute_table(self.chunks, len(view.dataset), groups, collate, view.keep,
                                 self.ref_measure, self.layout, view.split)

    def _report(self, split: str, table: ref.ReferenceTable) -> None:
        verb = "reused" if table.reused else "computed"
        log.info(f"dpo: reference log-probs ({split}) {verb}: {table.path}")

    def micro_batches(self, dataset: Any, index_lists: list[list[int]]) -> list[dict]:
        """Collated micro-batches with the reference log-probs of their pairs attached."""
        batches = super().micro_batches(dataset, index_lists)
        if self.reference_chunks is not None:
            with phase("reference"):
                values = ref.reference_pass(self.reference_chunks, batches, self.ref_measure,
                                            self.layout)
            if self.groups.last_stage:  # the only ranks with a loss
                def lookup(ids: list[int]) -> torch.Tensor:
                    return torch.tensor([values[i] for i in ids])

                batches = [ref.attach(b, lookup) for b in batches]
        elif dataset.split in self.tables:
            batches = [ref.attach(b, self.tables[dataset.split].lookup) for b in batches]
        return batches


def _same_dir(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a == b
    from tulu3.checkpoint.load import resolve_checkpoint_dir

    return resolve_checkpoint_dir(a).resolve() == resolve_checkpoint_dir(b).resolve()


def build_loop(trainer: Any, tokenizer: Any, chunks: list, shard: Any) -> DPOLoop:
    """The DPO loop with its stage from ``cfg.dpo``."""
    cfg, dpo = trainer.cfg, trainer.cfg.dpo
    stage = DPOStage(shard, dpo.loss, dpo.beta, dpo.gamma_beta_ratio, dpo.label_smoothing,
                     cfg.model.fused_logprobs)
    return DPOLoop(cfg, tokenizer, chunks, trainer, stage, trainer.layout)
