"""What the planner is asked (Problem) and what it answers with (Layout)."""

from __future__ import annotations

from dataclasses import dataclass

from tulu3.model.presets import PRESETS, LlamaShape
from tulu3.planner.hardware import GPUS, GPUSpec

STAGES = ("sft", "dpo", "rm", "rlvr")
RECOMPUTE = ("none", "selective", "full")
UNEVEN_KEYS = ("parallel.account_for_embedding_in_pipeline_split",
               "parallel.account_for_loss_in_pipeline_split")
"""Recipe keys an uneven pipeline split needs (Megatron TransformerConfig names)."""


class PlanError(ValueError):
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
    samples_per_prompt: int = 1
    ppo_epochs: int = 4
    value_model: str | None = None
    """rlvr: preset of PPO's value model; default the policy's (Tülu 3 used an 8B RM for all)."""
    spec: str = "te"
    """model.spec: te (flash attention, context parallelism) | torch (SDPA flash attention, no
    CP) | local (megatron's unfused attention keeps the s x s scores, no CP)."""
    fused_logprobs: bool = True
    """model.fused_logprobs: the full vocabulary logits are never materialized."""
    mem_fraction: float = 0.9
    """A layout fits when its peak estimate is at most this fraction of the GPU's memory."""
    overhead_gib: float = 2.0
    """CUDA context, NCCL buffers, cuBLAS workspace and allocator slack per GPU, GiB."""

    def validate(self) -> None:
        _choice("model", self.model, PRESETS)
        _choice("stage", self.stage, STAGES)
        _choice("gpu", self.gpu, GPUS)
        _choice("dpo reference", self.dpo_reference, ("cached", "online"))
        _choice("spec", self.spec, ("te", "torch", "local"))
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
    def gpu_spec(self) -> GPUSpec:
        return GPUS[self.gpu]

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


@dataclass(frozen=True)
class Layout:
    """One parallel layout: sizes, memory savers and how the layers split over the pipeline."""

    tp: int
    pp: int
    vpp: int
    cp: int
    dp: int
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    recompute: str = "none"
    uneven: bool = False
    """Embedding and loss each count as a layer in the pipeline split (405B's 126 layers)."""

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def sizes(self) -> tuple[int, int, int, int, int]:
        return (self.tp, self.pp, self.vpp, self.cp, self.dp)

    def describe(self) -> str:
        text = f"TP{self.tp} PP{self.pp}"
        text += f" VPP{self.vpp}" if self.vpp > 1 else ""
        text += f" CP{self.cp}" if self.cp > 1 else ""
        text += f" DP{self.dp}"
        extras = [name for name, on in (("SP", self.sequence_parallel),
                                        ("dist-opt", self.distributed_optimizer),
                                        ("uneven-split", self.uneven)) if on]
        if self.recompute != "none":
            extras.append(f"recompute={self.recompute}")
        return text + (f" ({', '.join(extras)})" if extras else "")

    def overrides(self, micro_batch: int) -> list[str]:
        """``key=value`` recipe overrides that select this layout (for ``--set``)."""
        pairs = [f"parallel.tp={self.tp}", f"parallel.pp={self.pp}", f"parallel.vpp={self.vpp}",
                 f"parallel.cp={self.cp}",
                 f"parallel.sequence_parallel={str(self.sequence_parallel).lower()}",
                 f"parallel.distributed_optimizer={str(self.distributed_optimizer).lower()}",
                 f"model.recompute={self.recompute}", f"train.micro_batch={micro_batch}"]
        if self.cp > 1:  # megatron-core has context parallelism only in TE attention
            pairs.append("model.spec=te")
        if self.uneven:
            pairs += [f"{key}=true" for key in UNEVEN_KEYS]
        return pairs
