"""Enumerate parallel layouts, estimate each, keep the ones that fit, rank them by step time."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tulu3.parallel.layout import LayoutError, ParallelLayout
from tulu3.planner.hardware import GIB
from tulu3.planner.memory import Memory, peak_memory
from tulu3.planner.pipeline import split_kind
from tulu3.planner.problem import RECOMPUTE, PlanError, Problem
from tulu3.planner.timing import StepTime, step_time

MAX_VPP = 8
"""Largest virtual pipeline size tried (Megatron-Bridge's Llama recipes use up to 8)."""


@dataclass(frozen=True)
class Candidate:
    """A layout with a recompute setting (``model.recompute``) and its estimates."""

    layout: ParallelLayout
    recompute: str
    memory: Memory
    time: StepTime
    fits: bool

    @property
    def sizes(self) -> tuple[int, int, int, int, int]:
        """(tp, pp, vpp, cp, dp): the layout's shape, whatever its switches and recompute."""
        lay = self.layout
        return (lay.tp, lay.pp, lay.vpp, lay.cp, lay.dp)

    @property
    def uneven(self) -> bool:
        """Embedding and loss each count as a layer in the pipeline split (405B's 126)."""
        return self.layout.split_extra > 0

    def describe(self) -> str:
        """``TP8 PP16 DP1 (SP, dist-opt, uneven-split, recompute=full)``."""
        extras = self.layout.features() + (["uneven-split"] if self.uneven else [])
        if self.recompute != "none":
            extras.append(f"recompute={self.recompute}")
        return self.layout.sizes_text(" ") + (f" ({', '.join(extras)})" if extras else "")

    def overrides(self, micro_batch: int) -> list[str]:
        """``key=value`` recipe overrides that select this candidate (for ``--set``)."""
        pairs = [*self.layout.overrides(), f"model.recompute={self.recompute}",
                 f"train.micro_batch={micro_batch}"]
        return pairs

    def as_dict(self, problem: Problem) -> dict[str, Any]:
        lay = self.layout
        return {"layout": self.describe(), "tp": lay.tp, "pp": lay.pp, "vpp": lay.vpp,
                "cp": lay.cp, "dp": lay.dp, "sequence_parallel": lay.sequence_parallel,
                "distributed_optimizer": lay.distributed_optimizer,
                "recompute": self.recompute, "uneven_pipeline_split": self.uneven,
                "micro_batches": problem.step_seqs // (lay.dp * problem.micro_seqs),
                "overrides": self.overrides(problem.micro_batch), "fits": self.fits,
                "memory_gib": {k: round(v, 3) for k, v in self.memory.gib().items()},
                "memory_rank": self.memory.rank,
                "step_time_s": {k: round(v, 4) for k, v in self.time.as_dict().items()}}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _shapes(problem: Problem) -> list:
    return [problem.shape, problem.value_shape] if problem.stage == "rlvr" else [problem.shape]


def runs(problem: Problem, layout: ParallelLayout) -> bool:
    """Whether tulu3 accepts ``layout`` for ``problem``: the checks a run makes
    (:func:`tulu3.parallel.layout.make_layout`) on every model of the stage, with the batch
    counted in sequences."""
    try:
        for shape in _shapes(problem):
            layout.for_layers(shape.layers).check_model(shape.heads, shape.kv_heads, shape.layers)
        layout.check_spec(problem.spec)
        layout.check_batch(problem.step_seqs, problem.micro_seqs)
        if layout.cp > 1 and problem.stage == "rlvr":  # generation refuses CP (preflight)
            return False
    except LayoutError:
        return False
    return True


def base_layouts(problem: Problem) -> Iterator[ParallelLayout]:
    """Every layout (recompute none) that tulu3 runs for the model, the cluster and the batch.

    Sequence parallelism and the distributed optimizer are on wherever they apply: in this
    model they never cost time (SP's all-gather + reduce-scatter move what the all-reduce moved;
    reduce-scatter + all-gather move 6 bytes a parameter against the all-reduce's 8) and always
    save memory, so the variants without them can never rank higher. (tulu3 allows SP with the
    te and torch specs, not megatron's local norm.) The pipeline split is uneven (embedding and
    loss counted) where the layers alone do not split but with them they do.
    """
    min_layers = min(shape.layers for shape in _shapes(problem))
    for tp in _divisors(min(problem.gpus_per_node, problem.gpus)):  # TP stays inside a node
        for cp in _divisors(problem.gpus // tp):
            if cp > 1 and (problem.seq_len % (2 * cp) or not problem.proposes_cp):
                continue  # 2 x cp load-balanced chunks; CP only when switched on
            for pp in _divisors(problem.gpus // (tp * cp)):
                if pp > min_layers:
                    continue
                dp = problem.gpus // (tp * cp * pp)
                for vpp in range(1, MAX_VPP + 1):
                    uneven = split_kind(problem.shape.layers, pp, vpp) == "uneven"
                    layout = ParallelLayout(
                        problem.gpus, tp, pp, vpp, cp,
                        sequence_parallel=tp > 1 and problem.spec != "local",
                        distributed_optimizer=dp * cp > 1,
                        account_for_embedding_in_pipeline_split=uneven,
                        account_for_loss_in_pipeline_split=uneven)
                    if runs(problem, layout):
                        yield layout


def evaluate(problem: Problem, layout: ParallelLayout, recompute: str = "none") -> Candidate:
    memory = peak_memory(problem, layout, recompute)
    return Candidate(layout, recompute, memory, step_time(problem, layout, recompute),
                     memory.total <= problem.budget_bytes)


def _leanest_recompute(problem: Problem, layout: ParallelLayout) -> Candidate:
    """The first recompute setting (none, selective, full: fastest first) that fits, else full."""
    for recompute in RECOMPUTE:
        candidate = evaluate(problem, layout, recompute)
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
        key = candidate.sizes
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
            f"({lean.describe()}) needs {lean.memory.total / GIB:.1f} GiB per GPU, over "
            f"{problem.mem_fraction:g} x {hbm:.1f} GiB; use more GPUs, a shorter --seq-len or a "
            f"bigger GPU")
    return fitting[:top] if top else fitting
