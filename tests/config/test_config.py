"""Recipes, --set overrides, validation and the --dry-run interface."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tulu3.config import ConfigError, load_config, parse_override
from tulu3.parallel.layout import LayoutError, make_layout
from tulu3.train import parse_args

RECIPES = sorted(Path("launch/recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_every_recipe_loads(recipe: Path) -> None:
    load_config(recipe)


def test_overrides_are_typed_and_applied() -> None:
    cfg = load_config("launch/recipes/tiny-sft.yaml",
                      ["parallel.tp=1", "optim.lr=1e-5", "data.pack=false", "dpo.beta=0.1"])
    assert cfg.parallel.tp == 1 and cfg.optim.lr == 1e-5 and cfg.data.pack is False
    assert cfg.dpo.beta == 0.1
    assert parse_override("a.b=1 c.d=x") == [("a.b", 1), ("c.d", "x")]


def test_cli_set_takes_several_pairs_and_repeats() -> None:
    args = parse_args(["--stage", "sft", "--config", "r.yaml", "--set", "a=1", "b=2",
                       "--set", "c=3"])
    assert args.overrides == ["a=1", "b=2", "c=3"]


@pytest.mark.parametrize("override, message", [
    ("model.hiden=64", "unknown config key 'model.hiden'; did you mean 'model.hidden'?"),
    ("trian.max_steps=3", "unknown config key 'trian.max_steps'; did you mean 'train.max_steps'?"),
    ("parallel.tp=two", "parallel.tp: expected int, got 'two'"),
    ("data.pack=3", "data.pack: expected bool, got 3"),
    ("dpo.loss=kto", "dpo.loss: 'kto' is not one of"),
    ("optim.lr=fast", "optim.lr: expected float, got 'fast'"),
])
def test_bad_config_names_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("launch/recipes/tiny-sft.yaml", [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_recipe_names_the_file(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  global_bach: 4\n")
    with pytest.raises(ConfigError, match=r"r.yaml: unknown config key 'train.global_bach'"):
        load_config(recipe)


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.tp=3"], 6, "parallel.tp=3 does not divide model.heads=4"),
    (["model.heads=8", "model.kv_heads=2", "parallel.tp=4", "parallel.pp=1"], 4,
     "parallel.tp=4 does not divide model.kv_heads=2"),
    (["parallel.tp=1", "parallel.pp=3"], 3, "does not divide model.layers=4"),
    (["parallel.tp=2", "parallel.pp=2"], 6, "world size 6 is not a multiple of tp x pp x cp"),
    (["parallel.tp=1", "parallel.pp=1", "parallel.vpp=2"], 1, "parallel.vpp=2 needs parallel.pp"),
    (["parallel.tp=1", "parallel.pp=1", "train.global_batch=6", "train.micro_batch=4"], 1,
     "train.global_batch=6 is not divisible by train.micro_batch x dp = 4 x 1"),
    (["parallel.tp=1", "parallel.pp=1", "parallel.cp=2", "model.spec=local"], 2,
     "parallel.cp=2 needs model.spec=torch or te"),
])
def test_bad_layouts_name_the_value(overrides: list[str], world: int, message: str) -> None:
    cfg = load_config("launch/recipes/tiny-sft.yaml", overrides)
    with pytest.raises(LayoutError) as err:
        make_layout(cfg, world)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.distributed
def test_dry_run_through_torchrun_prints_config_and_layout(tiny_data: dict,
                                                           tmp_path: Path) -> None:
    sets = (f"data.tokenizer={tiny_data['tokenizer']} data.train={tiny_data['sft']} "
            f"data.eval={tiny_data['sft_eval']} train.run_dir={tmp_path / 'run'}")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
               "-m", "tulu3.train", "--stage", "sft", "--config",
               "launch/recipes/tiny-sft.yaml", "--dry-run", "--set", sets]
    # 4 processes importing torch + megatron: ~35 s of CPU, minutes on a loaded 2-core machine
    out = subprocess.run(command, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("# layout: TP2xPP2xDP1 on 4 ranks") == 1  # rank 0 only
    assert "global_batch: 32" in out.stdout and "stage sft" in out.stdout


def test_bad_override_exits_with_one_line() -> None:
    out = subprocess.run([sys.executable, "-m", "tulu3.train", "--stage", "sft", "--config",
                          "launch/recipes/tiny-sft.yaml", "--set", "parallel.tp=1",
                          "parallel.pp=1", "parallel.vpp=2", "--dry-run"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last == "tulu3.train: error: parallel.vpp=2 needs parallel.pp > 1", last
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
