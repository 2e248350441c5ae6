"""PPO stop and resume: the value model (weights, optimizer, LR schedule) is checkpointed.

One 2-rank launch (TP1xDP2, distributed optimizer: the hardest optimizer state to restore) from
a random tiny Llama (tests/trainer/trainer_harness.py; it never stops on eos, so every reward is
the no-eos penalty, but the KL penalty, the values and the advantages still vary per token):

- ``full``: 3 rollout batches, a checkpoint after each;
- ``resumed``: a new launch of the same run from ``full``'s step 1: steps 2 and 3 must log
  exactly (bit for bit, as the SFT resume test) what ``full`` logged. ``kl`` is among them: a
  reference copied from the resumed policy instead of ``model.load`` would make it 0;
- negative control ``forgetful``: the same resume with the value model left out of the restore
  (``extra_models`` patched to ``{}``): its metrics differ, so the comparison can fail;
- ``from_value``: ``rlvr.value_model=full/checkpoints/step_1/value`` loads as a reward-model
  checkpoint (head "scalar"), and its trained weights change step 1's ``value_loss``;
- ``old``: step 1 without its ``value/`` (a checkpoint from before it was saved): resuming PPO
  from it is a CheckpointError naming the missing path.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from rlvr_harness import common, run_rlvr
from trainer_harness import tiny_data

from tulu3.testing import run_distributed_test

pytestmark = pytest.mark.distributed

STEPS, STOP = 3, 1
PPO = ["rlvr.algo=ppo", "rlvr.samples_per_prompt=2", "rlvr.ppo_epochs=2", "rlvr.mini_batches=1",
       "rlvr.kl_beta=0.05", "rlvr.whiten_advantages=true", "rlvr.max_new_tokens=6",
       "parallel.distributed_optimizer=true", "train.global_batch=4", "train.micro_batch=1",
       "optim.lr=1e-3", "train.keep_last=0"]
UNTIMED = ("time/", "_per_s", "elapsed_s", "mfu")
"""Wall-clock metrics: the only ones a resume may change."""


def _overrides(data: dict, run_dir: Path, *extra: str) -> list[str]:
    return common(data, run_dir, f"data.train={data['rlvr']}", "data.eval=null",
                  "data.max_len=48", f"model.load={data['hf']}", "model.preset=tiny",
                  f"train.max_steps={STEPS}", *PPO, *extra)


def _forgetful(overrides: list[str]) -> list[dict] | str:
    """A resume that restores the policy but not the value model (the bug this file guards)."""
    from tulu3.stages.rlvr.loop import RLVRLoop

    original = RLVRLoop.extra_models
    RLVRLoop.extra_models = lambda self: {}  # type: ignore[method-assign]
    try:
        return run_rlvr(overrides)
    finally:
        RLVRLoop.extra_models = original  # type: ignore[method-assign]


def ranks(data: dict, root: Path) -> dict:
    import torch.distributed as dist

    full = run_rlvr(_overrides(data, root / "full", "train.save_every=1"))
    step = root / "full" / "checkpoints" / f"step_{STOP}"
    resume = f"train.resume={step}"
    out = {"full": full,
           "resumed": run_rlvr(_overrides(data, root / "resumed", resume)),
           "forgetful": _forgetful(_overrides(data, root / "forgetful", resume)),
           "from_value": run_rlvr(_overrides(data, root / "from_value", "train.max_steps=1",
                                             f"rlvr.value_model={step / 'value'}"))}
    old = root / "old_step"
    if dist.get_rank() == 0:
        shutil.copytree(step, old)
        shutil.rmtree(old / "value")
    dist.barrier()
    out["old"] = run_rlvr(_overrides(data, root / "old", f"train.resume={old}"))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("rlvr_resume")
    data = tiny_data(root)
    # Imported before the fork: the ranks inherit megatron instead of importing it.
    import tulu3.stages.rlvr.loop  # noqa: F401
    import tulu3.train  # noqa: F401

    out = run_distributed_test(ranks, 2, data, root, timeout_s=600)[0]
    return {**out, "root": root}


def _compared(record: dict) -> dict:
    return {k: v for k, v in record.items() if not any(t in k for t in UNTIMED)}


def test_resumed_ppo_logs_exactly_the_uninterrupted_run(runs: dict) -> None:
    full, resumed = runs["full"], runs["resumed"]
    assert isinstance(full, list) and len(full) == STEPS, full
    assert isinstance(resumed, list), resumed
    assert [r["step"] for r in resumed] == list(range(STOP + 1, STEPS + 1))
    for got, want in zip(resumed, full[STOP:], strict=True):
        assert _compared(got) == _compared(want), (got, want)
    for key in ("value_loss", "explained_variance", "loss", "kl"):
        assert key in full[-1], key
    assert full[STOP]["kl"] != 0.0  # a reference taken from the resumed policy would give 0


def test_without_the_value_model_the_resume_differs(runs: dict) -> None:
    full, forgetful = runs["full"], runs["forgetful"]
    assert isinstance(forgetful, list) and len(forgetful) == STEPS - STOP, forgetful
    for key in ("value_loss", "explained_variance", "loss"):
        assert forgetful[0][key] != full[STOP][key], key


def test_value_checkpoint_layout_and_reuse(runs: dict) -> None:
    step = runs["root"] / "full" / "checkpoints" / f"step_{STOP}"
    assert json.loads((step / "tulu3.json").read_text())["head"] == "lm"
    assert (step / "model").is_dir() and (step / "optimizer").is_dir()
    value = step / "value"
    assert json.loads((value / "tulu3.json").read_text())["head"] == "scalar"
    assert (value / "model").is_dir() and (value / "optimizer").is_dir()
    trainer = json.loads((step / "trainer.json").read_text())
    assert trainer["extra"]["value"]["scheduler"]["num_steps"] == STOP
    assert not list((runs["root"] / "full" / "checkpoints").glob(".tmp_*"))
    from_value, full = runs["from_value"], runs["full"]
    assert isinstance(from_value, list) and len(from_value) == 1, from_value
    # Same policy and rollouts at step 1; only the value model's (trained) weights differ.
    assert from_value[0]["kl"] == full[0]["kl"]
    assert from_value[0]["value_loss"] != full[0]["value_loss"]


def test_old_checkpoint_without_value_model_is_refused(runs: dict) -> None:
    error = runs["old"]
    assert isinstance(error, str) and "CheckpointError" in error, error
    assert str(runs["root"] / "old_step" / "value") in error and "model.load=" in error, error
