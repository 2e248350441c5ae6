"""Megatron's optimizer (mixed precision / distributed) and LR schedule from OptimConfig."""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from tulu3 import patches
from tulu3.config import Config, OptimConfig
from tulu3.model.build import DTYPES


def warmup_steps(warmup: float, total_steps: int) -> int:
    """``optim.warmup`` < 1 is a fraction of the run (Tülu 3: 0.03 SFT, 0.1 DPO), else steps."""
    return int(round(warmup * total_steps)) if warmup < 1 else int(warmup)


def build_optimizer(cfg: Config, chunks: list[torch.nn.Module],
                    total_steps: int) -> tuple[MegatronOptimizer, OptimizerParamScheduler]:
    """AdamW over the DDP-wrapped chunks and its scheduler (warm-up from 0, then decay)."""
    patches.install()
    opt = cfg.optim
    dtype = DTYPES[cfg.model.dtype]
    config = OptimizerConfig(
        optimizer="adam",
        lr=opt.lr,
        min_lr=opt.min_lr,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.beta1,
        adam_beta2=opt.beta2,
        adam_eps=opt.eps,
        clip_grad=opt.clip,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, chunks, use_gloo_process_groups=False)
    return optimizer, build_scheduler(cfg.optim, optimizer, total_steps)


def build_scheduler(opt: OptimConfig, optimizer: Any, total_steps: int) -> OptimizerParamScheduler:
    """Warm-up from 0 to ``opt.lr``, then ``opt.schedule`` decay to ``opt.min_lr`` at the end.

    On resume the recipe's schedule wins over the checkpoint's (megatron's
    ``override_opt_param_scheduler``); only the step count comes from the checkpoint. A run resumed
    with a longer ``train.max_steps`` decays over the new length from the step it reached, as an
    HF / torchtitan LambdaLR resume does; megatron's default would keep the old length silently.
    """
    warmup = warmup_steps(opt.warmup, total_steps)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=opt.lr,
        min_lr=opt.min_lr if opt.schedule != "constant" else opt.lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(total_steps, warmup + 1),
        lr_decay_style=opt.schedule,
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
        override_opt_param_scheduler=True,
        use_checkpoint_opt_param_scheduler=False,
    )


SCHEDULE_KEYS = ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style")


def schedule_changes(saved: dict, scheduler: OptimizerParamScheduler) -> list[str]:
    """What differs between a checkpoint's schedule (its ``state_dict``) and this run's."""
    now = scheduler.state_dict()
    return [f"{key} {saved[key]} -> {now[key]}" for key in SCHEDULE_KEYS
            if key in saved and saved[key] != now[key]]
