"""Reference-model log-probs for DPO: a cached pre-pass, or a frozen copy run every step.

Both modes compute the same thing the same way: a forward-only pass of the reference weights
over micro-batches of pairs (:func:`tulu3.stages.forward.forward_pass`) measuring
:class:`~tulu3.stages.dpo.stage.ReferenceLogps` on the last pipeline stage: ``example_id ->
(chosen, rejected)`` summed response log-probs (fp32). Only last-stage ranks measure.

- ``cached`` (``dpo.reference_mode``, default): before training, every pair of the training
  (and eval) set once, each DP rank taking its share. A world all-reduce (MAX over tables
  filled with -inf where a rank computed nothing) then gives every rank the whole table
  ``[N, 2]`` (8 bytes a pair: 2 MiB for Tülu 3's 270k pairs, so no rank needs a shard of it).
  Rank 0 writes it atomically to ``RUN_DIR/ref_logprobs/<split>-<key>.pt``; the key hashes the
  tokenized data (file contents, tokenizer, template, max_len, ...), the reference checkpoint
  (resolved path, and size + mtime of each weight file) and the model's dtype / spec, so a
  restart reuses the file and another reference or data set computes a new one. When the
  reference is not the weights being trained (``dpo.reference`` set), its weights are loaded
  into the policy's chunks for the pre-pass and the policy's restored from a host copy
  afterwards: one model on the accelerator at any time.
- ``online``: a frozen copy of the chunks (:func:`tulu3.stages.forward.frozen_copy`: no DDP, no
  optimizer, eval mode, no grad) runs the same pass over each step's micro-batches right before
  the step, PP included.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from tulu3.fileio import atomic_open
from tulu3.parallel.ddp import unwrap
from tulu3.parallel.groups import ProcessGroups
from tulu3.parallel.layout import ParallelLayout
from tulu3.stages.dpo.stage import REF_KEYS, ReferenceLogps
from tulu3.stages.forward import forward_pass

log = logging.getLogger(__name__)

CACHE_VERSION = 1
CACHE_DIR = "ref_logprobs"


def reference_pass(chunks: list[torch.nn.Module], micro_batches: list[dict],
                   measure: ReferenceLogps, layout: ParallelLayout
                   ) -> dict[int, tuple[float, float]]:
    """Forward-only pass; ``example_id -> (chosen, rejected)`` sums on last-stage ranks, ``{}``
    elsewhere. Collective over the world (the schedule's metrics are all-reduced)."""
    out = forward_pass(chunks, micro_batches, measure, layout)
    if not out:
        return {}
    chosen, rejected = (out[key] for key in REF_KEYS)
    return {i: (float(chosen[i]), float(rejected[i])) for i in chosen}


def attach(batch: dict, values: Callable[[list[int]], torch.Tensor]) -> dict:
    """Add ``ref_chosen_logps`` / ``ref_rejected_logps`` [P] (fp32) for the batch's pairs."""
    table = values(batch["example_ids"][0::2].tolist())
    batch[REF_KEYS[0]], batch[REF_KEYS[1]] = table[:, 0].contiguous(), table[:, 1].contiguous()
    return batch


# --- cached mode ----------------------------------------------------------------------------


class ReferenceTable:
    """Summed reference log-probs of every pair of one split: fp32 ``[N, 2]`` by dataset index
    (-inf for pairs that are not trained on)."""

    def __init__(self, logps: torch.Tensor, path: Path, reused: bool) -> None:
        self.logps, self.path, self.reused = logps, path, reused

    def lookup(self, ids: list[int]) -> torch.Tensor:
        values = self.logps[torch.as_tensor(ids, dtype=torch.long)]
        if not bool(torch.isfinite(values).all()):
            missing = [i for i, row in zip(ids, values) if not bool(torch.isfinite(row).all())]
            raise KeyError(f"{self.path}: no reference log-probs for pairs {missing}")
        return values


def checkpoint_fingerprint(path: str | None, model_cfg: Any, seed: int) -> dict:
    """What identifies reference weights: the resolved checkpoint directory and the size and
    mtime of each of its model files (optimizer and RNG state skipped; stat, not contents, so
    a multi-TB checkpoint costs nothing to key), or the random-initialisation settings."""
    if path is None:
        return {"init": {"model": _jsonable(model_cfg), "seed": seed}}
    from tulu3.checkpoint.load import resolve_checkpoint_dir

    root = resolve_checkpoint_dir(path).resolve()
    files = []
    for file in sorted(root.rglob("*")):
        rel = file.relative_to(root)
        if file.is_file() and rel.parts[0] not in ("optimizer", "rng"):
            stat = file.stat()
            files.append([str(rel), stat.st_size, stat.st_mtime_ns])
    return {"path": str(root), "files": files}


def cache_key(dataset_key: str, reference: dict, settings: dict) -> str:
    payload = {"version": CACHE_VERSION, "data": dataset_key, "reference": reference,
               **settings}
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_or_compute(path: Path, size: int, compute: Callable[[], torch.Tensor]
                    ) -> ReferenceTable:
    """Rank 0 reads ``path`` if it exists, else every rank joins ``compute()`` (which returns
    the full table on every rank) and rank 0 writes it; then rank 0's table is broadcast, so
    ranks on other nodes need not see the file. Collective."""
    rank = dist.get_rank()
    table = torch.full((size, 2), float("-inf"))
    found = torch.tensor([1.0 if rank == 0 and path.is_file() else 0.0])
    world_all_reduce(found, dist.ReduceOp.MAX)
    reused = bool(found.item())
    if reused:
        if rank == 0:
            saved = torch.load(path, weights_only=True)
            if tuple(saved["logps"].shape) != (size, 2):
                raise ValueError(f"{path}: holds {tuple(saved['logps'].shape)} values, the data "
                                 f"set has {size} pairs; delete the file to recompute")
            table = saved["logps"].float()
        world_all_reduce(table, dist.ReduceOp.MAX)  # a broadcast from rank 0 (others hold -inf)
    else:
        table = compute()
        if rank == 0:
            _save_atomic(path, table)
    dist.barrier()
    return ReferenceTable(table, path, reused)


def shard(indices: list[int], micro_batch: int, groups: ProcessGroups) -> list[list[int]]:
    """This DP rank's share of ``indices`` (every dp-th), cut into micro-batches."""
    mine = indices[groups.dp_rank::groups.dp_size]
    return [mine[i:i + micro_batch] for i in range(0, len(mine), micro_batch)]


def compute_table(chunks: list[torch.nn.Module], size: int, groups: list[list[int]],
                  collate: Callable[[list[list[int]]], list[dict]], expected: np.ndarray,
                  measure: ReferenceLogps, layout: ParallelLayout, label: str) -> torch.Tensor:
    """The pre-pass over this DP rank's micro-batches ``groups`` (positions ``collate``
    understands); returns the whole ``[size, 2]`` table on every rank, checked to hold every
    dataset index in ``expected``.

    Every DP rank runs the same number of micro-batches, a multiple of PP under the interleaved
    schedule (which needs that): a shorter list repeats its last one (the same pairs in the same
    micro-batch give the same values, which MAX leaves unchanged).
    """
    multiple = layout.micro_batch_multiple
    count = torch.tensor([float(len(groups))])
    world_all_reduce(count, dist.ReduceOp.MAX)
    count = -(-int(count.item()) // multiple) * multiple
    groups = list(groups) or [[0]]
    groups += [groups[-1]] * (count - len(groups))
    table = torch.full((size, 2), float("-inf"))
    block = -(-64 // multiple) * multiple  # micro-batches per schedule call (progress lines)
    started = time.monotonic()
    for start in range(0, count, block):
        values = reference_pass(chunks, collate(groups[start:start + block]), measure, layout)
        if values:
            ids = torch.as_tensor(list(values), dtype=torch.long)
            table[ids] = torch.tensor(list(values.values()), dtype=torch.float32)
        if count > block:
            done = min(start + block, count)
            log.info(f"dpo: reference log-probs ({label}) {done}/{count} micro-batches, "
                     f"{time.monotonic() - started:.0f} s")
    world_all_reduce(table, dist.ReduceOp.MAX)
    missing = torch.isinf(table[torch.as_tensor(expected, dtype=torch.long)]).any(dim=1)
    if bool(missing.any()):
        raise RuntimeError(f"reference pre-pass ({label}) left {int(missing.sum())} pairs "
                           "without log-probs")
    return table


@contextlib.contextmanager
def swapped_weights(chunks: list[torch.nn.Module], path: str, shape: Any,
                    groups: ProcessGroups) -> Iterator[None]:
    """Load the checkpoint ``path`` into the chunks for the duration of the block; the weights
    they held are kept on the host meanwhile and copied back afterwards."""
    from tulu3.checkpoint.load import load_into_chunks

    modules = [unwrap(chunk) for chunk in chunks]
    saved = [[p.detach().to("cpu", copy=True) for p in m.parameters()] for m in modules]
    load_into_chunks(path, modules, shape, groups)
    try:
        yield
    finally:
        with torch.no_grad():
            for module, params in zip(modules, saved, strict=True):
                for param, value in zip(module.parameters(), params, strict=True):
                    param.copy_(value)


def _save_atomic(path: Path, table: torch.Tensor) -> None:
    with atomic_open(path, "wb") as f:
        torch.save({"logps": table.clone(), "version": CACHE_VERSION}, f)


def world_all_reduce(tensor: torch.Tensor, op: dist.ReduceOp) -> None:
    """In place over the world (through the GPU when NCCL needs it)."""
    if not torch.cuda.is_available():
        dist.all_reduce(tensor, op=op)
        return
    device = tensor.cuda()
    dist.all_reduce(device, op=op)
    tensor.copy_(device.cpu())


def _jsonable(obj: Any) -> Any:
    import dataclasses

    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj

