"""Context parallelism (CP): each sequence split over the CP ranks, load-balanced.

The Llama 3 recipe (Llama 3 paper, section 3.3.2) and Megatron-LM's ``get_batch_on_this_cp_rank``:
a row of ``s`` tokens is cut into ``2 x cp`` equal chunks and CP rank ``r`` holds chunks ``r`` and
``2 x cp - 1 - r``, so every rank gets the same share of causal-attention work. Here:

- :func:`cp_positions` / :func:`gathered_positions`: which row positions a rank holds, and the
  row positions of K / V after they are all-gathered over the CP group (rank order).
- :func:`slice_batch_for_cp_rank`: the ONE batch slicer, for every spec and stage: every
  per-token tensor ``[b, s]`` of the micro-batch is cut the same way.
- :func:`gather_sequence`: all-gather over CP along a sequence dimension, back in row order; its
  backward keeps this rank's slice of the gradient (each CP rank computes the same loss from the
  gathered tensor, so the gradient is already complete on every rank).
- :func:`gather_kv`: all-gather of K / V for attention; its backward reduce-scatters (sums) the
  gradients, because every rank's queries used every rank's keys.

Process groups are passed in explicitly; nothing here reads megatron's globals.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

PER_TOKEN_KEYS = ("tokens", "labels", "position_ids", "seq_ids", "loss_mask", "old_logprobs",
                  "ref_logprobs", "advantages", "returns", "old_values", "response_mask",
                  "rewards", "values", "entropy")
"""Micro-batch keys that hold one value per token ([b, s]); any other tensor whose second
dimension is ``s`` makes :func:`slice_batch_for_cp_rank` raise, so a new per-token key cannot be
left unsliced by mistake."""


def cp_positions(seq: int, cp: int, rank: int, device: torch.device | None = None
                 ) -> torch.Tensor:
    """Row positions held by CP ``rank``: chunks ``rank`` and ``2 cp - 1 - rank`` of ``2 cp``.

    Returns int64 [seq // cp]. ``seq`` must divide by ``2 cp`` (tulu3.step pads rows to
    :attr:`ParallelLayout.pad_multiple`).
    """
    if seq % (2 * cp):
        raise ValueError(f"sequence length {seq} does not divide by 2 x cp = {2 * cp}")
    chunk = seq // (2 * cp)
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    second = torch.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk, device=device)
    return torch.cat([first, second])


def gathered_positions(seq: int, cp: int, device: torch.device | None = None) -> torch.Tensor:
    """Row positions of a tensor all-gathered over CP in rank order: int64 [seq]."""
    return torch.cat([cp_positions(seq, cp, rank, device) for rank in range(cp)])


def slice_batch_for_cp_rank(batch: dict, cp: int, rank: int) -> dict:
    """This CP rank's share of a micro-batch: every per-token [b, s] tensor indexed by
    :func:`cp_positions`; everything else (example ids, per-sequence values) unchanged.

    Raises ValueError for a [b, s] tensor that is not in :data:`PER_TOKEN_KEYS`.
    """
    if cp == 1:
        return batch
    rows, seq = batch["tokens"].shape
    index = cp_positions(seq, cp, rank, batch["tokens"].device)
    out = {}
    for key, value in batch.items():
        per_token = torch.is_tensor(value) and value.dim() == 2 and value.shape == (rows, seq)
        if per_token and key not in PER_TOKEN_KEYS:
            raise ValueError(f"micro-batch key {key!r} has the shape of a per-token tensor "
                             f"{tuple(value.shape)}: add it to tulu3.parallel.context."
                             "PER_TOKEN_KEYS (or give it another shape)")
        out[key] = value.index_select(1, index) if per_token else value
    return out


def gather_sequence(tensor: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """All-gather this rank's slice (sequence dimension ``dim``) over the CP ``group`` and
    return the whole row in row order. Backward: this rank's slice of the gradient (no sum)."""
    cp = group.size()
    if cp == 1:
        return tensor
    moved = tensor.movedim(dim, 0)
    gathered = gather_from_sequence_parallel_region(moved, tensor_parallel_output_grad=False,
                                                    group=group)
    order = torch.argsort(gathered_positions(gathered.shape[0], cp, gathered.device))
    return gathered.index_select(0, order).movedim(0, dim)


def gather_kv(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-gather K or V ([s_local, b, groups, d], megatron's layout) over the CP ``group`` in
    rank order (row positions :func:`gathered_positions`). Backward: reduce-scatter. No group
    (or one rank): ``tensor`` itself."""
    if group is None or group.size() == 1:
        return tensor
    return gather_from_sequence_parallel_region(tensor, tensor_parallel_output_grad=True,
                                                group=group)
