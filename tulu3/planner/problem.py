"""What the planner is asked (:class:`Problem`); it answers with tulu3's own
:class:`~tulu3.parallel.layout.ParallelLayout` (plus a recompute setting), checked by the same
rules a run applies."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tulu3.config import UserError
from tulu3.model.presets import PRESETS, LlamaShape
from tulu3.parallel.layout import UNEVEN_KEYS as UNEVEN_SWITCHES
from tulu3.planner.hardware import GPUS, GPUSpec

STAGES = ("sft", "dpo", "rm", "rlvr")
RECOMPUTE = ("none", "selective", "full")
UNEVEN_KEYS = tuple(f"parallel.{key}" for key in UNEVEN_SWITCHES)
"""Recipe keys an uneven pipeline split needs (Megatron TransformerConfig names)."""


class PlanError(UserError):
    """A planning request that cannot be answered; the message is one line for the user."""


def _choice(kind: str, value: str, options) -> None:
    if value not in options:
        raise PlanError(f"unknown {kind} {value!r}; choose one of {', '.join(options)}")


@dataclass(frozen=True)
class Problem:
    """One training job to place on a cluster.

    ``global_batch`` counts what the stage's ``train.global_batch`` counts: sequences (sft),
    preference pairs (dpo, rm: chosen + rejected are two sequences) or prompts (rlvr).
    """

    model: str
    stage: str
    gpus: int
    seq_len: int
    """Tokens per sequence; for rlvr prompt + response."""
    global_batch: int
    micro_batch: int = 1
    """Samples per micro-batch (train.micro_batch)."""
    gpu: str = "h100-80gb"
    gpus_per_node: int = 8
    dpo_reference: str = "cached"
    """cached: reference log-probs from a pre-pass (no second model); online: a frozen copy."""
    response_len: int | None = None
    """rlvr: generated tokens per sample (rlvr.max_new_tokens); default seq_len // 2."""
    generation_tokens: int | None = None
    """rlvr: KV-cache slots per generation micro-batch (rlvr.generation_tokens; pp of them
    decode at once); default all of a DP rank's sequences together."""
    samples_per_prompt: int = 1
    ppo_epochs: int = 4
    value_model: str | None = None
    """rlvr: preset of PPO's value model; default the policy's (Tülu 3 used an 8B RM for all)."""
    spec: str = "te"
    """model.spec: te (flash attention, ring context parallelism) | torch (SDPA flash /
    FlexAttention, context parallelism by all-gathering K/V) | local (megatron's unfused
    attention keeps the s x s scores, no CP)."""
    fused_logprobs: bool = True
    """model.fused_logprobs: the full vocabulary logits are never materialized."""
    mem_fraction: float = 0.9
    """A layout fits when its peak estimate is at most this fraction of the GPU's memory."""
    precision: str = "bf16"
    """bf16 | fp8 (model.fp8): which calibrated efficiency applies (tulu3/planner/anchors.py)."""
    context_parallel: bool | None = None
    """Propose CP > 1 layouts: True / False, or None (default) for "where tested": with the
    torch spec (its all-gather CP attention is tested on CPU), not with te (TE's CP runs only
    on a GPU cluster and is untested here)."""
    compute_efficiency: float | None = None
    """Override of the GPU's calibrated fraction of peak FLOP/s (what-if, calibration)."""
    overhead_gib: float = 2.0
    """CUDA context, NCCL buffers, cuBLAS workspace and allocator slack per GPU, GiB."""

    def validate(self) -> None:
        _choice("model", self.model, PRESETS)
        _choice("stage", self.stage, STAGES)
        _choice("gpu", self.gpu, GPUS)
        _choice("dpo reference", self.dpo_reference, ("cached", "online"))
        _choice("spec", self.spec, ("te", "torch", "local"))
        _choice("precision", self.precision, ("bf16", "fp8"))
        if self.value_model is not None:
            _choice("value model", self.value_model, PRESETS)
        for name in ("gpus", "seq_len", "global_batch", "micro_batch", "gpus_per_node",
                     "samples_per_prompt", "ppo_epochs"):
            if getattr(self, name) < 1:
                raise PlanError(f"--{name.replace('_', '-')} must be >= 1, "
                                f"got {getattr(self, name)}")
        if self.gpus > self.gpus_per_node and self.gpus % self.gpus_per_node:
            raise PlanError(f"--gpus {self.gpus} is not a multiple of the node size "
                            f"--gpus-per-node {self.gpus_per_node}")
        if self.gpus < self.gpus_per_node and self.gpus_per_node % self.gpus:
            raise PlanError(f"--gpus {self.gpus} does not divide a node of "
                            f"--gpus-per-node {self.gpus_per_node}")
        if self.stage == "rlvr" and not 0 < self.response_tokens < self.seq_len:
            raise PlanError(f"--response-len {self.response_tokens} must be between 1 and "
                            f"--seq-len {self.seq_len} - 1 (the prompt needs tokens too)")

    @property
    def shape(self) -> LlamaShape:
        return PRESETS[self.model]

    @property
    def value_shape(self) -> LlamaShape:
        return PRESETS[self.value_model or self.model]

    @property
    def proposes_cp(self) -> bool:
        """Whether CP > 1 layouts are enumerated (:attr:`context_parallel`)."""
        return self.spec == "torch" if self.context_parallel is None else self.context_parallel

    @property
    def gpu_spec(self) -> GPUSpec:
        """The GPU, its ``compute_efficiency`` the one of this problem's precision."""
        spec = GPUS[self.gpu]
        efficiency = self.compute_efficiency or (
            spec.fp8_efficiency if self.precision == "fp8" else spec.compute_efficiency)
        return dataclasses.replace(spec, compute_efficiency=efficiency)

    @property
    def response_tokens(self) -> int:
        return self.response_len if self.response_len is not None else self.seq_len // 2

    @property
    def micro_seqs(self) -> int:
        """Sequences in one micro-batch: a preference pair is two (chosen, rejected)."""
        return self.micro_batch * (2 if self.stage in ("dpo", "rm") else 1)

    @property
    def step_seqs(self) -> int:
        """Sequences trained on per step: rlvr draws samples_per_prompt per prompt."""
        per_sample = {"dpo": 2, "rm": 2, "rlvr": self.samples_per_prompt}.get(self.stage, 1)
        return self.global_batch * per_sample

    @property
    def attention(self) -> str:
        return "unfused" if self.spec == "local" else "flash"

    @property
    def budget_bytes(self) -> float:
        return self.mem_fraction * self.gpu_spec.hbm_bytes
