"""Step time: model FLOPs at an achievable rate, the pipeline bubble, and communication.

One step is one ``train.global_batch`` (for rlvr: one rollout batch and its PPO epochs).
Every pass of every model over a micro-batch runs on the slowest pipeline rank's clock; the
pipeline adds (p - 1) / v of those clocks (Narayanan et al. 2021). TP collectives sit on the
critical path; the DP gradient reduce-scatter / all-gather overlaps with one micro-batch (the
last backward, the first forward); context-parallel ring exchanges overlap with attention.
"""

from __future__ import annotations

from dataclasses import dataclass

from tulu3.model.presets import LlamaShape
from tulu3.parallel.layout import ParallelLayout
from tulu3.planner.memory import BF16, FP32, layer_params, rank_params
from tulu3.planner.pipeline import rank_chunk_layers
from tulu3.planner.problem import Problem

ADAM_BYTES = 30  # read grad (4) + master, m, v (12), write master, m, v (12) + bf16 weight (2)


@dataclass(frozen=True)
class Passes:
    """Forward and backward passes one model makes over each micro-batch of a step."""

    shape: LlamaShape
    head: str  # lm | scalar
    forward: int
    backward: int


@dataclass(frozen=True)
class StepTime:
    """Seconds per step, by cause."""

    compute: float
    """Model FLOPs (recomputation included) of the slowest rank at achievable FLOP/s."""
    tp_comm: float
    cp_comm: float
    """Context-parallel K/V exchange not hidden behind attention."""
    bubble: float
    pp_comm: float
    dp_comm: float
    """Gradient reduce-scatter + parameter all-gather (or all-reduce) not hidden by overlap."""
    optimizer: float
    generation: float
    """RLVR rollouts: prefill + memory-bound decode."""

    @property
    def total(self) -> float:
        return (self.compute + self.tp_comm + self.cp_comm + self.bubble + self.pp_comm
                + self.dp_comm + self.optimizer + self.generation)

    def as_dict(self) -> dict[str, float]:
        kinds = ("compute", "tp_comm", "cp_comm", "bubble", "pp_comm", "dp_comm", "optimizer",
                 "generation")
        return {kind: getattr(self, kind) for kind in kinds} | {"total": self.total}


def stage_passes(problem: Problem) -> list[Passes]:
    """The passes of each model per micro-batch. DPO's cached reference costs its pre-pass, one
    forward per example, the same as online for one epoch. RLVR (PPO): old log-probs, reference
    and old values (forwards), then ppo_epochs x (forward + backward) of policy and value."""
    shape, epochs = problem.shape, problem.ppo_epochs
    if problem.stage == "rm":
        return [Passes(shape, "scalar", 1, 1)]
    if problem.stage == "dpo":
        return [Passes(shape, "lm", 1, 1), Passes(shape, "lm", 1, 0)]
    if problem.stage == "rlvr":
        return [Passes(shape, "lm", 2 + epochs, epochs),
                Passes(problem.value_shape, "scalar", 1 + epochs, epochs)]
    return [Passes(shape, "lm", 1, 1)]


def _layers_on(shape: LlamaShape, layout: ParallelLayout, rank: int) -> int:
    return sum(rank_chunk_layers(shape.layers, layout, rank))


def _link(problem: Problem, span: int) -> float:
    """Achievable bandwidth of a group spread over ``span`` consecutive ranks (bytes/s)."""
    spec = problem.gpu_spec
    link = spec.nvlink_bandwidth if span <= problem.gpus_per_node else spec.ib_bandwidth
    return link * spec.comm_efficiency


def rank_microbatch_time(problem: Problem, layout: ParallelLayout, rank: int,
                         passes: list[Passes], recompute: str = "none"
                         ) -> tuple[float, float, float]:
    """(compute, tp comm, exposed cp comm) seconds of one micro-batch on pipeline ``rank``."""
    seq = problem.seq_len
    tokens = problem.micro_seqs * seq / (layout.tp * layout.cp)  # tokens' share of one GPU
    flops, tp_volume, cp_time = 0.0, 0.0, 0.0
    spec = problem.gpu_spec
    for p in passes:
        h = p.shape.hidden
        linear, _ = layer_params(p.shape)
        fwd = 2 * linear + 4 * h * seq  # per token and layer; attention QK^T + AV, unhalved
        redo = {"full": fwd, "selective": 4 * h * seq}.get(recompute, 0)
        layers = _layers_on(p.shape, layout, rank)
        flops += tokens * layers * (p.forward * fwd + p.backward * (2 * fwd + redo))
        if rank == layout.pp - 1 and p.head == "lm":
            flops += tokens * 2 * p.shape.vocab * h * (p.forward + 2 * p.backward)
        # Two collectives per layer per forward (attention, MLP), two per backward, and the
        # recomputed forward's two again; ring all-reduce moves 2 (t-1)/t of the message.
        collectives = 2 * p.forward + 2 * p.backward * (2 if recompute == "full" else 1)
        message = BF16 * problem.micro_seqs * seq / layout.cp * h
        tp_volume += layers * collectives * 2 * (layout.tp - 1) / layout.tp * message
        cp_time += _cp_exposed(problem, layout, p, layers)
    compute = flops / spec.achievable_flops
    tp_time = tp_volume / _link(problem, layout.tp) if layout.tp > 1 else 0.0
    return compute, tp_time, cp_time


def _cp_exposed(problem: Problem, layout: ParallelLayout, p: Passes, layers: int) -> float:
    """te: ring attention, cp - 1 K/V chunk hops per layer forward, K/V + their grads backward,
    hidden behind the attention math of the same layer where it is long enough. torch
    (tulu3/model/attention.py): one all-gather of K and V per layer forward and one
    reduce-scatter of their gradients backward, each moving (cp - 1) chunks, not overlapped."""
    if layout.cp == 1:
        return 0.0
    shape, seq = p.shape, problem.seq_len
    kv_dim = shape.kv_heads / layout.tp * shape.head_dim
    kv = 2 * BF16 * problem.micro_seqs * seq / layout.cp * kv_dim  # this rank's K and V chunk
    if problem.spec == "torch":
        collectives = p.forward + p.backward
        return layers * collectives * (layout.cp - 1) * kv / _link(problem, layout.tp * layout.cp)
    hops = (layout.cp - 1) * (p.forward + 2 * p.backward)
    comm = hops * kv / _link(problem, layout.tp * layout.cp)
    tokens = problem.micro_seqs * seq / (layout.tp * layout.cp)
    attention = tokens * 4 * shape.hidden * seq * (p.forward + 2 * p.backward)
    return layers * max(0.0, comm - attention / problem.gpu_spec.achievable_flops)


def step_time(problem: Problem, layout: ParallelLayout, recompute: str = "none") -> StepTime:
    """Estimated seconds of one step of ``problem`` on ``layout``."""
    passes = stage_passes(problem)
    micro_batches = problem.step_seqs // (layout.dp * problem.micro_seqs)
    ranks = sorted({0, min(1, layout.pp - 1), layout.pp - 1})
    per_rank = [rank_microbatch_time(problem, layout, r, passes, recompute) for r in ranks]
    compute, tp_time, cp_time = max(per_rank, key=sum)
    clock = compute + tp_time + cp_time
    bubble = clock * (layout.pp - 1) / layout.vpp
    return StepTime(compute=micro_batches * compute, tp_comm=micro_batches * tp_time,
                    cp_comm=micro_batches * cp_time, bubble=bubble,
                    pp_comm=_pp_time(problem, layout, passes, micro_batches),
                    dp_comm=_dp_exposed(problem, layout, passes, ranks, clock),
                    optimizer=_optimizer_time(problem, layout, passes, ranks),
                    generation=generation_time(problem, layout))


def _pp_time(problem: Problem, layout: ParallelLayout, passes: list[Passes],
             micro_batches: int) -> float:
    """Point-to-point sends between stages: one per chunk per pass, not overlapped."""
    if layout.pp == 1:
        return 0.0
    message = BF16 * problem.micro_seqs * problem.seq_len / layout.cp * problem.shape.hidden
    message /= layout.tp if layout.sequence_parallel else 1
    sends = micro_batches * layout.vpp * sum(p.forward + p.backward for p in passes)
    return sends * message / _link(problem, 2 * layout.tp * layout.cp * layout.dp)


def _optimizer_steps(problem: Problem) -> int:
    return problem.ppo_epochs if problem.stage == "rlvr" else 1


def _trained_params(problem: Problem, layout: ParallelLayout, passes: list[Passes],
                    ranks: list[int]) -> float:
    return max(sum(rank_params(p.shape, layout, r, p.head) for p in passes if p.backward)
               for r in ranks)


def _dp_exposed(problem: Problem, layout: ParallelLayout, passes: list[Passes],
                ranks: list[int], clock: float) -> float:
    """Gradient sync over the dp x cp group per optimizer step, minus one micro-batch of overlap.

    Distributed optimizer: reduce-scatter fp32 grads + all-gather bf16 weights, each moving
    (n-1)/n of the buffer; otherwise an fp32 all-reduce, 2 (n-1)/n.
    """
    group = layout.dp * layout.cp
    if group == 1:
        return 0.0
    params = _trained_params(problem, layout, passes, ranks)
    share = (group - 1) / group
    volume = share * params * (FP32 + BF16 if layout.distributed_optimizer else 2 * FP32)
    comm = volume / _link(problem, layout.tp * group)
    return _optimizer_steps(problem) * max(0.0, comm - clock)


def _optimizer_time(problem: Problem, layout: ParallelLayout, passes: list[Passes],
                    ranks: list[int]) -> float:
    """Adam is memory-bound: ADAM_BYTES per parameter of this rank's optimizer shard."""
    shard = layout.dp * layout.cp if layout.distributed_optimizer else 1
    params = _trained_params(problem, layout, passes, ranks) / shard
    spec = problem.gpu_spec
    return _optimizer_steps(problem) * params * ADAM_BYTES / (spec.hbm_bandwidth
                                                              * spec.memory_efficiency)


def generation_time(problem: Problem, layout: ParallelLayout) -> float:
    """RLVR rollouts on the training layout, as tulu3/rollout/ runs them.

    A DP rank's prompts are generated in micro-batches (one, or as many as
    ``rlvr.generation_tokens`` slots allow); with PP > 1 up to ``pp`` of them are in flight,
    round-robin over the stages. One micro-batch of ``b`` sequences costs a stage, per token,
    ``max(weights + its KV cache read / bandwidth, 2 x params x b / flops)`` (memory-bound
    decode), and its prompt ``2 x params x prompt x b / flops`` (compute-bound prefill). With one
    micro-batch the stages run one after another (``pp`` stage-times a token); with ``k`` in
    flight every stage works on one of them at a time, so a round of ``max(pp, k)`` stage-times
    advances ``k`` micro-batches by a token. Splitting a batch that fits only re-reads the
    weights per micro-batch; it pays when the batch does not fit. Context parallelism does not
    split generation."""
    if problem.stage != "rlvr":
        return 0.0
    spec, shape = problem.gpu_spec, problem.shape
    seqs = -(-problem.step_seqs // layout.dp)
    micro_batches = 1
    if problem.generation_tokens is not None:
        per_micro = max(1, problem.generation_tokens // problem.seq_len)
        micro_batches = -(-seqs // per_micro)
    batch = -(-seqs // micro_batches)
    in_flight = min(layout.pp, micro_batches)
    params = rank_params(shape, layout, 0)  # one stage's weights on one GPU
    prompt = problem.seq_len - problem.response_tokens
    kv_dim = shape.kv_heads // layout.tp * shape.head_dim
    kv = 2 * BF16 * _layers_on(shape, layout, 0) * kv_dim * problem.seq_len * batch / 2
    read = (BF16 * params + kv) / (spec.hbm_bandwidth * spec.memory_efficiency)
    stage_token = max(read, 2 * params * batch / spec.achievable_flops)
    stage_prefill = 2 * params * prompt * batch / spec.achievable_flops
    rounds = -(-micro_batches // in_flight)
    decode = problem.response_tokens * rounds * max(layout.pp, in_flight) * stage_token
    prefill = (micro_batches + layout.pp - 1) * stage_prefill
    return prefill + decode
