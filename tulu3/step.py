"""One pass of micro-batches through megatron's pipeline schedule, and its metrics.

``run_schedule`` is shared by training steps (forward + backward), evaluation and the DPO/RLVR
log-prob pre-passes (``forward_only``). Metrics come back summed over micro-batches and
data-parallel ranks, identical on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func

from tulu3.data.packing import document_attention_mask
from tulu3.parallel.ddp import unwrap
from tulu3.parallel.layout import ParallelLayout
from tulu3.stages.base import Stage


def prepare(batch: dict, multiple: int = 1) -> dict:
    """Right-pad [b, s] tensors to a multiple of ``multiple`` and move them to the GPU if any."""
    seq = batch["tokens"].shape[1]
    extra = -seq % multiple
    if extra:
        fill = {"tokens": 0, "labels": -100, "position_ids": 0, "seq_ids": -1}
        batch = dict(batch)
        for key, value in fill.items():
            if key in batch:
                batch[key] = torch.nn.functional.pad(batch[key], (0, extra), value=value)
        for key in ("loss_mask", "old_logprobs", "ref_logprobs", "advantages", "returns",
                    "old_values"):
            if key in batch and batch[key].dim() == 2:
                batch[key] = torch.nn.functional.pad(batch[key], (0, extra), value=0)
    if not torch.cuda.is_available():
        return batch
    return {k: v.cuda(non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def attention_mask(batch: dict) -> torch.Tensor | None:
    """None for one document per row (plain causal); a per-document mask for packed rows.

    Shape [b, 1, s, s], True = masked out (megatron's convention).
    """
    seq_ids = batch["seq_ids"]
    one_doc_per_row = bool(((seq_ids == seq_ids[:, :1]) | (seq_ids < 0)).all())
    # Right padding after one document needs no mask: causal attention never reaches it.
    return None if one_doc_per_row else document_attention_mask(seq_ids)


def _forward_step(stage: Stage, loss_hook: Callable | None, multiple: int, data_iterator,
                  model):
    batch = prepare(next(data_iterator), multiple)
    output = model(batch["tokens"], batch["position_ids"], attention_mask(batch),
                   return_hidden=stage.uses_hidden)

    def loss_func(output_tensor: torch.Tensor):
        loss_sum, normalizer, metrics = stage.loss(batch, output_tensor, unwrap(model))
        if loss_hook is not None:
            loss_hook(batch, loss_sum, metrics)
        return loss_sum, normalizer, metrics

    return output, loss_func


def run_schedule(chunks: list[torch.nn.Module], micro_batches: list[dict], stage: Stage,
                 layout: ParallelLayout, forward_only: bool = False,
                 loss_hook: Callable | None = None) -> dict[str, float]:
    """Forward (and backward) every micro-batch of this DP rank; returns reduced metrics.

    ``loss_hook(batch, loss_sum, metrics)`` runs on the last pipeline stage for each micro-batch
    (NaN checks, caching reference log-probs).
    """
    multiple = layout.pad_multiple
    seq = max(-(-int(mb["tokens"].shape[1]) // multiple) * multiple for mb in micro_batches)
    forward_backward = get_forward_backward_func()
    iterators = [iter(micro_batches) for _ in chunks]
    store = forward_backward(
        forward_step_func=partial(_forward_step, stage, loss_hook, multiple),
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(micro_batches),
        seq_length=seq,
        micro_batch_size=int(micro_batches[0]["tokens"].shape[0]),
        forward_only=forward_only,
    )
    tokens = sum(int((mb["seq_ids"] >= 0).sum()) for mb in micro_batches)
    return reduce_metrics(store, stage.metric_names, layout, tokens)


def reduce_metrics(store: list[dict], names: tuple[str, ...], layout: ParallelLayout,
                   local_tokens: int = 0) -> dict[str, float]:
    """Sum (sum, count) pairs over micro-batches and all ranks; value = sum / count.

    Only last-stage ranks hold metrics; several ranks of one replica hold the same values
    (:attr:`ParallelLayout.metric_copies`: tp x cp), so the world-wide sum is divided by their
    number. A count of 0 marks a total. ``tokens`` (the
    non-padding input tokens of the step) is counted on every rank of a replica, so it is also
    divided by pp.
    """
    totals = torch.zeros(len(names) + 1, 2, dtype=torch.float64)
    for item in store:
        for index, name in enumerate(names):
            totals[index] += item[name].double().cpu()
    totals[-1, 0] = local_tokens / layout.pp
    if dist.is_initialized() and dist.get_world_size() > 1:
        if torch.cuda.is_available():
            totals = totals.cuda()
        dist.all_reduce(totals)
        totals = totals.cpu() / layout.metric_copies
    out = {}
    for index, name in enumerate((*names, "tokens")):
        total, count = totals[index].tolist()
        out[name] = total / count if count else total
    out["tokens"] = int(round(out["tokens"]))
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    value = torch.tensor([1.0 if flag else 0.0])
    if torch.cuda.is_available():
        value = value.cuda()
    dist.all_reduce(value)
    return bool(value.item() > 0)


class NonFiniteLoss(RuntimeError):
    """The loss of a step is NaN or inf; the message names the step, micro-batch and rank."""


def train_step(chunks: list[torch.nn.Module], optimizer, scheduler, micro_batches: list[dict],
               stage: Stage, layout: ParallelLayout, step: int = 0,
               skip_nonfinite: bool = False) -> dict[str, float]:
    """Zero grads, forward + backward every micro-batch, clip, AdamW step, advance the LR.

    Returns the stage's metrics plus ``grad_norm``, ``lr`` and ``skipped`` (True when the loss
    was not finite and ``skip_nonfinite`` dropped the update). A non-finite loss otherwise
    raises :class:`NonFiniteLoss` on every rank, before the optimizer touches the weights.
    """
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    bad: list[str] = []

    def check(batch: dict, loss_sum: torch.Tensor, metrics: dict) -> None:
        if not torch.isfinite(loss_sum.detach()).all():
            rank = dist.get_rank() if dist.is_initialized() else 0
            bad.append(f"micro-batch {len(bad)} (examples {batch['example_ids'].tolist()}) on "
                       f"rank {rank}: loss {float(loss_sum)}")

    metrics = run_schedule(chunks, micro_batches, stage, layout, loss_hook=check)
    lr = optimizer.param_groups[0]["lr"]
    if any_rank(bool(bad) or not math.isfinite(metrics.get("loss", 0.0))):
        if not skip_nonfinite:
            where = "; ".join(bad) or "reported by another rank"
            raise NonFiniteLoss(f"step {step}: non-finite loss ({where}); set "
                                "train.skip_nan=true to skip such steps")
        scheduler.step(increment=1)
        return {**metrics, "grad_norm": float("nan"), "lr": lr, "skipped": True}
    update_ok, grad_norm, _ = optimizer.step()
    scheduler.step(increment=1)
    metrics.update(grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                   lr=lr, skipped=not update_ok)
    return metrics
