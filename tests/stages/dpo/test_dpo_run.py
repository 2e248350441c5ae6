"""DPO end to end on gloo: step parity across layouts, cached == online reference, learning.

Three launches (1, 2 and 4 ranks; start-up dominates on 2 cores), each doing two things:

- step level (like tests/parallel): the tiny Llama from the same random HF weights, 8 random
  pairs, reference log-probs from the real forward-only reference pass, two AdamW steps per
  loss; losses, every gradient after step 1 and every weight after step 2 at TP2xPP2 and DP2
  equal one process to 1e-5 (fp32).
- trainer level (``run_stage(cfg, "dpo")`` from launch/recipes/tiny-dpo.yaml): the cached-
  reference pre-pass (DP-sharded, through the pipeline, interleaved too) and the online frozen
  reference give the same loss curves, at every layout; the cache is reused on resume and
  recomputed for another reference; on the synthetic preference set rewards/accuracy rises
  above 0.9.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import pytest
import torch
from parity_harness import VOCAB, max_diff, merge, setup_layout, train_steps
from trainer_harness import tiny_data

from tulu3.config import load_config
from tulu3.metrics import read_metrics
from tulu3.testing import run_distributed_test

pytestmark = pytest.mark.distributed

TOL = 1e-5
STEP_CONFIGS = [("dpo_norm", True), ("wpo", True), ("ipo", False), ("simpo", False)]
"""(dpo.loss, model.fused_logprobs) run at each layout."""
LAYOUTS = {2: ("DP2", []), 4: ("TP2xPP2", ["parallel.tp=2", "parallel.pp=2"])}
RECIPE = "launch/recipes/tiny-dpo.yaml"


# --- step level ------------------------------------------------------------------------------


def _pairs(count: int = 8, seed: int = 5) -> list:
    from tulu3.data.examples import DPOExample

    rng = random.Random(seed)

    def ids(low: int, high: int) -> list[int]:
        return [rng.randrange(VOCAB) for _ in range(rng.randint(low, high))]

    return [DPOExample(ids(3, 8), ids(2, 9), ids(2, 9), index=i) for i in range(count)]


def step_layout(world: int, overrides: list[str], loss: str, fused: bool) -> dict:
    """Two DPO steps at a layout from the same HF weights; global-layout grads and weights."""
    from megatron.core import parallel_state as ps

    from tulu3.data.packing import collate_dpo
    from tulu3.stages.dpo import reference
    from tulu3.stages.dpo.stage import DPOStage, ReferenceLogps

    # optim.eps 1e-6: a DPO gradient is a difference of chosen and rejected terms, so some
    # entries are ~4e-9 and carry fp32 noise of ~5e-10 (1e-7 of the largest entry); Adam's
    # first update g / (|g| + eps) would turn that into weight differences of 3% of the LR
    # with the default eps 1e-8. The gradients themselves are compared at 1e-5.
    setup = setup_layout(world, ["optim.eps=1e-6", f"model.fused_logprobs={fused}", *overrides],
                         micro_batch=2)
    stage = DPOStage(setup.shard, loss, beta=setup.cfg.dpo.beta, fused=fused)
    mine = _pairs()[setup.dp_rank::setup.dp]
    micro = [collate_dpo(mine[i:i + 2], 64, pack=i % 4 == 0) for i in range(0, len(mine), 2)]
    if stage.needs_reference:
        values = reference.reference_pass(setup.ddp, micro, ReferenceLogps(setup.shard, fused),
                                          setup.layout)
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            micro = [reference.attach(b, lambda ids: torch.tensor([values[i] for i in ids]))
                     for b in micro]
    return train_steps(setup, stage, micro, steps=2)


# --- trainer level ---------------------------------------------------------------------------


def dpo_overrides(data: dict[str, str], run_dir: Path, *extra: str) -> list[str]:
    return [f"data.tokenizer={data['tokenizer']}", f"data.train={data['dpo']}", "data.eval=",
            f"data.cache_dir={run_dir.parent / 'cache'}", "data.max_len=64", "data.pack=false",
            f"model.load={data['hf']}", "parallel.tp=1", "parallel.pp=1",
            "train.global_batch=8", "train.micro_batch=2", "train.max_steps=4",
            f"train.run_dir={run_dir}", "train.plots=false", "train.save_every=0",
            "optim.lr=1e-3", "optim.warmup=0", *extra]


def trainer_run(overrides: list[str]) -> dict:
    """One DPO run in this (distributed) process: its records and its reference-cache files."""
    from tulu3.train import run_stage

    cfg = load_config(RECIPE, overrides)
    run_stage(cfg, "dpo")
    run_dir = Path(cfg.train.run_dir)
    cache = run_dir / "ref_logprobs"
    files = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.pt")} if cache.is_dir() else {}
    return {"records": read_metrics(run_dir / "metrics.jsonl"), "cache": files}


def launch(world: int, steps: list[tuple[list[str], str, bool]], runs: list[list[str]]
           ) -> tuple[list[dict], list[dict]]:
    return ([step_layout(world, overrides, loss, fused) for overrides, loss, fused in steps],
            [trainer_run(overrides) for overrides in runs])


def losses(result: dict) -> list[float]:
    return [r["loss"] for r in result["records"]]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("dpo")
    data = tiny_data(root)
    learn_dir = root / "learn"
    single_runs = {
        "cached": dpo_overrides(data, root / "cached"),
        "online": dpo_overrides(data, root / "online", "dpo.reference_mode=online"),
        "learn": dpo_overrides(data, learn_dir, "train.max_steps=20", "train.epochs=4",
                               "train.micro_batch=4", "optim.lr=3e-3", "train.eval_every=10",
                               f"data.eval={data['dpo_eval']}", "train.plots=true"),
        "resumed": dpo_overrides(data, root / "cached", "train.max_steps=6"),
        "other_ref_cached": dpo_overrides(data, root / "other_cached", "train.max_steps=2",
                                          f"dpo.reference={learn_dir / 'checkpoints'}"),
        "other_ref_online": dpo_overrides(data, root / "other_online", "train.max_steps=2",
                                          f"dpo.reference={learn_dir / 'checkpoints'}",
                                          "dpo.reference_mode=online"),
    }
    steps = [([], loss, fused) for loss, fused in STEP_CONFIGS]
    single_steps, single = run_distributed_test(launch, 1, 1, steps, list(single_runs.values()))[0]
    out = {"data": data, "root": root, "single_steps": single_steps,
           **dict(zip(single_runs, single, strict=True))}
    # the cache file as the first run left it (the resumed run must not rewrite it)
    for world, (name, extra) in LAYOUTS.items():
        steps = [(extra, loss, fused) for loss, fused in STEP_CONFIGS]
        runs = [dpo_overrides(data, root / f"{name}_cached", *extra)]
        if world == 4:
            runs.append(dpo_overrides(data, root / f"{name}_online", *extra,
                                      "dpo.reference_mode=online"))
            runs.append(dpo_overrides(data, root / "PP2xVPP2_cached", "parallel.pp=2",
                                      "parallel.vpp=2", "train.micro_batch=1"))
        per_rank = run_distributed_test(launch, world, world, steps, runs)
        out[f"{name}_steps"] = [[rank[0][i] for rank in per_rank] for i in range(len(steps))]
        out[f"{name}_runs"] = per_rank[0][1]
    return out


@pytest.mark.parametrize("layout", [name for name, _ in LAYOUTS.values()])
def test_step_loss_and_gradients_equal_single_process(results: dict, layout: str) -> None:
    for (loss, fused), per_rank, single in zip(STEP_CONFIGS, results[f"{layout}_steps"],
                                               results["single_steps"], strict=True):
        name = f"{layout} {loss} fused={fused}"
        assert len({tuple(r["loss"]) for r in per_rank}) == 1, f"{name}: ranks disagree"
        for step, (got, want) in enumerate(zip(per_rank[0]["loss"], single["loss"],
                                               strict=True)):
            assert abs(got - want) <= TOL * max(1.0, abs(want)), f"{name} {step}: {got} {want}"
        diff, where = max_diff(merge(per_rank, "grads"), merge([single], "grads"))
        assert diff <= TOL, f"{name}: gradient of {where} differs by {diff}"
        diff, where = max_diff(merge(per_rank, "weights"), merge([single], "weights"))
        assert diff <= TOL, f"{name}: weight {where} differs by {diff} after two steps"
        assert single["loss"][1] != single["loss"][0]


def test_step_loss_starts_at_log2_with_the_reference_equal_to_the_policy(results: dict) -> None:
    by_loss = dict(zip([loss for loss, _ in STEP_CONFIGS], results["single_steps"],
                       strict=True))
    assert abs(by_loss["dpo_norm"]["loss"][0] - math.log(2)) < 1e-6
    assert abs(by_loss["ipo"]["loss"][0] - (1 / (2 * 5.0)) ** 2) < 1e-6  # (0 - 1 / 2 beta)^2


def test_cached_and_online_reference_give_identical_losses(results: dict) -> None:
    cached, online = losses(results["cached"]), losses(results["online"])
    assert len(cached) == 4 and cached == online  # bit for bit: same micro-batches, same math
    assert abs(cached[0] - math.log(2)) < 1e-6  # step 1: the reference is the policy
    tp2pp2_cached, tp2pp2_online, vpp_cached = (losses(r) for r in results["TP2xPP2_runs"])
    assert tp2pp2_cached == tp2pp2_online, "TP2xPP2: cached (pipeline pre-pass) != online"
    for name, got in (("TP2xPP2", tp2pp2_cached), ("DP2", losses(results["DP2_runs"][0])),
                      ("PP2xVPP2xDP2 micro-batch 1", vpp_cached)):
        for step, (a, b) in enumerate(zip(got, cached, strict=True)):
            assert abs(a - b) <= TOL * max(1.0, abs(b)), f"{name} step {step + 1}: {a} vs {b}"


def test_metrics_have_the_fixed_names(results: dict) -> None:
    record = results["cached"]["records"][-1]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy",
                "rewards/margin", "logps/chosen", "logps/rejected", "pairs", "lr", "grad_norm",
                "tokens"):
        assert key in record, key
    assert record["pairs"] == 8


def test_reference_cache_is_reused_on_resume_and_keyed_by_reference(results: dict) -> None:
    first, resumed = results["cached"]["cache"], results["resumed"]["cache"]
    assert len(first) == 1 and resumed == first  # same file, never rewritten
    assert [r["step"] for r in results["resumed"]["records"]] == [1, 2, 3, 4, 5, 6]
    other = results["other_ref_cached"]["cache"]
    assert len(other) == 1 and other.keys() != first.keys()
    # another reference: not log 2 at step 1, and the pre-pass swapped the reference weights in
    # and the policy's back out, exactly as the online copy sees them
    cached, online = losses(results["other_ref_cached"]), losses(results["other_ref_online"])
    assert abs(cached[0] - math.log(2)) > 1e-3
    assert cached == online


def test_learns_the_synthetic_preferences(results: dict) -> None:
    records = results["learn"]["records"]
    accuracy = [r["rewards/accuracy"] for r in records]
    margin = [r["rewards/margin"] for r in records]
    assert len(records) == 20
    assert sum(accuracy[-5:]) / 5 > 0.9, accuracy
    assert sum(margin[-5:]) / 5 > sum(margin[:5]) / 5 + 0.5, margin
    assert "eval/rewards/accuracy" in records[-1] and "eval/loss" in records[9]
    assert (results["root"] / "learn" / "dpo_rewards.png").is_file()


# --- no processes ----------------------------------------------------------------------------


def test_checkpoint_dir_resolution_and_fingerprint(tmp_path: Path) -> None:
    from tulu3.checkpoint.load import resolve_checkpoint_dir
    from tulu3.stages.dpo.reference import cache_key, checkpoint_fingerprint

    step = tmp_path / "run" / "checkpoints" / "step_3"
    (step / "model").mkdir(parents=True)
    (step / "tulu3.json").write_text("{}")
    (step / "model" / "w.distcp").write_bytes(b"1234")
    (step / "optimizer").mkdir()
    (step.parent / "latest").write_text("step_3\n")
    for path in (step, step.parent, tmp_path / "run"):
        assert resolve_checkpoint_dir(path) == step
    before = checkpoint_fingerprint(str(step.parent), None, 0)
    (step / "optimizer" / "state").write_bytes(b"x")  # optimizer state: not the weights
    assert checkpoint_fingerprint(str(step), None, 0) == before
    (step / "model" / "w.distcp").write_bytes(b"12345")
    after = checkpoint_fingerprint(str(step), None, 0)
    assert after != before
    assert cache_key("data", before, {}) != cache_key("data", after, {})
    assert cache_key("data", before, {}) != cache_key("other data", before, {})
    assert cache_key("data", before, {"max_len": 64}) != cache_key("data", before, {})
    assert os.path.basename(before["path"]) == "step_3"


def test_recipe_keys() -> None:
    cfg = load_config(RECIPE)
    assert (cfg.dpo.loss, cfg.dpo.beta, cfg.dpo.reference_mode) == ("dpo_norm", 5.0, "cached")
    assert (cfg.parallel.tp, cfg.parallel.pp) == (2, 2)
    assert cfg.model.load == "runs/tiny/sft/checkpoints"
    assert cfg.data.train.endswith("dpo.jsonl") and cfg.data.eval.endswith("dpo_eval.jsonl")
