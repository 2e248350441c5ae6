"""The two extra models of RLVR: the frozen reference policy and PPO's value model.

- Reference: the policy as it was when the run started (its ``model.load`` weights), a second set
  of chunks at the same layout, frozen; its weights are copied from the policy's before the first
  update (no file is read twice), also on a resume (see :func:`build_reference`). Used for the
  KL penalty (PPO) / KL loss (GRPO).
- Value model: :class:`tulu3.model.scalar_head.ScalarHeadModel` chunks at the same layout, with
  their own DDP wrapper, megatron optimizer and LR schedule (the ``optim.*`` settings), loaded
  from ``rlvr.value_model`` (a reward model, as Tülu 3), else from ``model.load`` (the policy),
  else left at its initialisation. Checkpointed with the policy (``step_N/value/``, a scalar-head
  checkpoint that ``rlvr.value_model`` can load); a resume restores weights, optimizer and LR
  schedule.
"""

from __future__ import annotations

import dataclasses

import torch

from tulu3.checkpoint.training import TrainedModel
from tulu3.config import Config
from tulu3.optim import build_optimizer
from tulu3.parallel.ddp import unwrap, wrap_ddp
from tulu3.parallel.groups import ProcessGroups
from tulu3.parallel.layout import ParallelLayout
from tulu3.stages.forward import frozen_copy


def build_reference(cfg: Config, policy_chunks: list, layout: ParallelLayout,
                    groups: ProcessGroups) -> list[torch.nn.Module]:
    """Frozen chunks holding a copy of the policy's current weights (``groups``: the run's).

    Called when the loop is built, before the trainer resumes (tulu3.run.run_stage: model ->
    loop -> optimizer -> fit, which resumes), so the policy still holds ``model.load``'s weights
    (or its seeded initialisation): on a resume too the reference is the run's start, not the
    resumed policy. That is cheaper than saving the reference in every checkpoint (a second
    full model on disk) and reads no file. Building the loop after the resume would break it.
    The build leaves the run's RNG streams where they were (:func:`frozen_copy`).
    """
    return frozen_copy(cfg.model, layout, groups, policy_chunks)


class ValueModel:
    """PPO's value model: chunks (DDP-wrapped), optimizer and scheduler."""

    def __init__(self, cfg: Config, layout: ParallelLayout, groups: ProcessGroups,
                 total_steps: int) -> None:
        from tulu3.model.presets import resolve_shape, with_shape
        from tulu3.model.scalar_head import build_scalar_chunks, load_scalar_weights

        source = cfg.rlvr.value_model or cfg.model.load
        model_cfg = cfg.model
        if cfg.rlvr.value_model:
            from tulu3.checkpoint.load import checkpoint_shape

            model_cfg = with_shape(dataclasses.replace(cfg.model, load=source),
                                   checkpoint_shape(source))
        self.shape = resolve_shape(model_cfg)
        layout = layout.for_layers(self.shape.layers)  # its own pipeline split (another depth)
        chunks = build_scalar_chunks(model_cfg, layout, groups)
        if source:
            load_scalar_weights(source, chunks, self.shape, groups)
        self.chunks = wrap_ddp(chunks, layout)
        value_cfg = dataclasses.replace(cfg, model=model_cfg)
        self.optimizer, self.scheduler = build_optimizer(value_cfg, self.chunks, total_steps)
        unwrap(self.chunks[0]).config.grad_scale_func = self.optimizer.scale_loss

    def trained(self) -> TrainedModel:
        """What a checkpoint saves and restores (``step_N/value/``)."""
        return TrainedModel(self.chunks, self.optimizer, self.scheduler, self.shape,
                            load_key="rlvr.value_model")
