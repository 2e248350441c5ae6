"""Published training throughputs the planner's efficiency is calibrated on (docs/PLANNER.md).

The timing model (tulu3/planner/timing.py) charges model FLOPs at ``compute_efficiency`` x the
GPU's bf16 peak and adds the pipeline bubble and exposed communication on top. That efficiency
is not guessed: it is the value at which the whole model reproduces a published run's
throughput on that run's own layout (:func:`calibrate`), and :data:`ANCHORS` keeps every figure
with its source so a test checks that the constants in tulu3/planner/hardware.py still do.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tulu3.parallel.layout import ParallelLayout
from tulu3.planner.pipeline import split_kind
from tulu3.planner.problem import Problem
from tulu3.planner.timing import step_time


@dataclass(frozen=True)
class Anchor:
    """One published pre-training run: its layout and the model TFLOP/s per GPU it reached."""

    name: str
    source: str
    model: str
    precision: str
    gpus: int
    tp: int
    pp: int
    vpp: int
    cp: int
    seq_len: int
    global_batch: int
    tflops: float
    """Published model TFLOP/s per GPU (H100 SXM)."""

    def problem(self, efficiency: float | None = None) -> Problem:
        return Problem(model=self.model, stage="sft", gpus=self.gpus, seq_len=self.seq_len,
                       global_batch=self.global_batch, precision=self.precision,
                       context_parallel=self.cp > 1, compute_efficiency=efficiency)

    def layout(self) -> ParallelLayout:
        uneven = split_kind(Problem(model=self.model, stage="sft", gpus=1, seq_len=1,
                                    global_batch=1).shape.layers, self.pp, self.vpp) == "uneven"
        return ParallelLayout(self.gpus, self.tp, self.pp, self.vpp, self.cp,
                              sequence_parallel=self.tp > 1, distributed_optimizer=True,
                              account_for_embedding_in_pipeline_split=uneven,
                              account_for_loss_in_pipeline_split=uneven)


LLAMA3_PAPER = ("Llama 3 paper (Dubey et al. 2024, arXiv:2407.21783), Table 4: 8,192 H100s, "
                "TP8 CP1 PP16 DP64, seq 8192, 16M tokens a batch: 430 TFLOP/s, 43% BF16 MFU; "
                "interleaved schedule (its v is not stated: VPP2 assumed)")
BRIDGE = ("Megatron-Bridge docs/performance-summary.md, NeMo 25.11 container, DGX-H100, FP8-CS "
          "pre-training")
ANCHORS: dict[str, Anchor] = {
    "llama3-405b-bf16": Anchor("llama3-405b-bf16", LLAMA3_PAPER, "llama3.1-405b", "bf16",
                               8192, 8, 16, 2, 1, 8192, 2048, 430.0),
    "bridge-70b-fp8": Anchor("bridge-70b-fp8", BRIDGE + ": 64 GPUs TP4 PP8 VP5, GBS 128",
                             "llama3.1-70b", "fp8", 64, 4, 8, 5, 1, 8192, 128, 719.0),
    "bridge-405b-fp8": Anchor("bridge-405b-fp8", BRIDGE + ": 1024 GPUs TP8 PP8 CP2 VP8, GBS 512",
                              "llama3.1-405b", "fp8", 1024, 8, 8, 8, 2, 8192, 512, 737.0),
    "bridge-8b-fp8": Anchor("bridge-8b-fp8", BRIDGE + ": 8 GPUs, FSDP (here DP8 dist-opt), "
                            "GBS 128", "llama3.1-8b", "fp8", 8, 1, 1, 1, 1, 8192, 128, 744.0),
}
CALIBRATED_ON = {"bf16": "llama3-405b-bf16", "fp8": "bridge-70b-fp8"}
"""The anchor each precision's efficiency is solved on; the others are checks."""


def model_flops_per_token(problem: Problem) -> float:
    """Training FLOPs per token by the published convention (Megatron's
    num_floating_point_operations): 6 x every weight, embedding and output layer included,
    plus causal attention's 6 x hidden x seq per layer (half of the s x s scores)."""
    shape = problem.shape
    h, kv = shape.hidden, shape.kv_heads * shape.head_dim
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * shape.ffn_hidden
    weights = shape.layers * per_layer + 2 * shape.vocab * h
    return 6 * weights + 6 * h * problem.seq_len * shape.layers


def predicted_tflops(anchor: Anchor, efficiency: float | None = None) -> float:
    """Model TFLOP/s per GPU the planner predicts for the anchor's run (its own layout)."""
    problem = anchor.problem(efficiency)
    seconds = step_time(problem, anchor.layout()).total
    tokens = problem.step_seqs * problem.seq_len
    return tokens * model_flops_per_token(problem) / (seconds * problem.gpus) / 1e12


def calibrate(anchor: Anchor, lo: float = 0.05, hi: float = 2.0) -> float:
    """The compute efficiency at which the planner reproduces ``anchor.tflops`` (bisection:
    the predicted throughput rises with the efficiency)."""
    if predicted_tflops(anchor, hi) < anchor.tflops:
        raise ValueError(f"{anchor.name}: even efficiency {hi} predicts less than published")
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if predicted_tflops(anchor, mid) < anchor.tflops else (lo, mid)
    return (lo + hi) / 2


def with_efficiency(problem: Problem, efficiency: float) -> Problem:
    return dataclasses.replace(problem, compute_efficiency=efficiency)
