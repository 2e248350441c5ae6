"""Per-shard softmax statistics of a logits tile, how to merge them, and the tile's gradient.

Every log-prob path in ``kernels/`` (chunked PyTorch, Triton, vocab-parallel logits) is built
from three facts about one row ``z`` of logits restricted to a slice of the vocabulary:

- ``lse``: ``log(sum_j exp(z_j))`` over the slice,
- ``target``: ``z[label]`` when the label falls in the slice, else 0,
- ``mean_logit``: ``sum_j softmax(z)_j * z_j`` over the slice (only for the entropy).

Statistics of two disjoint slices merge exactly (:func:`merge_stats`: the online log-sum-exp), so
a vocabulary can be walked in chunks, and shards on different tensor-parallel ranks combine the
same way. From the merged (global) statistics:
``logprob = target - lse`` and ``entropy = lse - mean_logit``.

The gradient of ``g * logprob + e * entropy`` with respect to the logits is, per row,
``g * (onehot(label) - p) + e * p * (mean_logit - z)`` with ``p = exp(z - lse)`` (global lse);
:func:`tile_grad` computes it for one tile. The functions here are the plain PyTorch version of
the two tile operations; ``logprobs_triton.py`` provides the same two with Triton kernels.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
from torch import Tensor


class ShardStats(NamedTuple):
    """Softmax statistics of rows of logits over one vocabulary slice; each is fp32 ``[rows]``."""

    lse: Tensor
    target: Tensor
    mean_logit: Tensor | None  # None when the entropy is not wanted


class TileOps(Protocol):
    """The two operations a backend provides on a logits tile ``[rows, cols]``.

    ``labels`` are tile-local (``label - first column of the tile``); a value outside
    ``[0, cols)`` means "the label is not in this tile".
    """

    def stats(self, logits: Tensor, labels: Tensor, with_entropy: bool) -> ShardStats: ...

    def grad(self, logits: Tensor, labels: Tensor, lse: Tensor, mean_logit: Tensor | None,
             grad_logprob: Tensor, grad_entropy: Tensor | None) -> Tensor: ...


def merge_stats(a: ShardStats, b: ShardStats) -> ShardStats:
    """Statistics of the union of two disjoint vocabulary slices (the online log-sum-exp)."""
    lse = torch.logaddexp(a.lse, b.lse)
    mean = None
    if a.mean_logit is not None and b.mean_logit is not None:
        # each slice's mean is normalized by its own sum-exp: reweight by its share of the total
        mean = torch.exp(a.lse - lse) * a.mean_logit + torch.exp(b.lse - lse) * b.mean_logit
    return ShardStats(lse, a.target + b.target, mean)


def empty_stats(rows: int, with_entropy: bool, device: torch.device) -> ShardStats:
    """Statistics of an empty vocabulary slice (a TP rank whose shard is all padding):
    ``exp(lse) = 0``, so it drops out of :func:`merge_stats` and the TP all-reduce."""
    lse = torch.full((rows,), float("-inf"), device=device)
    zero = torch.zeros(rows, device=device)
    return ShardStats(lse, zero, zero.clone() if with_entropy else None)


def in_tile(labels: Tensor, cols: int) -> Tensor:
    """Bool ``[rows]``: which tile-local labels fall inside ``[0, cols)``."""
    return (labels >= 0) & (labels < cols)


class TorchTileOps:
    """The tile operations in plain PyTorch (fp32 math; allocates a few fp32 copies of the tile)."""

    def stats(self, logits: Tensor, labels: Tensor, with_entropy: bool) -> ShardStats:
        """``logits`` [rows, cols] any float dtype, ``labels`` [rows] int64 -> fp32 stats."""
        if logits.shape[-1] == 0:
            return empty_stats(logits.shape[0], with_entropy, logits.device)
        z = logits.float()
        row_max = z.amax(dim=-1, keepdim=True)
        e = torch.sub(z, row_max).exp_()
        sum_exp = e.sum(dim=-1)
        lse = row_max.squeeze(-1) + torch.log(sum_exp)
        mean = None
        if with_entropy:  # row-wise dot product as a batched matmul: no tile-sized temporary
            mean = (e.unsqueeze(-2) @ z.unsqueeze(-1)).view(-1) / sum_exp
        return ShardStats(lse, gather_target(z, labels), mean)

    def grad(self, logits: Tensor, labels: Tensor, lse: Tensor, mean_logit: Tensor | None,
             grad_logprob: Tensor, grad_entropy: Tensor | None) -> Tensor:
        """Gradient of ``sum(g * logprob + e * entropy)`` w.r.t. ``logits``, in logits' dtype.

        ``lse`` and ``mean_logit`` are the GLOBAL statistics (whole vocabulary), fp32 [rows];
        ``grad_logprob`` / ``grad_entropy`` are the upstream gradients, fp32 [rows].
        """
        if logits.shape[-1] == 0:
            return torch.zeros_like(logits)
        z = logits.float()
        p = torch.sub(z, lse.unsqueeze(-1)).exp_()
        entropy_term = None
        if grad_entropy is not None:
            entropy_term = torch.sub(mean_logit.unsqueeze(-1), z)
            entropy_term.mul_(grad_entropy.unsqueeze(-1)).mul_(p)
        grad = p.mul_(-grad_logprob.unsqueeze(-1))  # in place: p is no longer needed
        if entropy_term is not None:
            grad.add_(entropy_term)
        # + g at the label, for rows whose label is in this tile (a scatter: no host sync)
        hit = in_tile(labels, z.shape[-1])
        safe = torch.where(hit, labels, torch.zeros_like(labels)).unsqueeze(-1)
        at_label = torch.where(hit, grad_logprob, torch.zeros_like(grad_logprob)).unsqueeze(-1)
        grad.scatter_add_(-1, safe, at_label)
        return grad.to(logits.dtype)


def gather_target(z: Tensor, labels: Tensor) -> Tensor:
    """``z[row, label]`` where the label is in the tile, else 0; fp32 [rows]."""
    hit = in_tile(labels, z.shape[-1])
    safe = torch.where(hit, labels, torch.zeros_like(labels))
    target = z.gather(-1, safe.unsqueeze(-1)).squeeze(-1).float()
    return torch.where(hit, target, torch.zeros_like(target))


TORCH_OPS = TorchTileOps()
