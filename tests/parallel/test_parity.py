"""Every parallel layout trains exactly like one process (fp32, tiny Llama, 2 AdamW steps).

Compared at 1e-5: the loss of each step, every gradient after the first step (in megatron's
global layout, TP shards merged), and every weight after the second step. With the distributed
optimizer the gradient buffers hold only reduce-scattered shards, so loss and weights are
compared. Several layouts share one multi-process launch (start-up dominates on 2 cores).
Context parallel (CP) layouts and packed rows (several documents to a row, FlexAttention's
document mask) are compared with the same single unpacked process; row lengths are not
multiples of 2 x CP (the step pads them).
"""

from __future__ import annotations

import pytest
from parity_harness import max_diff, merge, run_layout

from tulu3.parallel.layout import LayoutError
from tulu3.testing import run_distributed_test

pytestmark = pytest.mark.distributed

TOL = 1e-5
PACK = "data.pack=true"  # the same sequences packed several to a row (parity_harness)
TWO_RANKS = {
    "TP2": ["parallel.tp=2"],
    "PP2 (1F1B)": ["parallel.pp=2"],
    "PP2xVPP2 (interleaved)": ["parallel.pp=2", "parallel.vpp=2"],
    "DP2": [],
    "DP2 distributed optimizer": ["parallel.distributed_optimizer=true"],
    "TP2 sequence parallel": ["parallel.tp=2", "parallel.sequence_parallel=true"],
    "TP2 local spec": ["parallel.tp=2", "model.spec=local"],
    "TP2 fused log-probs": ["parallel.tp=2", "model.fused_logprobs=true"],
    "TP2 SP fused log-probs": ["parallel.tp=2", "parallel.sequence_parallel=true",
                               "model.fused_logprobs=true"],
    "CP2": ["parallel.cp=2"],
    "CP2 packed": ["parallel.cp=2", PACK],
    "CP2 fused log-probs": ["parallel.cp=2", "model.fused_logprobs=true"],
    "TP2 packed": ["parallel.tp=2", PACK],
    "PP2 packed": ["parallel.pp=2", PACK],
}
FOUR_RANKS = {
    "TP2xPP2": ["parallel.tp=2", "parallel.pp=2"],
    "TP2xDP2 distributed optimizer": ["parallel.tp=2", "parallel.distributed_optimizer=true"],
    "PP2xDP2 interleaved": ["parallel.pp=2", "parallel.vpp=2"],
    "TP2xPP2 fused log-probs": ["parallel.tp=2", "parallel.pp=2", "model.fused_logprobs=true"],
    "TP2xCP2 packed": ["parallel.tp=2", "parallel.cp=2", PACK],
    "TP2xCP2 sequence parallel": ["parallel.tp=2", "parallel.cp=2",
                                  "parallel.sequence_parallel=true"],
    "CP2xPP2": ["parallel.cp=2", "parallel.pp=2"],
    "CP2xPP2 packed": ["parallel.cp=2", "parallel.pp=2", PACK],
    "CP2xPP2xVPP2 (interleaved)": ["parallel.cp=2", "parallel.pp=2", "parallel.vpp=2"],
    "CP2xDP2": ["parallel.cp=2"],
    "CP2xDP2 packed distributed optimizer": ["parallel.cp=2", PACK,
                                             "parallel.distributed_optimizer=true"],
}
COMMON = ["model.fused_logprobs=false"]


def _run_all(world: int, layouts: list[list[str]]) -> list[dict]:
    return [run_layout(world, COMMON + overrides) for overrides in layouts]


@pytest.fixture(scope="module")
def single_runs() -> list[dict]:
    """One process: unpacked (the reference of every test here), then packed."""
    return run_distributed_test(_run_all, 1, 1, [[], [PACK]])[0]


@pytest.fixture(scope="module")
def single(single_runs: list[dict]) -> dict:
    return single_runs[0]


def test_packed_rows_equal_unpacked_on_one_process(single_runs: list[dict]) -> None:
    _check("TP1 packed", [single_runs[1]], single_runs[0])


def _check(name: str, per_rank: list[dict], single: dict) -> None:
    losses = {tuple(r["loss"]) for r in per_rank}
    assert len(losses) == 1, f"{name}: ranks disagree on the loss: {losses}"
    for step, (got, want) in enumerate(zip(per_rank[0]["loss"], single["loss"], strict=True)):
        assert abs(got - want) <= TOL * max(1.0, abs(want)), f"{name} step {step}: {got} vs {want}"
    if any(r["grads"] for r in per_rank):
        diff, where = max_diff(merge(per_rank, "grads"), merge([single], "grads"))
        assert diff <= TOL, f"{name}: gradient of {where} differs by {diff}"
    diff, where = max_diff(merge(per_rank, "weights"), merge([single], "weights"))
    assert diff <= TOL, f"{name}: weight {where} differs by {diff} after two steps"


def test_single_process_loss_moves(single: dict) -> None:
    assert single["loss"][1] < single["loss"][0]


def test_fused_log_probs_equal_the_logits_path(single: dict) -> None:
    fused = run_distributed_test(_run_all, 1, 1, [["model.fused_logprobs=true"]])[0][0]
    _check("fused", [fused], single)


def test_two_rank_layouts_equal_single_process(single: dict) -> None:
    results = run_distributed_test(_run_all, 2, 2, list(TWO_RANKS.values()))
    for index, name in enumerate(TWO_RANKS):
        _check(name, [rank[index] for rank in results], single)


def test_four_rank_layouts_equal_single_process(single: dict) -> None:
    results = run_distributed_test(_run_all, 4, 4, list(FOUR_RANKS.values()))
    for index, name in enumerate(FOUR_RANKS):
        _check(name, [rank[index] for rank in results], single)


def test_context_parallel_with_the_local_spec_is_refused() -> None:
    with pytest.raises(LayoutError, match="parallel.cp"):
        run_layout(2, COMMON + ["parallel.cp=2", "model.spec=local"])
