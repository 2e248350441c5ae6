"""Wrap model chunks in megatron's DistributedDataParallel and wire the schedule's hooks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads

from tulu3.parallel.layout import ParallelLayout


@dataclass(frozen=True)
class CommOverlap:
    """How megatron DDP overlaps data-parallel communication with compute (parallel.* keys).

    Both overlaps use asynchronous collectives (``async_op=True``) that gloo supports too, so
    they run, and are tested, on CPU; the reduced gradients and gathered weights are the same
    numbers as without overlap (the same collectives on the same buckets, only launched earlier).
    """

    grad_reduce: bool = False
    """Launch each bucket's all-reduce / reduce-scatter from the backward hooks."""
    param_gather: bool = False
    """Distributed optimizer only: all-gather updated weights in the next forward's pre-hooks."""
    bucket_size: int | None = None
    """Parameters per bucket (None: megatron's default)."""

    @classmethod
    def from_config(cls, parallel, layout: ParallelLayout) -> CommOverlap:
        """The overlap ``parallel.*`` asks for at ``layout`` (param gather needs ZeRO-1)."""
        return cls(grad_reduce=bool(parallel.overlap_grad_reduce),
                   param_gather=bool(parallel.overlap_param_gather
                                     and layout.distributed_optimizer),
                   bucket_size=parallel.bucket_size)


def wrap_ddp(chunks: list[torch.nn.Module], layout: ParallelLayout,
             overlap: CommOverlap | None = None) -> list[DistributedDataParallel]:
    """One DDP wrapper per chunk; fp32 grad buffers (``param.main_grad``) reduced over DP.

    With ``calculate_per_token_loss`` (always on in tulu3) megatron does not average grads over
    DP; ``finalize_model_grads`` divides them by the normalizer summed over the global batch.
    ``overlap``: communication overlap (default none: frozen copies and value models that are
    read outside a forward pass).
    """
    overlap = overlap or CommOverlap()
    gather = overlap.param_gather and layout.distributed_optimizer  # only ZeRO-1 gathers
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap.grad_reduce,
        overlap_param_gather=gather,
        bucket_size=overlap.bucket_size,
        use_distributed_optimizer=layout.distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    wrapped = [
        DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk,
                                # Megatron buckets only the first chunk's grads with VPP.
                                disable_bucketing=index > 0)
        for index, chunk in enumerate(chunks)
    ]
    if gather:
        for chunk in wrapped:
            _gather_output_weight_after_forward(chunk)
    config = chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ([w.no_sync for w in wrapped] if len(wrapped) > 1
                           else wrapped[0].no_sync)
    return wrapped


def _gather_output_weight_after_forward(chunk: DistributedDataParallel) -> None:
    """Wait for the output weight's all-gather when the model's forward returns.

    Megatron waits for a bucket in the pre-hook of a module that uses it; the fused log-prob
    path reads ``output_weight()`` after the forward without calling the output layer, so
    without this its bucket (its own bucket at 8B: 525M parameters) would be read stale and
    its pending gather would trip megatron's assertion in the next step.
    """
    model = chunk.module
    if not getattr(model, "post_process", False):
        return
    try:
        weight = model.output_weight()
    except AttributeError:  # a scalar head (reward / value model): its head runs in forward
        return
    group = chunk.param_to_bucket_group.get(weight)
    if group is None:
        return

    def hook(_module: torch.nn.Module, _args: tuple, _output: object) -> None:
        group.finish_param_sync()

    model.register_forward_hook(hook)


@contextlib.contextmanager
def synced_params(chunks: list[torch.nn.Module]) -> Iterator[None]:
    """The model weights up to date while the block runs (saving, evaluating, exporting).

    With ``overlap_param_gather`` the weights an optimizer step produced arrive only in the
    next forward's pre-hooks; here they are all-gathered now and the hooks are off for the
    block, then on again (what Megatron-LM's training loop does around saves and eval).
    """
    overlapped = [c for c in chunks if isinstance(c, DistributedDataParallel)
                  and c.ddp_config.overlap_param_gather and c.ddp_config.use_distributed_optimizer]
    for chunk in overlapped:
        chunk.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for chunk in overlapped:
            chunk.enable_forward_pre_hook()


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The TuluGPTModel inside a DDP wrapper (or the module itself)."""
    return chunk.module if isinstance(chunk, DistributedDataParallel) else chunk
