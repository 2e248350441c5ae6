"""Context parallelism with activation recompute trains exactly like one process without it:
the SFT loss and every gradient of one step (fp32, tiny Llama, 1e-5 as tests/parallel).

Recompute re-runs a layer's forward inside backward (megatron's CheckpointFunction): under CP
the torch spec's attention then all-gathers K / V over the CP group a second time, in the
backward pass, and reduce-scatters their gradients from the recomputed graph. ``full`` re-runs
whole layers (norms, QKV, RoPE by position, the gather, the MLP), ``selective`` only the core
attention (the gather and the document-causal SDPA). Both must give the gradients of the plain
single process. The counts of K / V gathers prove the recompute really ran: without it each
layer gathers K and V once per micro-batch, with it twice. Rows are not multiples of 2 x CP.

Weights after an AdamW step are not compared: Adam moves an element by ~lr whatever its
gradient's size, so elements whose gradient is at rounding level differ by more than the
gradients do (tests/parallel/test_parity.py covers the optimizer at CP without recompute).
"""

from __future__ import annotations

import pytest
from parity_harness import max_diff, merge, run_layout

from tulu3.testing import run_distributed_test

pytestmark = pytest.mark.distributed

TOL = 1e-5  # as tests/parallel: CP re-associates fp32 sums (~1e-7 relative), nothing else
COMMON = ["model.fused_logprobs=false"]
TWO_RANKS = {
    "CP2 recompute=full": ["parallel.cp=2", "model.recompute=full"],
    "CP2 recompute=selective": ["parallel.cp=2", "model.recompute=selective"],
    "CP2 packed recompute=full": ["parallel.cp=2", "data.pack=true", "model.recompute=full"],
}
FOUR_RANKS = {
    "TP2xCP2 recompute=full": ["parallel.tp=2", "parallel.cp=2", "model.recompute=full"],
}
GATHERS_PER_LAYER = {"none": 2, "selective": 4, "full": 4}
"""K and V gathers of one layer for one micro-batch: forward only, or forward + recompute."""


def _run_all(world: int, layouts: list[list[str]]) -> list[dict]:
    """Each layout's :func:`run_layout` result plus ``gathers``: the K / V all-gathers over a
    CP group of more than one rank that this rank ran (counted in this child process only)."""
    from tulu3.model import attention

    counted = attention.gather_kv
    out = []
    for overrides in layouts:
        calls = [0]

        def gather_kv(tensor, group, calls=calls):  # noqa: ANN001, ANN202 - attention's
            calls[0] += group is not None and group.size() > 1
            return counted(tensor, group)

        attention.gather_kv = gather_kv
        try:
            result = run_layout(world, COMMON + overrides, steps=1)
        finally:
            attention.gather_kv = counted
        out.append({**result, "gathers": calls[0]})
    return out


@pytest.fixture(scope="module")
def single() -> dict:
    """The reference: one process, no recompute, unpacked rows."""
    return run_distributed_test(_run_all, 1, 1, [[]])[0][0]


def _check(name: str, per_rank: list[dict], single: dict) -> None:
    losses = {tuple(r["loss"]) for r in per_rank}
    assert len(losses) == 1, f"{name}: ranks disagree on the loss: {losses}"
    got, want = per_rank[0]["loss"][0], single["loss"][0]
    assert abs(got - want) <= TOL * max(1.0, abs(want)), f"{name}: loss {got} vs {want}"
    diff, where = max_diff(merge(per_rank, "grads"), merge([single], "grads"))
    assert diff <= TOL, f"{name}: gradient of {where} differs by {diff}"
    assert max(float(g.abs().max()) for g in single["grads"].values()) > 100 * TOL


def _check_gathers(name: str, per_rank: list[dict], overrides: list[str]) -> None:
    """One step of 8 one-row micro-batches (2 packed ones with data.pack=true, see
    :func:`run_layout`; DP 1) over the tiny model's layers: K and V gathered once each per
    layer and micro-batch, twice when recomputed."""
    from tulu3.config import load_config
    from tulu3.model.presets import resolve_shape

    cfg = load_config(None, COMMON + overrides)
    micro = 2 if cfg.data.pack else 8  # every CP rank runs every micro-batch
    want = micro * resolve_shape(cfg.model).layers * GATHERS_PER_LAYER[cfg.model.recompute]
    got = [r["gathers"] for r in per_rank]
    assert set(got) == {want}, f"{name}: K / V gathers per rank {got}, expected {want}"


def _check_all(layouts: dict[str, list[str]], results: list[list[dict]], single: dict) -> None:
    for index, (name, overrides) in enumerate(layouts.items()):
        per_rank = [rank[index] for rank in results]
        _check(name, per_rank, single)
        _check_gathers(name, per_rank, overrides)


def test_cp2_with_recompute_equals_one_process(single: dict) -> None:
    _check_all(TWO_RANKS, run_distributed_test(_run_all, 2, 2, list(TWO_RANKS.values())), single)


def test_tp2_cp2_with_full_recompute_equals_one_process(single: dict) -> None:
    results = run_distributed_test(_run_all, 4, 4, list(FOUR_RANKS.values()))
    _check_all(FOUR_RANKS, results, single)
