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
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func

from tulu3.data.packing import document_attention_mask, has_packed_rows, packed_seq_params
from tulu3.metrics.profiling import phase
from tulu3.parallel.context import gather_sequence, slice_batch_for_cp_rank
from tulu3.parallel.ddp import unwrap
from tulu3.parallel.groups import ProcessGroups
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


def attention_inputs(batch: dict, packed_format: str, cp: int
                     ) -> tuple[PackedSeqParams | None, torch.Tensor | None]:
    """``(packed_seq_params, attention_mask)`` of a whole (not CP-sliced) micro-batch for a spec
    that takes packed rows as ``packed_format`` (tulu3.model.specs.PACKED_FORMATS).

    One document per row needs neither (plain causal), except under CP with the torch spec,
    whose attention then masks by global position. Raises ValueError for what a format cannot
    take (THD with several rows: Megatron-LM feeds TE one packed row per micro-batch).
    """
    seq_ids = batch["seq_ids"]
    packed = has_packed_rows(seq_ids)
    if packed_format == "mask":
        if cp > 1:
            raise ValueError("model.spec=local does not support parallel.cp > 1")
        return None, document_attention_mask(seq_ids) if packed else None
    if packed_format == "thd":
        if not packed:
            return None, None
        if cp > 1 or seq_ids.shape[0] != 1:
            raise ValueError("model.spec=te takes packed rows as THD: one row per micro-batch "
                             "(train.micro_batch=1) and parallel.cp=1")
        return packed_seq_params(seq_ids, "thd"), None
    if packed or cp > 1:
        return packed_seq_params(seq_ids, "sbhd"), None
    return None, None


def _forward_step(stage: Stage, loss_hook: Callable | None, multiple: int,
                  cp_group: dist.ProcessGroup | None, data_iterator, model):
    batch = prepare(next(data_iterator), multiple)
    inner = unwrap(model)
    cp = cp_group.size() if cp_group is not None else 1
    params, mask = attention_inputs(batch, inner.packed_format, cp)
    local = slice_batch_for_cp_rank(batch, cp, cp_group.rank() if cp > 1 else 0)
    output = model(local["tokens"], local["position_ids"], mask, packed_seq_params=params,
                   return_hidden=stage.uses_hidden)
    if cp > 1 and inner.post_process and not stage.uses_hidden:
        # The loss sees the whole micro-batch: every CP rank computes the same loss from the
        # gathered output, and each keeps the gradient of its own slice. Hidden states stay
        # sliced: the fused log-probs gather per token (tulu3.stages.logprobs), so the output
        # weight they multiply sees each token once.
        output = gather_sequence(output, 1, cp_group)

    def loss_func(output_tensor: torch.Tensor):
        loss_sum, normalizer, metrics = stage.loss(batch, output_tensor, inner)
        if loss_hook is not None:
            loss_hook(batch, loss_sum, metrics)
        # megatron sums gradients and normalizers over the CP ranks too (finalize_model_grads):
        # the CP copies of one loss count once (megatron scales its own losses by cp alike).
        return loss_sum * cp, normalizer, metrics

    return output, loss_func


def run_schedule(chunks: list[torch.nn.Module], micro_batches: list[dict], stage: Stage,
                 layout: ParallelLayout, forward_only: bool = False,
                 loss_hook: Callable | None = None,
                 groups: ProcessGroups | None = None) -> dict[str, float]:
    """Forward (and backward) every micro-batch of this DP rank; returns reduced metrics.

    ``loss_hook(batch, loss_sum, metrics)`` runs on the last pipeline stage for each micro-batch
    (NaN checks, caching reference log-probs). Under CP each rank feeds the model its slice of
    every micro-batch (tulu3.parallel.context); ``groups`` (read from megatron when None) gives
    the CP group.
    """
    multiple = layout.pad_multiple
    seq = max(-(-int(mb["tokens"].shape[1]) // multiple) * multiple for mb in micro_batches)
    cp_group = None
    if layout.cp > 1:
        cp_group = (groups or ProcessGroups.current()).cp
    forward_backward = get_forward_backward_func()
    iterators = [iter(micro_batches) for _ in chunks]
    store = forward_backward(
        forward_step_func=partial(_forward_step, stage, loss_hook, multiple, cp_group),
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(micro_batches),
        seq_length=seq // layout.cp,
        micro_batch_size=int(micro_batches[0]["tokens"].shape[0]),
        forward_only=forward_only,
    )
    tokens = sum(int((mb["seq_ids"] >= 0).sum()) for mb in micro_batches)
    return reduce_metrics(store, stage.metric_names, layout, tokens)


def reduce_metrics(store: list[dict], names: tuple[str, ...], layout: ParallelLayout,
                   local_tokens: int = 0) -> dict[str, float]:
    """Sum (sum, count) pairs over micro-batches and all ranks; value = sum / count.

    Only last-stage ranks hold metrics; several ranks of one replica hold the same values
    (:attr:`ParallelLayout.metric_copies`: tp x cp; CP ranks compute the loss of the whole
    micro-batch from the gathered output), so the world-wide sum is divided by their number.
    A count of 0 marks a total. ``tokens`` (the non-padding input tokens of the step) is
    counted on every rank of a replica, so it is also divided by pp.
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
    with phase("optimizer"):
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
    bad: list[str] = []

    def check(batch: dict, loss_sum: torch.Tensor, metrics: dict) -> None:
        if not torch.isfinite(loss_sum.detach()).all():
            rank = dist.get_rank() if dist.is_initialized() else 0
            bad.append(f"micro-batch {len(bad)} (examples {batch['example_ids'].tolist()}) on "
                       f"rank {rank}: loss {float(loss_sum)}")

    with phase("forward_backward"):
        metrics = run_schedule(chunks, micro_batches, stage, layout, loss_hook=check)
    lr = optimizer.param_groups[0]["lr"]
    if any_rank(bool(bad) or not math.isfinite(metrics.get("loss", 0.0))):
        if not skip_nonfinite:
            where = "; ".join(bad) or "reported by another rank"
            raise NonFiniteLoss(f"step {step}: non-finite loss ({where}); set "
                                "train.skip_nan=true to skip such steps")
        scheduler.step(increment=1)
        return {**metrics, "grad_norm": float("nan"), "lr": lr, "skipped": True}
    with phase("optimizer"):
        update_ok, grad_norm, _ = optimizer.step()
    scheduler.step(increment=1)
    metrics.update(grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                   lr=lr, skipped=not update_ok)
    return metrics
