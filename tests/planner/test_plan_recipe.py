"""``python -m tulu3.plan --config RECIPE``: the recipe read as a run reads it gives the Problem the
hand-written flags give; the planner blocks in launch/recipes/ are what the planner says now."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tulu3.config import ConfigError, load_config
from tulu3.parallel.layout import make_layout
from tulu3.planner import PlanError, plan
from tulu3.planner.cli import build_parser, main, problem_from_args
from tulu3.planner.from_recipe import problem_from_recipe, recipe_stage, value_preset
from tulu3.planner.recipe_header import BEGIN, COMMAND, END, regenerate
from tulu3.planner.recipe_header import main as header_main

RECIPES = Path(__file__).resolve().parents[2] / "launch" / "recipes"
CLUSTER_RECIPES = sorted(RECIPES.glob("llama3.1-*.yaml"))


def _flags(argv: list[str]):
    return problem_from_args(build_parser().parse_args(argv))


@pytest.mark.parametrize("recipe", CLUSTER_RECIPES, ids=lambda p: p.name)
def test_committed_planner_block_is_fresh(recipe):
    old, new = regenerate(recipe)
    assert old == new, (f"{recipe.name}: its planner block is stale (the planner changed); "
                        f"regenerate with: {COMMAND} launch/recipes/llama3.1-*.yaml")


def test_regenerating_rewrites_only_the_block(tmp_path):
    """A stale block is found by --check and rewritten; the YAML and the other comments stay."""
    recipe = tmp_path / "r.yaml"
    shutil.copy(RECIPES / "llama3.1-8b-dpo.yaml", recipe)
    text = recipe.read_text(encoding="utf-8")
    start, end = text.index(BEGIN), text.index(END) + len(END)
    stale = text[:start] + f"{BEGIN}\n#  8 GPUs: an old number\n{END}" + text[end:]
    recipe.write_text(stale, encoding="utf-8")
    assert header_main(["--check", str(recipe)]) == 1
    assert recipe.read_text(encoding="utf-8") == stale  # --check changes nothing
    assert header_main([str(recipe)]) == 0
    fresh = recipe.read_text(encoding="utf-8")
    assert header_main(["--check", str(recipe)]) == 0
    assert fresh[:start] == text[:start] and fresh.endswith(text[end:])
    assert "an old number" not in fresh and "#  8 GPUs, fastest first:" in fresh
    assert load_config(recipe) == load_config(RECIPES / "llama3.1-8b-dpo.yaml")


def test_a_recipe_without_markers_is_refused(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  preset: llama3.1-8b\nsft:\n  loss_reduction: sum\n")
    with pytest.raises(ValueError, match="expected one planner block"):
        regenerate(recipe)


# One recipe per stage (and the FP8 one): the flags written out by hand from the YAML.
BY_HAND = {
    "llama3.1-8b-sft-fp8.yaml": ["--model", "llama3.1-8b", "--gpus", "8", "--stage", "sft",
                                 "--seq-len", "4096", "--global-batch", "128", "--spec", "te",
                                 "--precision", "fp8"],
    "llama3.1-70b-dpo.yaml": ["--model", "llama3.1-70b", "--gpus", "64", "--stage", "dpo",
                              "--seq-len", "2048", "--global-batch", "128", "--spec", "te",
                              "--dpo-reference", "cached"],
    "llama3.1-8b-rm.yaml": ["--model", "llama3.1-8b", "--gpus", "8", "--stage", "rm",
                            "--seq-len", "2048", "--global-batch", "256", "--spec", "te"],
    "llama3.1-405b-rlvr.yaml": ["--model", "llama3.1-405b", "--gpus", "256", "--stage", "rlvr",
                                "--seq-len", "3072", "--global-batch", "1856", "--spec", "torch",
                                "--response-len", "1024", "--value-model", "llama3.1-8b",
                                "--generation-tokens", "49152", "--samples-per-prompt", "1",
                                "--ppo-epochs", "4"],
}


@pytest.mark.parametrize("name", sorted(BY_HAND))
def test_recipe_problem_equals_the_hand_written_flags(name):
    gpus = BY_HAND[name][BY_HAND[name].index("--gpus") + 1]
    from_recipe = _flags(["--config", str(RECIPES / name), "--gpus", gpus])
    assert from_recipe == _flags(BY_HAND[name])
    assert from_recipe == problem_from_recipe(RECIPES / name, int(gpus))


def test_flags_and_sets_override_the_recipe():
    recipe = str(RECIPES / "llama3.1-8b-rlvr.yaml")
    base = problem_from_recipe(recipe, 8)
    assert (base.seq_len, base.response_len, base.spec) == (2048 + 2048, 2048, "torch")
    flagged = _flags(["--config", recipe, "--gpus", "16", "--seq-len", "3000", "--spec", "te",
                      "--gpu", "h200-141gb", "--unfused-logprobs", "--value-model", "tiny"])
    assert (flagged.gpus, flagged.seq_len, flagged.spec, flagged.gpu) == (16, 3000, "te",
                                                                          "h200-141gb")
    assert (flagged.fused_logprobs, flagged.value_model) == (False, "tiny")
    assert flagged.global_batch == base.global_batch  # what no flag names stays the recipe's
    # --set changes the recipe as tulu3.train's --set does: the prompt length moves seq_len
    shorter = _flags(["--config", recipe, "--gpus", "8", "--set", "data.max_len=1024",
                      "train.micro_batch=2", "--set", "rlvr.samples_per_prompt=4"])
    assert (shorter.seq_len, shorter.micro_batch, shorter.samples_per_prompt) == \
        (1024 + 2048, 2, 4)
    with pytest.raises(ConfigError):
        _flags(["--config", recipe, "--gpus", "8", "--set", "data.max_lenn=1024"])


def test_stage_comes_from_the_one_stage_section(tmp_path):
    assert [recipe_stage(RECIPES / f"tiny-{s}.yaml") for s in ("sft", "dpo", "rm", "rlvr")] == \
        ["sft", "dpo", "rm", "rlvr"]
    bare = tmp_path / "bare.yaml"
    bare.write_text("model:\n  preset: llama3.1-8b\ndata:\n  max_len: 1024\n")
    with pytest.raises(PlanError, match="pass --stage"):
        problem_from_recipe(bare, 8)
    problem = problem_from_recipe(bare, 8, stage="dpo")
    assert (problem.stage, problem.seq_len, problem.model) == ("dpo", 1024, "llama3.1-8b")


def test_value_model_preset_from_its_name():
    assert value_preset(None) is None
    assert value_preset("/path/to/Llama-3.1-Tulu-3-8B-RM") == "llama3.1-8b"
    assert value_preset("/ckpt/llama-3.1-70b-rm/") == "llama3.1-70b"
    assert value_preset("llama3.1-405b") == "llama3.1-405b"
    with pytest.raises(PlanError, match="--value-model"):
        value_preset("/ckpt/my-value-model")


def test_cli_without_config_still_needs_the_problem_flags(capsys):
    assert main(["--gpus", "8", "--model", "llama3.1-8b"]) == 2
    assert "--stage, --seq-len, --global-batch" in capsys.readouterr().err
    assert main(["--gpus", "8", "--config", str(RECIPES / "llama3.1-8b-sft.yaml"),
                 "--top", "1"]) == 0
    assert "llama3.1-8b sft: 8 x h100-80gb" in capsys.readouterr().out


@pytest.mark.parametrize("name, gpus", [("llama3.1-8b-rm.yaml", 8),
                                        ("llama3.1-8b-sft-fp8.yaml", 8),
                                        ("llama3.1-405b-sft-fp8.yaml", 256)])
def test_rm_and_fp8_recipe_layouts_are_planned(name, gpus):
    """tests/launch/test_cluster_recipes.py checks the sft/dpo/rlvr recipes; these too."""
    cfg = load_config(RECIPES / name)
    layout = make_layout(cfg, gpus)
    best = [(c.layout, c.recompute) for c in plan(problem_from_recipe(RECIPES / name, gpus), 3)]
    assert (layout, cfg.model.recompute) in best, \
        f"{layout.describe()} is not among {[b.describe() for b, _ in best]}"
