"""Tensor-parallel combination of per-shard softmax statistics, and log-probs from sharded logits.

Under Megatron's tensor parallelism the output layer is a ColumnParallelLinear: rank ``r`` holds
the rows ``[vocab_start, vocab_start + v_local)`` of the output weight and computes only those
logits. Log-softmax needs the whole row, but only through three numbers per token (see
``softmax_stats.py``), so each rank reduces its shard and two all-reduces combine them
(a MAX for the log-sum-exp's shift, then one packed SUM); the vocabulary is never gathered.

``tp_group=None`` means "no tensor parallelism" (not the default world group), so single-process
callers need no process group at all.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from kernels.softmax_stats import TORCH_OPS, ShardStats

IGNORE_INDEX = -100


def tp_size(group: dist.ProcessGroup | None) -> int:
    """Ranks in the tensor-parallel group; 1 when there is none."""
    return 1 if group is None else dist.get_world_size(group)


def local_labels(labels: Tensor, vocab_start: int, v_local: int) -> Tensor:
    """GLOBAL vocab ids [n] -> ids local to this shard; -1 where the label is elsewhere/ignored."""
    local = labels - vocab_start
    keep = (labels != IGNORE_INDEX) & (local >= 0) & (local < v_local)
    return torch.where(keep, local, torch.full_like(local, -1))


def all_reduce_stats(stats: ShardStats, group: dist.ProcessGroup | None) -> ShardStats:
    """Combine each rank's shard statistics into whole-vocabulary statistics (same on all ranks).

    Not differentiable by itself: the autograd Functions that call it write their gradient
    analytically from the global statistics (softmax_stats.tile_grad), which is why no
    gradient needs to flow back through these collectives.
    """
    if tp_size(group) == 1:
        return stats
    shift = stats.lse.clone()
    dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=group)
    # exp(lse_r - max) <= 1 on every rank: the sum cannot overflow, and the max shard gives >= 1
    weight = torch.exp(stats.lse - shift)
    parts = [weight, stats.target]
    if stats.mean_logit is not None:
        parts.append(weight * stats.mean_logit)
    packed = torch.stack(parts)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    lse = shift + torch.log(packed[0])
    mean = packed[2] / packed[0] if stats.mean_logit is not None else None
    return ShardStats(lse, packed[1], mean)


def outputs_from_stats(stats: ShardStats, ignore: Tensor) -> tuple[Tensor, Tensor | None]:
    """Global stats -> (logprobs, entropy | None), fp32, 0.0 where ``ignore`` is True."""
    zero = torch.zeros_like(stats.lse)
    logprobs = torch.where(ignore, zero, stats.target - stats.lse)
    entropy = None
    if stats.mean_logit is not None:
        entropy = torch.where(ignore, zero, stats.lse - stats.mean_logit)
    return logprobs, entropy


def masked_upstream(grad: Tensor | None, ignore: Tensor) -> Tensor | None:
    """Upstream gradient [n] as fp32 with ignored rows zeroed; None stays None."""
    if grad is None:
        return None
    grad = grad.float()
    return torch.where(ignore, torch.zeros_like(grad), grad)


class _AllReduceGrad(torch.autograd.Function):
    """Identity forward, gradient summed over the group in the backward.

    Megatron's ``copy_to_tensor_model_parallel_region``: a replicated input feeding per-rank
    vocabulary shards gets the gradient of the whole loss.
    """

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()  # all_reduce works in place on a dense tensor
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_grad(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """``x`` unchanged; its gradient is summed over ``group`` (no-op without TP)."""
    return x if tp_size(group) == 1 else _AllReduceGrad.apply(x, group)


class _VocabParallelLogprobs(torch.autograd.Function):
    """logits [n, v_local] (this rank's shard) -> (logprobs [n], entropy [n] | None)."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, group: dist.ProcessGroup | None,
                vocab_start: int, with_entropy: bool) -> tuple[Tensor, Tensor | None]:
        ctx.set_materialize_grads(False)
        local = local_labels(labels, vocab_start, logits.shape[-1])
        stats = all_reduce_stats(TORCH_OPS.stats(logits, local, with_entropy), group)
        ignore = labels == IGNORE_INDEX
        ctx.save_for_backward(logits, local, ignore, stats.lse,
                              stats.mean_logit if with_entropy else None)
        return outputs_from_stats(stats, ignore)

    @staticmethod
    def backward(ctx, grad_logprobs: Tensor | None, grad_entropy: Tensor | None):
        logits, local, ignore, lse, mean = ctx.saved_tensors
        g = masked_upstream(grad_logprobs, ignore)
        e = masked_upstream(grad_entropy, ignore)
        if g is None and e is None:
            return None, None, None, None, None
        g = torch.zeros_like(lse) if g is None else g
        # each rank's logits grad is its own shard: no collective needed in the backward
        grad = TORCH_OPS.grad(logits, local, lse, mean, g, e)
        return grad, None, None, None, None


def vocab_parallel_logprobs(logits: Tensor, labels: Tensor, *,
                            tp_group: dist.ProcessGroup | None = None, vocab_start: int = 0,
                            with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """Log-probs of ``labels`` (and the entropy) from tensor-parallel sharded logits.

    Args:
        logits: ``[..., v_local]`` any float dtype: this rank's vocabulary shard, covering global
            ids ``[vocab_start, vocab_start + v_local)``; the math runs in fp32.
        labels: ``[...]`` int64 GLOBAL vocab ids; ``-100`` marks positions to ignore.
        tp_group: the tensor-parallel group the vocabulary is split over; None = not split.
        vocab_start: first global id of this rank's shard.
        with_entropy: also return the entropy of the full-vocabulary softmax.

    Returns:
        ``(logprobs, entropy)``: fp32 ``[...]``, 0.0 at ignored positions; entropy is None
        unless requested. Identical on every rank of ``tp_group``. Differentiable w.r.t.
        ``logits`` (each rank gets the gradient of its own shard).
    """
    shape = labels.shape
    flat = logits.reshape(labels.numel(), logits.shape[-1])  # -1 is ambiguous when v_local = 0
    logprobs, entropy = _VocabParallelLogprobs.apply(flat, labels.reshape(-1), tp_group,
                                                     vocab_start, with_entropy)
    return logprobs.reshape(shape), None if entropy is None else entropy.reshape(shape)
