"""Context parallelism through the real entry point: ``torchrun -m tulu3.train`` at CP2 (2 ranks,
TP1 x PP1) logs the per-step losses of the same recipe run as one process (``python -m
tulu3.train``), read back from each run's ``metrics.jsonl`` (tulu3/metrics/records.py).

The runs: SFT (launch/recipes/tiny-sft.yaml) packed and unpacked, 3 steps; DPO
(launch/recipes/tiny-dpo.yaml, packed, cached reference pre-pass), 2 steps. All start from the
same random tiny HF Llama (tests/trainer/trainer_harness.py ``tiny_data``), in fp32
(``model.dtype: fp32`` in both recipes), rows not multiples of 2 x CP (tulu3.step pads them).

Tolerance :data:`TOL` = 1e-5 relative, the fp32 parity tolerance of tests/parallel. CP computes
the same sums in another order: each rank's queries attend to the all-gathered K / V in SDPA
calls of another shape, the loss and token counts are summed per CP rank and then all-reduced,
and the K / V gradients are reduce-scattered. Re-associating an fp32 sum moves it by a few units
of 2^-24 ~ 6e-8 of its magnitude per level; through 4 layers, dot products of 64-128 terms and
a log-softmax over ~750 logits (the tiny tokenizer's vocabulary) that is ~1e-6 relative per step
(measured: <= 6e-8 on SFT's losses and grad_norms, 1e-6 on DPO's step-2 loss), so 1e-5 leaves a
10x margin and still catches a token dropped or doubled (one of ~100 loss tokens a step: ~1e-2).

Step 1 (before any optimizer step) is compared tightly on every metric that depends on the
forward / backward (loss, token_loss, grad_norm; DPO's logps). Later steps go through Adam: with
the recipe's eps (1e-8) the update lr * g / (|g| + eps) has derivative lr * eps / (|g| + eps)^2,
up to lr / eps = 3e5 for gradient elements near zero, so their fp32 rounding becomes a full-size
(+-lr) weight change and no bound follows from the computation (measured: step 2's grad_norm
moved by 6e-6 relative). As tests/stages/rlvr/test_rlvr_run.py does, the runs raise optim.eps
to 1e-2 (near or above most elements: rms |g| = grad_norm / sqrt(244k parameters) ~ 0.09 SFT,
0.015 DPO): the derivative is then at most lr / eps = 0.3, the rounding of step 1 reaches step 2
at its own size (step 2's grad_norm: 6e-8), and steps 2-3 are held to the same TOL. The
weights still move by a good fraction of lr per element (step 2's DPO loss is 0.725, not ln 2).

DPO's step-1 loss is ln 2 at any layout (the reference is the policy itself), so it proves
nothing about CP; its step-1 check is the policy log-probs (``logps/chosen`` / ``rejected``,
length-normalized sums over each response, split over the CP ranks) and the grad_norm. Its
step-2 loss -log sigmoid(beta * m) has derivative <= beta in the margin m, a difference of four
log-prob means (policy and cached reference, each within TOL relative), hence the absolute bound
beta * TOL * (|logps| of steps 1 and 2 summed) in :func:`test_dpo_cp2_matches_one_process`.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from trainer_harness import tiny_data

from tulu3.metrics import read_metrics
from tulu3.testing import free_port

pytestmark = pytest.mark.distributed

TOL = 1e-5
"""Relative: fp32 re-association of the CP sums (module docstring)."""
CP2 = ["parallel.tp=1", "parallel.pp=1", "parallel.cp=2"]
ONE = ["parallel.tp=1", "parallel.pp=1", "parallel.cp=1"]
BETA = 5.0
"""dpo.beta in launch/recipes/tiny-dpo.yaml (set explicitly, since the bound uses it)."""


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return tiny_data(tmp_path_factory.mktemp("cp_cli"))


def _common(data: dict[str, str], run_dir: Path, stage: str) -> list[str]:
    """Overrides shared by both layouts: tiny data, 64-token rows, 4 micro-batches of 2 rows per
    step, no eval, one save (the final one: train.save_every=0), optim.eps 1e-2 (docstring)."""
    return [f"data.tokenizer={data['tokenizer']}", f"data.train={data[stage]}", "data.eval=null",
            f"data.cache_dir={run_dir.parent / 'cache'}", "data.max_len=64",
            f"model.load={data['hf']}", "model.dtype=fp32", "train.global_batch=8",
            "train.micro_batch=2", f"train.run_dir={run_dir}", "train.plots=false",
            "train.save_every=0", "optim.warmup=0", "optim.eps=1e-2"]


def train(stage: str, nproc: int, overrides: list[str]) -> tuple[list[dict], str]:
    """``python -m tulu3.train`` (nproc 1) or ``torchrun --nproc-per-node nproc -m tulu3.train``:
    the records of its metrics.jsonl and its output (stdout + stderr)."""
    recipe = f"launch/recipes/tiny-{stage}.yaml"
    launcher = ([sys.executable] if nproc == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                 "--master-port", str(free_port())])
    command = [*launcher, "-m", "tulu3.train", "--stage", stage, "--config", recipe,
               "--set", *overrides]
    # ~7 s (1 process) / ~10 s (2) on an idle 2-core machine; 300 s only proves "did not hang".
    out = subprocess.run(command, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    output = out.stdout + out.stderr
    assert out.returncode == 0, output[-3000:]
    run_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("train.run_dir="))
    return read_metrics(Path(run_dir) / "metrics.jsonl"), output


def close(got: float, want: float, tol: float = TOL) -> bool:
    return abs(got - want) <= tol * abs(want)


def pair_runs(data: dict[str, str], root: Path, stage: str, *extra: str
              ) -> tuple[list[dict], list[dict]]:
    """The same recipe at one process and at CP2: (one, cp2) records, same number of steps."""
    one, _ = train(stage, 1, [*_common(data, root / "one", stage), *ONE, *extra])
    cp2, output = train(stage, 2, [*_common(data, root / "cp2", stage), *CP2, *extra])
    assert "TP1xPP1xCP2xDP1 on 2 ranks" in output, output[-3000:]  # CP really was used
    steps = [r["step"] for r in one]
    assert steps == [r["step"] for r in cp2] and steps == list(range(1, len(steps) + 1)), steps
    return one, cp2


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "unpacked"])
def test_sft_cp2_matches_one_process(data: dict[str, str], tmp_path: Path, pack: bool) -> None:
    one, cp2 = pair_runs(data, tmp_path, "sft", f"data.pack={str(pack).lower()}",
                         "train.max_steps=3")
    assert len(one) == 3
    for a, b in zip(one, cp2, strict=True):
        # the same rows: the data order does not depend on CP (CP ranks share one DP shard)
        assert a["sequences"] == b["sequences"] and a["step_tokens"] == b["step_tokens"], (a, b)
        for key in ("loss", "token_loss", "grad_norm"):
            assert close(b[key], a[key]), (f"step {a['step']} {key}: cp2 {b[key]!r} vs one "
                                           f"process {a[key]!r}")
    assert not close(one[1]["loss"], one[0]["loss"], 1e-3)  # the steps are not all alike


def test_dpo_cp2_matches_one_process(data: dict[str, str], tmp_path: Path) -> None:
    one, cp2 = pair_runs(data, tmp_path, "dpo", "data.pack=true", "train.max_steps=2",
                         f"dpo.beta={BETA}", "dpo.loss=dpo_norm", "dpo.reference_mode=cached")
    first_one, first_cp2 = one[0], cp2[0]
    assert first_one["pairs"] == first_cp2["pairs"], (first_one, first_cp2)
    for record in (first_one, first_cp2):
        # policy == reference before the first update: margin 0 up to the rounding of the two
        # passes (TOL each), through -log sigmoid(beta m)'s slope beta / 2 at 0
        near_zero = BETA * TOL * (abs(record["logps/chosen"]) + abs(record["logps/rejected"]))
        assert abs(record["loss"] - math.log(2)) <= near_zero, record
    for key in ("logps/chosen", "logps/rejected", "grad_norm"):
        assert close(first_cp2[key], first_one[key]), (f"step 1 {key}: cp2 {first_cp2[key]!r} "
                                                       f"vs one process {first_one[key]!r}")
    second_one, second_cp2 = one[1], cp2[1]
    for key in ("logps/chosen", "logps/rejected"):
        assert close(second_cp2[key], second_one[key]), (key, second_cp2[key], second_one[key])
    logps = sum(abs(r[k]) for r in (first_one, second_one)
                for k in ("logps/chosen", "logps/rejected"))
    bound = BETA * TOL * logps
    assert abs(second_cp2["loss"] - second_one["loss"]) <= bound, (
        f"step 2 loss: cp2 {second_cp2['loss']!r} vs one process {second_one['loss']!r} "
        f"(bound {bound:.2e})")
    # the bound still tells a trained step from an untrained one
    assert abs(second_one["loss"] - math.log(2)) > 10 * bound, (second_one["loss"], bound)
