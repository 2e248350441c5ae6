"""Running models without gradients: eval mode, frozen copies, and the forward-only pass.

Every forward pass that trains nothing goes through here: DPO's reference log-probs (cached
pre-pass and online reference), RLVR's pre-passes (old / reference log-probs, entropy, values),
reward-model scoring and evaluation.

- :func:`eval_mode`: the chunks in eval mode with autograd off, their modes restored afterwards.
- :func:`forward_pass`: megatron's forward-only schedule over micro-batches with a
  :class:`Measure` on the last pipeline stage; returns what it measured, keyed by example id.
- :func:`frozen_copy`: a second set of this rank's chunks (no DDP, no optimizer, eval mode,
  no gradients) holding a checkpoint's weights or a copy of other chunks'; building it does not
  move the RNG streams the run draws from. :func:`freeze` is its last step, for models loaded
  only to be run (a reward model that scores).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

import torch

from tulu3.config import ModelConfig
from tulu3.parallel.groups import ProcessGroups
from tulu3.parallel.layout import ParallelLayout
from tulu3.stages.base import metric


@contextlib.contextmanager
def eval_mode(chunks: list[torch.nn.Module]) -> Iterator[None]:
    """Chunks (DDP-wrapped or not) in eval mode and autograd off for the block; each chunk's
    train / eval mode restored afterwards."""
    modes = [chunk.training for chunk in chunks]
    for chunk in chunks:
        chunk.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for chunk, mode in zip(chunks, modes, strict=True):
            chunk.train(mode)


class Measure(Protocol):
    """What a forward-only pass computes from one micro-batch on the last pipeline stage."""

    uses_hidden: bool
    """Whether the model should return final hidden states (fused log-probs) or its output."""

    def __call__(self, batch: dict, output: torch.Tensor, model: torch.nn.Module
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(keys [n] int, {name: [n, ...]})``: row ``i`` of every value belongs to example
        ``keys[i]`` (rows with a negative key are dropped: fillers). ``output`` is what the
        model returned (hidden states [s, b, h] or logits / scores [b, s, ...])."""
        ...


class CollectStage:
    """A :class:`~tulu3.stages.base.Stage` for forward-only schedules: a zero loss, and the
    measure's values stored per example in ``outputs`` (``{name: {key: tensor [...]}}``, CPU)."""

    name = "forward"
    metric_names = ("rows",)

    def __init__(self, measure: Measure) -> None:
        self.measure = measure
        self.uses_hidden = measure.uses_hidden
        self.outputs: dict[str, dict[int, torch.Tensor]] = {}

    def loss(self, batch: dict, output: torch.Tensor, model: torch.nn.Module
             ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        keys, values = self.measure(batch, output, model)
        keys = keys.reshape(-1).tolist()
        for name, tensor in values.items():
            rows = self.outputs.setdefault(name, {})
            host = tensor.detach().cpu()
            for row, key in enumerate(keys):
                if key >= 0:
                    rows[key] = host[row]
        count = sum(key >= 0 for key in keys)
        zero = output.new_zeros((), dtype=torch.float32)
        normalizer = torch.tensor(count, dtype=torch.int, device=zero.device)
        return zero, normalizer, {"rows": metric(count, 0)}


def forward_pass(chunks: list[torch.nn.Module], micro_batches: list[dict], measure: Measure,
                 layout: ParallelLayout) -> dict[str, dict[int, torch.Tensor]]:
    """Run ``micro_batches`` (this DP rank's) through the chunks forward-only, in eval mode
    without autograd, and return ``{name: {example key: value}}`` of ``measure`` on last
    pipeline stage ranks (``{}`` elsewhere). Collective over the world, as every schedule run
    (its metrics are all-reduced)."""
    from tulu3.step import run_schedule

    stage = CollectStage(measure)
    with eval_mode(chunks):
        run_schedule(chunks, micro_batches, stage, layout, forward_only=True)
    return stage.outputs


def freeze(chunks: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """Eval mode and no gradients for good (a model that is only run); returns ``chunks``."""
    for chunk in chunks:
        chunk.eval()
        chunk.requires_grad_(False)
    return chunks


def frozen_copy(model_cfg: ModelConfig, layout: ParallelLayout, groups: ProcessGroups,
                chunks: list[torch.nn.Module] | None = None, path: str | None = None,
                shape: Any = None) -> list[torch.nn.Module]:
    """A frozen second set of this rank's LM chunks (``model_cfg``'s model at ``layout``, in
    the process ``groups``).

    Its weights are the checkpoint ``path`` (loaded at ``shape``, the model's LlamaShape), else
    a copy, by parameter name, of ``chunks``' current weights (DDP-wrapped or not). No DDP, no
    optimizer, eval mode, no gradients (:func:`freeze`). The global RNG states (torch, numpy,
    python, megatron's model-parallel tracker) are saved before the build and restored after
    it, so the run draws the same numbers with or without the copy.
    """
    from tulu3.checkpoint.training import rng_state, set_rng_state
    from tulu3.model.build import build_model_chunks
    from tulu3.parallel.ddp import unwrap

    if path is None and chunks is None:
        raise ValueError("frozen_copy: give the chunks to copy or a checkpoint path")
    state = rng_state()
    copy = build_model_chunks(model_cfg, layout, groups)
    set_rng_state(state)
    if path is not None:
        from tulu3.checkpoint.load import load_into_chunks

        load_into_chunks(path, copy, shape, groups)
    else:
        with torch.no_grad():
            for mine, source in zip(copy, chunks, strict=True):
                theirs = dict(unwrap(source).named_parameters())
                for name, param in mine.named_parameters():
                    param.copy_(theirs[name])
    return freeze(copy)
