"""RLVR end to end on gloo (``run_stage(cfg, "rlvr")`` from launch/recipes/tiny-rlvr.yaml).

Two launches (start-up dominates on 2 cores):

- 1 rank: (a) learning (tests/stages/rlvr/rlvr_harness.py): a tiny Llama SFT-ed for 150 steps on
  single-digit additions answered in two styles, only one of which the gsm8k verifier accepts;
  GRPO and PPO (10 rollout batches each) must raise the verified fraction of their rollouts and
  the greedy eval accuracy (``tulu3.eval`` of the SFT checkpoint before, the loop's eval after),
  and write the rlvr_reward / rlvr_kl plots. (b) the reference runs for the layout parity: GRPO
  and PPO from that SFT checkpoint, two rollout batches each, on the ``coin`` verifier
  (tests/stages/rlvr/rlvr_verifiers.py), whose data has a prompt that hangs its verifier, one that
  raises and one that kills the worker process: training goes on, each scores 0 and is counted.
- 4 ranks: the same parity runs at TP2xPP2 (GRPO, generating in pipelined micro-batches of
  ``rlvr.generation_tokens``) and TP2xDP2 with the distributed optimizer (PPO, with the kl2
  penalty), the SFT checkpoint resharded at load: every logged loss and rollout metric equals
  the single process's (generation samples the same tokens at every layout and micro-batching,
  and mini-batches hold the same prompts).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from rlvr_harness import common, learn, make_data, run_rlvr, sft_checkpoint

from tulu3.testing import run_distributed_test

pytestmark = pytest.mark.distributed

PARITY = {
    "grpo": ["rlvr.algo=grpo", "rlvr.samples_per_prompt=4", "rlvr.ppo_epochs=2",
             "rlvr.mini_batches=2", "rlvr.kl_beta=0.05"],
    "ppo": ["rlvr.algo=ppo", "rlvr.samples_per_prompt=2", "rlvr.ppo_epochs=2",
            "rlvr.mini_batches=2", "rlvr.kl_beta=0.05", "rlvr.whiten_advantages=true",
            "rlvr.kl_estimator=kl2"],
}
LAYOUTS_4 = {"grpo": ("TP2xPP2", ["parallel.tp=2", "parallel.pp=2",
                                  # 16 rows of ~20 prompt + 20 new tokens: micro-batches of
                                  # 4 rows, 2 decoding at once (the single process: one batch)
                                  "rlvr.generation_tokens=180"]),
             "ppo": ("TP2xDP2 dist-opt", ["parallel.tp=2",
                                          "parallel.distributed_optimizer=true"])}
COMPARED = ("loss", "reward", "verified", "no_eos", "kl", "entropy", "response_length",
            "clip_fraction", "approx_kl", "value_loss", "explained_variance", "grad_norm",
            "verifier_timeouts", "verifier_errors")
TOL = 5e-5
"""Absolute (relative above 1): fp32 rounding of the forward pass. A metric is a mean over ~100
response tokens of quantities built from log-softmaxes over the vocabulary: one log-prob from
logits of magnitude |z| <= ~30 carries up to |z| x eps32 x log2(V) ~ 3e-5 of rounding, and the
entropy (log Z - E[z], a cancellation) about as much; TP sums the vocabulary in another order.
Measured between layouts: <= 1.1e-5 (entropy), <= 3e-6 on everything else.

Adam's eps is raised to 1e-2 for these runs (above the per-element gradients, |g| ~ 1e-3),
which keeps the update linear in the gradient, so the rounding of step 1 reaches step 2 at its own
size. With the recipe's eps (1e-5) Adam divides each element by its own magnitude: the relative
rounding of the small elements becomes a full-size weight change, and step 2's grad_norm moved by
1.7e-4 between layouts (3e-5 between micro_batch 1 and 2 in one process); with eps 1e-2: 2e-7.
Both steps still move the policy (grad_norm 1.8 -> 1.15, kl -0.04 at step 2)."""


def parity_overrides(data: dict, root: Path, name: str, algo: str, *extra: str) -> list[str]:
    """Two rollout batches on the coin prompts from the SFT checkpoint (it stops on eos, so
    rewards vary; a random model would never stop and score the no-eos penalty everywhere)."""
    return common(data, root / name, f"data.train={data['coin']}", "data.eval=null",
                  f"model.load={sft_checkpoint(root / 'learn')}", "train.global_batch=4",
                  "train.micro_batch=1", "train.max_steps=2", "rlvr.max_new_tokens=20",
                  "rlvr.verifier_timeout_s=1.0", "optim.lr=1e-3", "optim.eps=1e-2", *PARITY[algo],
                  *extra)


def single_process(data: dict, root: Path) -> dict:
    os.environ["TULU3_TEST_CRASH"] = "1"  # the "crash" prompt kills its verifier worker here
    import rlvr_verifiers  # noqa: F401 - registers "coin"

    out = {"learn": learn(data, root / "learn")}
    out.update({algo: run_rlvr(parity_overrides(data, root, f"single_{algo}", algo))
                for algo in PARITY})
    return out


def four_ranks(data: dict, root: Path) -> dict:
    import rlvr_verifiers  # noqa: F401 - registers "coin"

    return {algo: run_rlvr(parity_overrides(data, root, f"four_{algo}", algo, *extra))
            for algo, (_, extra) in LAYOUTS_4.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("rlvr")
    data = make_data(root)
    # Imported before the fork: the ranks inherit megatron instead of importing it.
    import tulu3.stages.rlvr.loop  # noqa: F401
    import tulu3.train  # noqa: F401

    single = run_distributed_test(single_process, 1, data, root, timeout_s=600)[0]
    four = run_distributed_test(four_ranks, 4, data, root, timeout_s=600)[0]
    return {"single": single, "four": four, "root": root}


def assert_steps_match(got: object, want: object, label: str) -> None:
    """Two rollout batches of per-step metrics, every COMPARED key within TOL (relative > 1)."""
    assert isinstance(want, list) and isinstance(got, list), (want, got)
    assert len(want) == len(got) == 2
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        for key in COMPARED:
            if key in b:
                assert abs(a[key] - b[key]) <= TOL * max(1.0, abs(b[key])), \
                    f"{label} step {step + 1} {key}: {a[key]} vs {b[key]}"


@pytest.mark.parametrize("algo", list(PARITY))
def test_losses_equal_across_layouts(runs: dict, algo: str) -> None:
    want, got = runs["single"][algo], runs["four"][algo]
    assert_steps_match(got, want, LAYOUTS_4[algo][0])
    assert ("value_loss" in want[0]) == (algo == "ppo")
    assert all(r["loss"] != 0.0 for r in want) and want[1]["kl"] != 0.0  # not a trivial run


@pytest.mark.parametrize("algo", list(PARITY))
def test_verifier_failures_score_zero_and_are_counted(runs: dict, algo: str) -> None:
    records = runs["single"][algo]
    assert isinstance(records, list), records
    # The 8 prompts are all used over the 2 steps, K samples each: "hang" times out K times;
    # "raise" and "crash" (a killed worker in this process) are 2 K errors.
    samples = 4 if algo == "grpo" else 2
    assert sum(r["verifier_timeouts"] for r in records) == samples
    assert sum(r["verifier_errors"] for r in records) == 2 * samples
    for record in records:
        for key in ("reward", "verified", "no_eos", "kl", "entropy", "response_length",
                    "clip_fraction", "gen_tokens_per_s", "time/generation_s",
                    "time/training_s", "loss", "lr", "grad_norm"):
            assert key in record, key
    assert max(r["verified"] for r in records) > 0.0  # the coin verifier varies the rewards


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_verified_fraction_rises(runs: dict, algo: str) -> None:
    learned = runs["single"]["learn"]
    records = learned[(algo, 1234)]
    assert isinstance(records, list), records
    verified = [r["verified"] for r in records]
    first, last = sum(verified[:3]) / 3, sum(verified[-3:]) / 3
    assert last >= first + 0.15, verified
    after = records[-1]["eval/verified"]
    assert after >= learned["before"] + 0.2, (learned["before"], after)
    run_dir = runs["root"] / "learn" / f"{algo}_1234"
    assert (run_dir / "rlvr_reward.png").exists() and (run_dir / "rlvr_kl.png").exists()
    if algo == "ppo":
        assert "explained_variance" in records[-1] and "value_loss" in records[-1]


def test_eval_report(runs: dict) -> None:
    report = runs["single"]["learn"]["report"]
    assert report["summary"]["all"]["n"] == 40
    assert set(report["pass_at_k"]["gsm8k"]) == {"pass@1"}
    assert report["samples"][0]["response"] and "correct" in report["samples"][0]
