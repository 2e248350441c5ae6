"""Communication overlap (parallel.overlap_grad_reduce / overlap_param_gather / bucket_size):
a DP2 run with megatron's asynchronous bucket collectives on gloo equals the same run without
them bit for bit (losses, gradients, updated weights), with and without the distributed optimizer.

Small buckets (2000 parameters: the tiny model splits into many) make the hooks launch several
collectives per step and the output layer (32000 parameters) a bucket of its own, which the fused
log-prob path reads without calling the layer (tulu3.parallel.ddp waits for it after forward).
Without overlap megatron keeps one bucket whatever bucket_size says; with the distributed
optimizer the buckets decide each rank's shard, so the grad norm is summed in another order and
clipping would scale by a differently rounded factor: that comparison runs with optim.clip=0.
"""

from __future__ import annotations

import pytest
from parity_harness import max_diff, merge, run_layout

import tulu3.parallel.ddp as ddp_module
from tulu3.testing import run_distributed_test

pytestmark = pytest.mark.distributed

STEPS = 3
BUCKET = 2000


def _run(overrides: list[str], overlap: bool) -> dict:
    """run_layout with the overlap under test; weights read after the pending gather."""
    import parity_harness

    setting = ddp_module.CommOverlap(overlap, overlap, BUCKET)
    wrap, collect = ddp_module.wrap_ddp, parity_harness._collect

    def synced_collect(chunks: list, get) -> dict:
        with ddp_module.synced_params(chunks):  # overlap_param_gather: the last step's update
            return collect(chunks, get)

    parity_harness.wrap_ddp = lambda chunks, layout: wrap(chunks, layout, setting)
    parity_harness._collect = synced_collect
    try:
        return run_layout(2, overrides, steps=STEPS, micro_batch=2)
    finally:
        parity_harness.wrap_ddp, parity_harness._collect = wrap, collect


def _all_runs() -> dict:
    out = {}
    for name, overrides in (("ddp", []),
                            ("dist-opt", ["parallel.distributed_optimizer=true", "optim.clip=0"])):
        for overlap in (False, True):
            out[(name, overlap)] = _run(overrides, overlap)
    return out


def test_overlap_equals_no_overlap() -> None:
    ranks = run_distributed_test(_all_runs, 2)
    for name in ("ddp", "dist-opt"):
        plain = [r[(name, False)] for r in ranks]
        overlap = [r[(name, True)] for r in ranks]
        assert overlap[0]["loss"] == plain[0]["loss"], (name, overlap[0]["loss"], plain[0]["loss"])
        want, got = merge(plain, "weights"), merge(overlap, "weights")
        assert max_diff(want, got)[0] == 0.0, (name, max_diff(want, got))
        if name == "ddp":  # (the distributed optimizer keeps only its shard of the grads)
            grads = max_diff(merge(plain, "grads"), merge(overlap, "grads"))
            assert grads[0] == 0.0, grads
