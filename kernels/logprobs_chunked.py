"""Fused linear + log-softmax + gather (+ entropy) that never materializes ``[n, vocab]`` logits.

The vocabulary shard is walked in chunks (outer loop) and the tokens in chunks (inner loop). Each
``[token_chunk, vocab_chunk]`` tile of logits is computed with one matmul in the inputs' dtype,
reduced to three numbers per token by a backend's tile operations (``softmax_stats.TileOps``:
plain PyTorch here, Triton in ``logprobs_triton.py``), and merged into running statistics with
the online log-sum-exp. Tensor-parallel shards are then combined with all-reduces
(``vocab_parallel.all_reduce_stats``).

The backward recomputes every tile (one more matmul: cheaper than storing ``n x vocab``), turns
it into the gradient of the logits with the global statistics, and accumulates the two matmuls
``grad_hidden += grad_z @ W_chunk`` (fp32, all-reduced over the TP group at the end) and
``grad_weight[chunk] = grad_z.T @ hidden`` (fp32 across token chunks). Vocab-outer order keeps
the weight-gradient accumulator one chunk big; only ``grad_hidden`` is held whole in fp32.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from kernels.softmax_stats import (
    TORCH_OPS,
    ShardStats,
    TileOps,
    empty_stats,
    merge_stats,
)
from kernels.vocab_parallel import (
    IGNORE_INDEX,
    all_reduce_stats,
    local_labels,
    masked_upstream,
    outputs_from_stats,
    tp_size,
)


def chunk_sizes(n: int, v: int, budget: int, min_vocab_chunk: int) -> tuple[int, int]:
    """(token_chunk, vocab_chunk) so that one logits tile holds about ``budget`` elements.

    All tokens in one chunk when possible (the fewest weight-gradient accumulations), the vocab
    chunk shrunk to fit, but not below ``min_vocab_chunk`` (matmuls stay large).
    """
    vocab_chunk = max(1, min(v, max(budget // max(n, 1), min_vocab_chunk)))
    token_chunk = max(1, min(n, budget // vocab_chunk))
    return token_chunk, vocab_chunk


def _spans(total: int, chunk: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk, total)) for start in range(0, total, chunk)]


def forward_stats(hidden: Tensor, weight: Tensor, labels: Tensor, ops: TileOps,
                  token_chunk: int, vocab_chunk: int, with_entropy: bool) -> ShardStats:
    """Shard statistics of ``hidden @ weight.T`` without materializing it.

    hidden ``[n, h]``, weight ``[v, h]`` (same float dtype), labels ``[n]`` int64 local to the
    shard (-1 = not here). Returns fp32 ``[n]`` statistics over this shard's vocabulary.
    """
    n = hidden.shape[0]
    if n == 0 or weight.shape[0] == 0:
        return empty_stats(n, with_entropy, hidden.device)
    running: ShardStats | None = None
    for v0, v1 in _spans(weight.shape[0], vocab_chunk):
        w = weight[v0:v1]
        parts = [ops.stats(hidden[t0:t1] @ w.T, labels[t0:t1] - v0, with_entropy)
                 for t0, t1 in _spans(n, token_chunk)]
        chunk = ShardStats(*(None if p[0] is None else torch.cat(p) for p in zip(*parts)))
        running = chunk if running is None else merge_stats(running, chunk)
    return running


def backward_grads(hidden: Tensor, weight: Tensor, labels: Tensor, stats: ShardStats,
                   grad_logprob: Tensor, grad_entropy: Tensor | None, ops: TileOps,
                   token_chunk: int, vocab_chunk: int, need_hidden: bool,
                   need_weight: bool) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of ``sum(g * logprob + e * entropy)`` w.r.t. hidden and weight (this shard only).

    ``stats`` are the GLOBAL statistics (after the TP all-reduce). Returns ``grad_hidden`` fp32
    ``[n, h]`` (this shard's contribution: not yet summed over TP ranks) and ``grad_weight``
    ``[v, h]`` in weight's dtype; either is None when not needed.
    """
    n = hidden.shape[0]
    grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) \
        if need_hidden else None
    if n == 0:  # no token chunk would write the weight gradient
        return grad_hidden, torch.zeros_like(weight) if need_weight else None
    grad_weight = torch.empty_like(weight) if need_weight else None
    for v0, v1 in _spans(weight.shape[0], vocab_chunk):
        w = weight[v0:v1]
        acc = None  # fp32 [vocab_chunk, h] only when there is more than one token chunk
        for t0, t1 in _spans(n, token_chunk):
            h = hidden[t0:t1]
            mean = None if stats.mean_logit is None else stats.mean_logit[t0:t1]
            ge = None if grad_entropy is None else grad_entropy[t0:t1]
            grad_z = ops.grad(h @ w.T, labels[t0:t1] - v0, stats.lse[t0:t1], mean,
                              grad_logprob[t0:t1], ge)
            if need_hidden:
                grad_hidden[t0:t1].add_(grad_z @ w)
            if need_weight:
                part = grad_z.T @ h
                if t1 - t0 == n:
                    grad_weight[v0:v1] = part
                else:
                    acc = part.float() if acc is None else acc.add_(part)
        if need_weight and acc is not None:
            grad_weight[v0:v1] = acc
    return grad_hidden, grad_weight


class LinearLogprobs(torch.autograd.Function):
    """(hidden [n, h], weight [v_local, h], labels [n]) -> (logprobs [n], entropy [n] | None).

    ``ops`` chooses the tile backend; the chunking and the tensor-parallel combination are
    shared by all backends. See ``kernels.linear_logprobs`` for the semantics.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor,
                group: dist.ProcessGroup | None, vocab_start: int, with_entropy: bool,
                ops: TileOps, token_chunk: int, vocab_chunk: int) -> tuple[Tensor, Tensor | None]:
        ctx.set_materialize_grads(False)
        local = local_labels(labels, vocab_start, weight.shape[0])
        stats = forward_stats(hidden, weight, local, ops, token_chunk, vocab_chunk, with_entropy)
        stats = all_reduce_stats(stats, group)
        ignore = labels == IGNORE_INDEX
        ctx.save_for_backward(hidden, weight, local, ignore, stats.lse, stats.mean_logit)
        ctx.config = (group, ops, token_chunk, vocab_chunk)
        return outputs_from_stats(stats, ignore)

    @staticmethod
    def backward(ctx, grad_logprobs: Tensor | None, grad_entropy: Tensor | None):
        hidden, weight, local, ignore, lse, mean = ctx.saved_tensors
        group, ops, token_chunk, vocab_chunk = ctx.config
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        g = masked_upstream(grad_logprobs, ignore)
        e = masked_upstream(grad_entropy, ignore)
        if (g is None and e is None) or not (need_hidden or need_weight):
            return (None,) * 9
        g = torch.zeros_like(lse) if g is None else g
        grad_hidden, grad_weight = backward_grads(
            hidden, weight, local, ShardStats(lse, None, mean), g, e, ops, token_chunk,
            vocab_chunk, need_hidden, need_weight)
        if grad_hidden is not None:
            if tp_size(group) > 1:
                # the loss depends on hidden through every rank's shard: sum the contributions
                dist.all_reduce(grad_hidden, group=group)
            grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def linear_logprobs_chunked(hidden: Tensor, weight: Tensor, labels: Tensor, *,
                            tp_group: dist.ProcessGroup | None = None, vocab_start: int = 0,
                            with_entropy: bool = False, ops: TileOps = TORCH_OPS,
                            token_chunk: int | None = None, vocab_chunk: int | None = None,
                            tile_budget: int = 1 << 22) -> tuple[Tensor, Tensor | None]:
    """``kernels.linear_logprobs`` with an explicit tile backend and chunk sizes.

    hidden ``[..., h]``, labels ``[...]``; chunk sizes default to :func:`chunk_sizes` with
    ``tile_budget`` elements per logits tile. Returns fp32 ``[...]`` tensors.
    """
    shape = labels.shape
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden is {hidden.dtype} but weight is {weight.dtype}")
    default_t, default_v = chunk_sizes(hidden.shape[0], weight.shape[0], tile_budget, 1024)
    logprobs, entropy = LinearLogprobs.apply(
        hidden, weight, labels, tp_group, vocab_start, with_entropy, ops,
        token_chunk or default_t, vocab_chunk or default_v)
    return logprobs.reshape(shape), None if entropy is None else entropy.reshape(shape)
