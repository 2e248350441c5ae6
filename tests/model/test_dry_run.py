"""``--dry-run`` builds megatron's TransformerConfig and the model of one rank of a 256-GPU run
on the meta device: the three 405B recipes at their first, a middle and the last pipeline stage;
the parameters each rank builds are the pieces the checkpoint plan says it reads
(tulu3.checkpoint.plan), and megatron's refusals come back as one-line errors. Each test runs in
a forked child (`run_in_child`): building megatron installs its CPU patches, which must stay out
of the pytest process (tests/conftest.py)."""

from __future__ import annotations

import os

import pytest
import torch

from tulu3.config import ConfigError, load_config
from tulu3.model.dry_run import dry_run, rank_on_meta
from tulu3.testing import run_in_child

RECIPES = {stage: f"launch/recipes/llama3.1-405b-{stage}.yaml" for stage in ("sft", "dpo", "rlvr")}
# Megatron's rank order is tp-cp-dp-pp: rank = tp + 8 dp + 16 pp at TP8 x DP2 x PP16.
RANKS = {0: "layers 0-6 + embedding;", 128: "layers 63-70;", 255: "layers 119-125 + output;"}


def world(rank: int) -> None:
    """This (child) process is rank ``rank`` of a 256-rank job started alone."""
    os.environ.update(WORLD_SIZE="256", RANK=str(rank))
    os.environ.pop("LOCAL_RANK", None)


@pytest.mark.parametrize("stage", list(RECIPES))
def test_405b_recipes_dry_run_at_256_ranks(stage):
    run_in_child(_recipe_dry_runs, stage)


def _recipe_dry_runs(stage: str) -> None:
    cfg = load_config(RECIPES[stage], [])
    for rank, layers in RANKS.items():
        world(rank)
        text = dry_run(cfg, stage)
        line = text.splitlines()[-1]
        assert f"rank {rank} (TP{rank % 8} PP{rank // 16} DP{rank // 8 % 2})" in line, line
        assert layers in line and "meta device" in line, line
    assert "TP8xPP16xDP2 (SP, dist-opt) on 256 ranks" in text


def test_meta_model_holds_the_pieces_the_checkpoint_plan_assigns():
    run_in_child(_meta_model_matches_plan)


def _meta_model_matches_plan() -> None:
    """Megatron's sharded state dict of each built rank (keys, offsets, sizes) equals the pieces
    :func:`~tulu3.checkpoint.plan.rank_pieces` plans for that rank, at 405B's uneven PP16."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    from tulu3.checkpoint.format import converter_layout
    from tulu3.checkpoint.plan import rank_pieces, write_plan
    from tulu3.model.presets import resolve_shape
    from tulu3.parallel.layout import make_layout

    cfg = load_config(RECIPES["sft"], [])
    layout, shape = make_layout(cfg, 256), resolve_shape(cfg.model)
    plan = write_plan(shape, 8, torch.bfloat16)
    replica = converter_layout(8, 16, 1, True, True)
    for rank in RANKS:
        with rank_on_meta(cfg, layout, rank) as (chunks, groups, _):
            state = chunks[0].sharded_state_dict()
            apply_factories(state)
        built = {(t.key, tuple(t.global_offset)): t.local_shape for t in nested_values(state)
                 if isinstance(t, ShardedTensor)}
        planned = {(p.key, p.offsets): tuple(s for s in p.sizes[1 if p.layer is not None else 0:])
                   for p in rank_pieces(plan, shape, replica, groups.tp_rank, groups.pp_rank)}
        assert built == planned, rank


def test_megatron_refusal_is_one_line():
    run_in_child(_megatron_refusal)


def _megatron_refusal() -> None:
    world(0)
    cfg = load_config(RECIPES["sft"], ["model.ffn_hidden=53252"])  # 6656.5 rows per TP rank
    with pytest.raises(ConfigError) as err:
        dry_run(cfg, "sft")
    assert str(err.value).startswith("megatron refuses this configuration at rank 0: ")
    assert "not divisible" in str(err.value) and "\n" not in str(err.value), err.value
