"""RLVR at context parallelism 2 equals one process (``run_stage(cfg, "rlvr")``, gloo).

Generation runs without CP on the same ranks (tulu3/rollout/engine.py): the two CP ranks split
the prompts and all-gather the responses, and sampling depends only on (seed, sample key) and
the logits, so both ranks train on the same rollouts as the single process; the pre-passes
(old / reference log-probs, values) and the PPO / GRPO updates then run with CP as every stage
does (tulu3/step.py slices each micro-batch per CP rank).

Two launches: 1 rank (a brief SFT of the tiny Llama on the additions, so that responses stop on
eos at different lengths, then GRPO and PPO from it: two rollout batches each, the settings of
tests/stages/rlvr/test_rlvr_run.py's parity runs) and 2 ranks at CP2 (the same GRPO and PPO
runs). Every compared loss and rollout metric must agree within test_rlvr_run's ``TOL`` (its
docstring derives it; Adam's eps is raised to 1e-2 for the same reason).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from rlvr_harness import common, make_data, sft_checkpoint, train_sft
from test_rlvr_run import PARITY, assert_steps_match

from tulu3.data.loading import write_jsonl
from tulu3.testing import run_distributed_test

pytestmark = pytest.mark.distributed

SFT_STEPS = 40
"""Enough for most responses to end on eos within rlvr.max_new_tokens (checked below)."""


def _overrides(data: dict, root: Path, name: str, algo: str, *extra: str) -> list[str]:
    return common(data, root / name, f"data.train={data['coin_ok']}", "data.eval=null",
                  f"model.load={sft_checkpoint(root, SFT_STEPS)}",
                  "train.global_batch=4", "train.micro_batch=1", "train.max_steps=2",
                  "rlvr.max_new_tokens=20", "optim.lr=1e-3", "optim.eps=1e-2", *PARITY[algo],
                  *extra)


def _runs(data: dict, root: Path, prefix: str, *extra: str) -> dict:
    import rlvr_verifiers  # noqa: F401 - registers "coin"
    from rlvr_harness import run_rlvr

    return {algo: run_rlvr(_overrides(data, root, f"{prefix}_{algo}", algo, *extra))
            for algo in PARITY}


def single_process(data: dict, root: Path) -> dict:
    train_sft(data, root, SFT_STEPS)
    return _runs(data, root, "single")


def two_ranks(data: dict, root: Path) -> dict:
    return _runs(data, root, "cp2", "parallel.cp=2")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("rlvr_cp")
    data = make_data(root)
    # the coin verifier without its misbehaving ground truths (test_rlvr_run covers those)
    data["coin_ok"] = write_jsonl(
        [{"messages": [{"role": "user", "content": f"What is {i} + {i + 1}?"}],
          "ground_truth": "x", "dataset": "coin"} for i in range(8)],
        root / "data" / "coin_ok.jsonl")
    # Imported before the fork: the ranks inherit megatron instead of importing it.
    import tulu3.stages.rlvr.loop  # noqa: F401
    import tulu3.train  # noqa: F401

    single = run_distributed_test(single_process, 1, data, root, timeout_s=600)[0]
    # rank 0's result: the metrics file it wrote (both ranks share the run directory)
    cp2 = run_distributed_test(two_ranks, 2, data, root, timeout_s=600)[0]
    return {"single": single, "cp2": cp2}


@pytest.mark.parametrize("algo", list(PARITY))
def test_cp2_equals_one_process(runs: dict, algo: str) -> None:
    want, got = runs["single"][algo], runs["cp2"][algo]
    assert_steps_match(got, want, "CP2")
    # not a trivial run: responses stop on eos (the rollout batch has rows of several lengths),
    # rewards vary (a non-zero loss) and the policy moved away from the reference
    assert all(r["no_eos"] < 1.0 for r in want), [r["no_eos"] for r in want]
    assert all(r["loss"] != 0.0 for r in want) and want[1]["kl"] != 0.0
    assert ("value_loss" in want[0]) == (algo == "ppo")
