"""Wrap model chunks in megatron's DistributedDataParallel and wire the schedule's hooks."""

from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads

from tulu3.parallel.layout import ParallelLayout


def wrap_ddp(chunks: list[torch.nn.Module],
             layout: ParallelLayout) -> list[DistributedDataParallel]:
    """One DDP wrapper per chunk; fp32 grad buffers (``param.main_grad``) reduced over DP.

    With ``calculate_per_token_loss`` (always on in tulu3) megatron does not average grads over
    DP; ``finalize_model_grads`` divides them by the normalizer summed over the global batch.
    """
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=layout.distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    wrapped = [
        DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk,
                                # Megatron buckets only the first chunk's grads with VPP.
                                disable_bucketing=index > 0)
        for index, chunk in enumerate(chunks)
    ]
    config = chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ([w.no_sync for w in wrapped] if len(wrapped) > 1
                           else wrapped[0].no_sync)
    return wrapped


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The TuluGPTModel inside a DDP wrapper (or the module itself)."""
    return chunk.module if isinstance(chunk, DistributedDataParallel) else chunk
