"""A recipe YAML -> the planner's :class:`~tulu3.planner.problem.Problem`, read the way a run reads
it (``tulu3.config.load_config``), so ``python -m tulu3.plan --config R.yaml --gpus N`` plans the
job that ``tulu3.train --config R.yaml`` on N GPUs would run."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from tulu3.config import Config, load_config
from tulu3.model.presets import PRESETS
from tulu3.planner.problem import STAGES, PlanError, Problem

SHAPE_KEYS = ("layers", "hidden", "heads", "kv_heads", "ffn_hidden", "vocab")
"""model.* keys that change a preset's shape: the planner knows the presets only."""
_SIZE = re.compile(r"(?:^|[^0-9.])(8|70|405)b(?:$|[^a-z0-9])", re.IGNORECASE)
"""A Llama 3.1 size in a checkpoint's name: ``Llama-3.1-Tulu-3-8B-RM`` -> 8."""


def recipe_stage(path: str | Path) -> str | None:
    """The stage a recipe is for: the one stage section (sft, dpo, rm, rlvr) it writes, else None.

    ``tulu3.train`` takes the stage from ``--stage``; the cluster recipes each carry exactly one
    stage section, which names it. A recipe with none or several leaves the choice to the user.
    """
    with Path(path).open(encoding="utf-8") as stream:
        data = yaml.safe_load(stream) or {}
    found = [stage for stage in STAGES if isinstance(data, dict) and stage in data]
    return found[0] if len(found) == 1 else None


def value_preset(value_model: str | None) -> str | None:
    """The preset of ``rlvr.value_model`` (None: the policy's): a preset name, or a checkpoint
    path whose last component names a Llama 3.1 size (``/path/to/Llama-3.1-Tulu-3-8B-RM``)."""
    if value_model is None:
        return None
    if value_model in PRESETS:
        return value_model
    match = _SIZE.search(Path(value_model.rstrip("/")).name)
    if match is None:
        raise PlanError(f"rlvr.value_model {value_model!r} names no Llama 3.1 size (8B, 70B, "
                        f"405B); pass --value-model PRESET")
    return f"llama3.1-{match.group(1)}b"


def problem_fields(cfg: Config, stage: str) -> dict[str, Any]:
    """Problem fields a loaded recipe sets for ``stage`` (sequence length, batch, model, rlvr)."""
    shaped = [key for key in SHAPE_KEYS if getattr(cfg.model, key) is not None]
    if shaped:
        raise PlanError(f"the recipe overrides the preset's shape ({', '.join(shaped)}); the "
                        f"planner knows only the presets' shapes: plan with --model instead")
    fields: dict[str, Any] = {
        "model": cfg.model.preset, "stage": stage,
        "seq_len": cfg.data.max_len + (cfg.rlvr.max_new_tokens if stage == "rlvr" else 0),
        "global_batch": cfg.train.global_batch, "micro_batch": cfg.train.micro_batch,
        "spec": cfg.model.spec, "fused_logprobs": cfg.model.fused_logprobs,
        "precision": "bf16" if cfg.model.fp8 == "none" else "fp8"}
    if stage == "dpo":
        fields["dpo_reference"] = cfg.dpo.reference_mode
    if stage == "rlvr":
        r = cfg.rlvr
        fields.update(response_len=r.max_new_tokens, samples_per_prompt=r.samples_per_prompt,
                      ppo_epochs=r.ppo_epochs, generation_tokens=r.generation_tokens,
                      value_model=value_preset(r.value_model))
    return fields


def problem_from_recipe(recipe: str | Path, gpus: int, stage: str | None = None,
                        sets: list[str] | None = None, **overrides: Any) -> Problem:
    """The Problem of ``recipe`` (+ ``--set`` overrides ``sets``) on ``gpus`` GPUs.

    ``stage``: sft | dpo | rm | rlvr, required when the recipe does not name one
    (:func:`recipe_stage`). ``overrides``: Problem fields that replace the recipe's (None: keep
    the recipe's), e.g. ``gpu="h200-141gb"``; an rlvr value model named by a path with no size
    is only an error when ``value_model`` is not given here.
    """
    stage = stage or recipe_stage(recipe)
    if stage is None:
        raise PlanError(f"{recipe}: the recipe has no single stage section (sft, dpo, rm, "
                        f"rlvr); pass --stage")
    if stage not in STAGES:
        raise PlanError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    cfg = load_config(recipe, sets)
    if stage == "rlvr" and overrides.get("value_model") is not None:
        cfg.rlvr.value_model = None  # the given preset replaces it: no need to read the path
    fields = problem_fields(cfg, stage)
    fields.update({key: value for key, value in overrides.items() if value is not None})
    return Problem(gpus=gpus, **fields)
