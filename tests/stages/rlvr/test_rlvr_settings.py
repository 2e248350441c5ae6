"""RLVR settings: run length from rlvr.total_episodes (hand-worked, and the Tülu 3 recipes'
numbers), and the one-line refusals of settings that cannot run."""

from __future__ import annotations

import pytest

from tulu3.config import ConfigError, load_config
from tulu3.parallel.layout import ParallelLayout
from tulu3.stages.rlvr.settings import run_length, validate_rlvr


def test_run_length_from_epochs_or_episodes() -> None:
    cfg = load_config(None, ["train.global_batch=8", "train.epochs=3"])
    assert run_length(cfg, 20) == (2 * 3, 3)  # 20 // 8 = 2 steps an epoch, drop-last
    cfg = load_config(None, ["train.global_batch=8", "rlvr.samples_per_prompt=4",
                             "rlvr.total_episodes=300"])
    # 300 // (8 x 4) = 9 steps; 2 steps an epoch -> ceil(9 / 2) = 5 epochs
    assert run_length(cfg, 20) == (9, 5)
    with pytest.raises(ConfigError, match="fewer than train.global_batch"):
        run_length(cfg, 7)


@pytest.mark.parametrize("size, prompts, want", [
    # open-instruct's Tülu 3 runs: 10M episodes (8B), 400k (70B, 405B); one sample per prompt
    ("8b", 29_946, (10_000_000 // 224, 336)),    # 44,642 steps; 133 an epoch
    ("70b", 29_946, (400_000 // 640, 14)),       # 625 steps; 46 an epoch
    ("405b", 7_500, (400_000 // 1856, 54)),      # 215 steps; 4 an epoch (RLVR-MATH)
])
def test_recipes_carry_tulu3_episodes(size: str, prompts: int, want: tuple) -> None:
    cfg = load_config(f"launch/recipes/llama3.1-{size}-rlvr.yaml")
    assert run_length(cfg, prompts) == want


@pytest.mark.parametrize("overrides, message", [
    (["rlvr.generation_tokens=24", "rlvr.max_new_tokens=24"], "cannot hold a prompt"),
    (["rlvr.total_episodes=7"], "less than one step's 8 episodes"),
    (["rlvr.stop_strings=['</answer>', '']"], "empty string"),
])
def test_refused_settings(overrides: list, message: str) -> None:
    cfg = load_config(None, ["train.global_batch=8", *overrides])
    with pytest.raises(ConfigError, match=message):
        validate_rlvr(cfg, ParallelLayout(world_size=1))


def test_config_keys() -> None:
    cfg = load_config(None, ["rlvr.stop_strings=['</answer>']", "rlvr.kl_estimator=kl2",
                             "rlvr.generation_tokens=4096"])
    assert cfg.rlvr.stop_strings == ["</answer>"] and cfg.rlvr.kl_estimator == "kl2"
    with pytest.raises(ConfigError, match="kl_estimator"):
        load_config(None, ["rlvr.kl_estimator=k4"])
    with pytest.raises(ConfigError, match="stop_strings"):
        load_config(None, ["rlvr.stop_strings=3"])
