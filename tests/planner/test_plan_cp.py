"""The planner's model of the torch spec's context parallelism (tulu3/model/attention.py):
K and V all-gathered over CP each layer (kept for the backward), their gradients
reduce-scattered; hand-worked for Llama 3.1 8B (32 layers, hidden 4096, 8 of 32 heads KV,
head dim 128) at seq 4096, TP1 PP1 CP2 DP4 on one node of H100s."""

from __future__ import annotations

from dataclasses import replace

from tulu3.parallel.layout import ParallelLayout
from tulu3.planner import Problem, peak_memory, plan
from tulu3.planner.timing import _link, step_time

L8B = "llama3.1-8b"
CP2 = ParallelLayout(8, tp=1, pp=1, cp=2, distributed_optimizer=True)


def test_gathered_kv_memory_is_counted_for_the_torch_spec_only() -> None:
    te = Problem(L8B, "sft", 8, 4096, 64, spec="te")
    torch_spec = replace(te, spec="torch")
    extra = peak_memory(torch_spec, CP2).activations - peak_memory(te, CP2).activations
    # 32 layers x K and V (2 tensors x 2 bytes x 8/32 of hidden) x 2048 local tokens x 4096
    # hidden x (cp - 1) more chunks.
    assert extra == 32 * 4 * (8 / 32) * 2048 * 4096 * 1


def test_all_gather_time_is_not_hidden() -> None:
    problem = Problem(L8B, "sft", 8, 4096, 64, spec="torch")
    time = step_time(problem, CP2)
    kv_chunk = 2 * 2 * 1 * 2048 * 8 * 128  # this rank's K and V, bf16
    micro_batches = 64 // 4
    # one all-gather forward + one reduce-scatter backward per layer, (cp - 1) chunks each
    want = micro_batches * 32 * 2 * kv_chunk / _link(problem, 2)
    assert abs(time.cp_comm - want) <= 1e-9 * want


def test_cp_is_proposed_for_torch_sft_but_never_for_rlvr_or_local() -> None:
    long_rows = Problem(L8B, "sft", 16, 32768, 32, spec="torch", context_parallel=True)
    assert any(c.layout.cp > 1 for c in plan(long_rows))
    for problem in (replace(long_rows, stage="rlvr", seq_len=8192),
                    replace(long_rows, spec="local")):
        assert all(c.layout.cp == 1 for c in plan(problem))
    assert all("model.spec=te" not in c.overrides(1) for c in plan(long_rows))
