"""Enumerate parallel layouts, estimate each, keep the ones that fit, rank them by step time."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from tulu3.planner.hardware import GIB
from tulu3.planner.memory import Memory, peak_memory
from tulu3.planner.pipeline import split_kind
from tulu3.planner.problem import RECOMPUTE, Layout, PlanError, Problem
from tulu3.planner.timing import StepTime, step_time

MAX_VPP = 8
"""Largest virtual pipeline size tried (Megatron-Bridge's Llama recipes use up to 8)."""


@dataclass(frozen=True)
class Candidate:
    """A layout with its estimates."""

    layout: Layout
    memory: Memory
    time: StepTime
    fits: bool

    def as_dict(self, problem: Problem) -> dict[str, Any]:
        lay = self.layout
        return {"layout": lay.describe(), "tp": lay.tp, "pp": lay.pp, "vpp": lay.vpp,
                "cp": lay.cp, "dp": lay.dp, "sequence_parallel": lay.sequence_parallel,
                "distributed_optimizer": lay.distributed_optimizer,
                "recompute": lay.recompute, "uneven_pipeline_split": lay.uneven,
                "micro_batches": problem.step_seqs // (lay.dp * problem.micro_seqs),
                "overrides": lay.overrides(problem.micro_batch), "fits": self.fits,
                "memory_gib": {k: round(v, 3) for k, v in self.memory.gib().items()},
                "memory_rank": self.memory.rank,
                "step_time_s": {k: round(v, 4) for k, v in self.time.as_dict().items()}}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _shapes(problem: Problem) -> list:
    return [problem.shape, problem.value_shape] if problem.stage == "rlvr" else [problem.shape]


def _vpps(problem: Problem, pp: int, micro_batches: int) -> Iterator[int]:
    """Virtual pipeline sizes whose split works for every model of the stage."""
    layers = [shape.layers for shape in _shapes(problem)]
    for vpp in range(1, MAX_VPP + 1):
        if vpp > 1 and (pp == 1 or micro_batches % pp):  # Megatron: interleaving needs m % p == 0
            break
        if all(split_kind(n, pp, vpp) for n in layers):
            yield vpp


def base_layouts(problem: Problem) -> Iterator[Layout]:
    """Every layout shape (recompute none) the model, the cluster and the batch allow."""
    shapes = _shapes(problem)
    for tp in _divisors(min(problem.gpus_per_node, problem.gpus)):  # TP stays inside a node
        if any(s.heads % tp or s.kv_heads % tp for s in shapes):
            continue
        for cp in _divisors(problem.gpus // tp):
            # CP needs TE attention and splits each sequence into 2 x cp load-balanced chunks.
            if cp > 1 and (problem.spec != "te" or problem.seq_len % (2 * cp)):
                continue
            for pp in _divisors(problem.gpus // (tp * cp)):
                dp = problem.gpus // (tp * cp * pp)
                if pp > min(s.layers for s in shapes) or problem.step_seqs % (
                        dp * problem.micro_seqs):
                    continue
                micro_batches = problem.step_seqs // (dp * problem.micro_seqs)
                for vpp in _vpps(problem, pp, micro_batches):
                    uneven = split_kind(problem.shape.layers, pp, vpp) == "uneven"
                    # Sequence parallelism and the distributed optimizer are on wherever they
                    # apply: in this model they never cost time (SP's all-gather +
                    # reduce-scatter move what the all-reduce moved; reduce-scatter + all-gather
                    # move 6 bytes a parameter against the all-reduce's 8) and always save
                    # memory, so the variants without them can never rank higher.
                    # (tulu3 allows SP with the te and torch specs, not megatron's local norm.)
                    yield Layout(tp, pp, vpp, cp, dp,
                                 sequence_parallel=tp > 1 and problem.spec != "local",
                                 distributed_optimizer=dp * cp > 1, uneven=uneven)


def evaluate(problem: Problem, layout: Layout) -> Candidate:
    memory = peak_memory(problem, layout)
    return Candidate(layout, memory, step_time(problem, layout),
                     memory.total <= problem.budget_bytes)


def _leanest_recompute(problem: Problem, layout: Layout) -> Candidate:
    """The first recompute setting (none, selective, full: fastest first) that fits, else full."""
    for recompute in RECOMPUTE:
        candidate = evaluate(problem, replace(layout, recompute=recompute))
        if candidate.fits:
            return candidate
    return candidate


def search(problem: Problem) -> list[Candidate]:
    """The best variant of every layout shape (tp, pp, vpp, cp, dp), fitting ones first, each
    group ordered by estimated step time, then by memory."""
    problem.validate()
    best: dict[tuple, Candidate] = {}
    for layout in base_layouts(problem):
        candidate = _leanest_recompute(problem, layout)
        key = layout.sizes
        rank = (not candidate.fits, candidate.time.total, candidate.memory.total)
        old = best.get(key)
        if old is None or rank < (not old.fits, old.time.total, old.memory.total):
            best[key] = candidate
    return sorted(best.values(), key=lambda c: (not c.fits, c.time.total, c.memory.total))


def plan(problem: Problem, top: int | None = None) -> list[Candidate]:
    """Layouts that fit, fastest first (at most ``top``); PlanError when none does."""
    return choose(problem, search(problem), top)


def choose(problem: Problem, candidates: list[Candidate], top: int | None) -> list[Candidate]:
    """The fitting ``candidates`` (as ``search`` ranks them), or a PlanError saying why none."""
    where = f"{problem.gpus} x {problem.gpu}"
    if not candidates:
        raise PlanError(f"no layout of {where} divides the step's {problem.step_seqs} sequences "
                        f"into micro-batches of {problem.micro_seqs}: try another --global-batch "
                        f"or --micro-batch")
    fitting = [c for c in candidates if c.fits]
    if not fitting:
        lean = min(candidates, key=lambda c: c.memory.total)
        hbm = problem.gpu_spec.hbm_bytes / GIB
        raise PlanError(
            f"{problem.model} {problem.stage} does not fit on {where}: the leanest layout "
            f"({lean.layout.describe()}) needs {lean.memory.total / GIB:.1f} GiB per GPU, over "
            f"{problem.mem_fraction:g} x {hbm:.1f} GiB; use more GPUs, a shorter --seq-len or a "
            f"bigger GPU")
    return fitting[:top] if top else fitting
