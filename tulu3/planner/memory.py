"""Peak memory per GPU: parameters, gradients, optimizer state, activations, KV cache.

Bytes per parameter follow Megatron's mixed-precision DDP (docs/distrib_optimizer.md): bf16
weights (2), fp32 main gradients (4), fp32 master weights + Adam m and v (12), the last 12
sharded over the data-parallel x context-parallel group by the distributed optimizer: 18 bytes
per parameter, or 6 + 12 / (dp x cp). Activations follow Korthikanti et al. 2022, "Reducing
Activation Recomputation in Large Transformer Models" (Table 2), adapted to Llama below.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from tulu3.model.presets import LlamaShape, padded_vocab
from tulu3.parallel.layout import ParallelLayout
from tulu3.planner.hardware import GIB
from tulu3.planner.pipeline import peak_inflight_layers, rank_chunk_layers
from tulu3.planner.prefill import prefill_peak
from tulu3.planner.problem import Problem

BF16 = 2
FP32 = 4
ADAM_STATE = 12  # fp32 master weight + Adam m + Adam v


@dataclass(frozen=True)
class ActivationTerms:
    """Bytes one transformer layer keeps for backward, as Korthikanti et al. count them.

    ``replicated`` and ``sharded`` are in units of s*b*h bytes: tensors every TP rank keeps whole
    (layer-norm inputs, linear inputs, dropout masks) unless sequence parallelism splits them,
    and tensors TP splits. ``scores`` multiplies a*s*s*b: the attention scores a rank keeps (TP
    splits heads). GPT-3 (the paper): 10 + 24 + 5 a s / h, i.e. sbh (34 + 5as/h) per layer.
    """

    replicated: float
    sharded: float
    scores: float

    @classmethod
    def gpt3(cls) -> ActivationTerms:
        """The paper's GPT layer: LayerNorm, GeLU MLP of 4h, dropout, unfused attention."""
        # replicated: 2 LN inputs (4), QKV and MLP inputs (2 + 2), two dropout masks (1 + 1);
        # sharded: Q, K (4), V (2), projection input (2), GeLU input and output (8 + 8);
        # scores: softmax output (2), dropout mask (1), dropout output (2).
        return cls(replicated=10, sharded=24, scores=5)

    @classmethod
    def llama(cls, shape: LlamaShape, attention: str = "flash") -> ActivationTerms:
        """A Llama layer: RMSNorm, GQA, SwiGLU, no dropout; flash attention keeps no scores."""
        kv_ratio = shape.kv_heads / shape.heads  # K and V are this fraction of Q (GQA)
        ffn_ratio = shape.ffn_hidden / shape.hidden
        # replicated: 2 RMSNorm inputs (2 + 2), QKV and fc1 inputs (2 + 2).
        # sharded: Q (2), K and V (2 + 2 per kv_ratio), attention output = proj input (2),
        # fc1 output = gate and up (4 f/h), SwiGLU output = fc2 input (2 f/h).
        sharded = 2 + 4 * kv_ratio + 2 + 6 * ffn_ratio
        # Unfused attention keeps the softmax output (2 bytes); no dropout, so no mask.
        return cls(replicated=8, sharded=sharded, scores=0 if attention == "flash" else 2)


def layer_activation_bytes(terms: ActivationTerms, seq: int, batch: int, hidden: int, heads: int,
                           tp: int = 1, sp: bool = False, recompute: str = "none") -> float:
    """Bytes one layer keeps for one micro-batch of ``batch`` sequences of ``seq`` tokens.

    ``seq`` is the length on this rank (seq_len / cp). Korthikanti Table 2: TP gives
    sbh(r + s'/t + 5as/(ht)); TP + SP divides everything by t; selective recompute drops the
    scores; full recompute keeps only the layer input, 2sbh (2sbh/t with SP, as Megatron
    checkpoints the sequence-parallel shard).
    """
    sbh = seq * batch * hidden
    if recompute == "full":
        return 2 * sbh / (tp if sp else 1)
    scores = 0.0 if recompute == "selective" else terms.scores * heads * seq * seq * batch
    if sp:
        return (sbh * (terms.replicated + terms.sharded) + scores) / tp
    return sbh * terms.replicated + (sbh * terms.sharded + scores) / tp


@lru_cache(maxsize=64)
def layer_params(shape: LlamaShape) -> tuple[int, int]:
    """(linear parameters TP splits, RMSNorm parameters every TP rank keeps) of one layer."""
    kv_dim = shape.kv_heads * shape.head_dim
    linear = (shape.hidden * (shape.hidden + 2 * kv_dim) + shape.hidden * shape.hidden
              + 3 * shape.hidden * shape.ffn_hidden)
    return linear, 2 * shape.hidden


def rank_params(shape: LlamaShape, layout: ParallelLayout, rank: int, head: str = "lm"
                ) -> float:
    """Parameters one GPU of pipeline ``rank`` holds (``head``: lm | scalar value/reward head)."""
    layers = sum(rank_chunk_layers(shape.layers, layout, rank))
    linear, norms = layer_params(shape)
    params = layers * (linear / layout.tp + norms)
    vocab_rows = padded_vocab(shape.vocab, layout.tp) / layout.tp
    if rank == 0:
        params += vocab_rows * shape.hidden
    if rank == layout.pp - 1:
        params += shape.hidden  # final RMSNorm
        params += vocab_rows * shape.hidden if head == "lm" else shape.hidden
    return params


@dataclass(frozen=True)
class Memory:
    """Peak bytes on one GPU, by kind; ``rank`` is the pipeline rank it belongs to."""

    rank: int
    weights: float
    """bf16 weights of the trained models."""
    grads: float
    """fp32 main gradients (Megatron's grad buffer)."""
    optimizer: float
    """fp32 master weights + Adam moments, sharded with the distributed optimizer."""
    frozen: float
    """bf16 weights of frozen models (DPO online reference, RLVR reference)."""
    activations: float
    kv_cache: float
    """RLVR generation; not alive at the same time as training activations."""
    overhead: float
    prefill: float = 0.0
    """RLVR generation: one micro-batch's prefill transients, beside the KV cache."""

    @property
    def total(self) -> float:
        static = self.weights + self.grads + self.optimizer + self.frozen + self.overhead
        return static + max(self.activations, self.kv_cache + self.prefill)

    def gib(self) -> dict[str, float]:
        kinds = ("weights", "grads", "optimizer", "frozen", "activations", "kv_cache", "prefill",
                 "overhead")
        out = {kind: getattr(self, kind) / GIB for kind in kinds}
        out["total"] = self.total / GIB
        return out


def _models(problem: Problem) -> tuple[list[tuple[LlamaShape, str]], list[LlamaShape]]:
    """(trained models with their head, frozen models) the stage keeps on every GPU."""
    if problem.stage == "rm":
        return [(problem.shape, "scalar")], []
    if problem.stage == "dpo":
        frozen = [problem.shape] if problem.dpo_reference == "online" else []
        return [(problem.shape, "lm")], frozen
    if problem.stage == "rlvr":
        return [(problem.shape, "lm"), (problem.value_shape, "scalar")], [problem.shape]
    return [(problem.shape, "lm")], []


def activation_bytes(problem: Problem, layout: ParallelLayout, shape: LlamaShape, rank: int,
                     head: str, recompute: str = "none") -> float:
    """Activations ``rank`` keeps at its pipeline peak, for one model being trained
    (``recompute``: model.recompute, none | selective | full)."""
    terms = ActivationTerms.llama(shape, problem.attention)
    seq, batch = problem.seq_len // layout.cp, problem.micro_seqs
    sp = layout.sequence_parallel
    per_layer = layer_activation_bytes(terms, seq, batch, shape.hidden, shape.heads, layout.tp,
                                       sp, recompute)
    sizes = rank_chunk_layers(shape.layers, layout, rank)
    if layout.cp > 1 and problem.spec == "torch" and recompute != "full":
        # The torch spec's CP attention keeps K and V all-gathered (the whole sequence) for the
        # backward: (cp - 1) more chunks of the K and V that `sharded` counts (2 + 2 per
        # kv_ratio, split by TP heads whether or not SP is on).
        kv_ratio = shape.kv_heads / shape.heads
        per_layer += 4 * kv_ratio * seq * batch * shape.hidden * (layout.cp - 1) / layout.tp
    micro_batches = problem.step_seqs // (layout.dp * problem.micro_seqs)
    total = peak_inflight_layers(sizes, rank, layout.pp, micro_batches) * per_layer
    if recompute == "full":  # the layer being recomputed holds its full activations
        total += layer_activation_bytes(terms, seq, batch, shape.hidden, shape.heads, layout.tp,
                                        sp, "none")
    if rank == layout.pp - 1:  # final norm input + output layer input, one micro-batch deep
        sbh = seq * batch * shape.hidden
        total += 4 * sbh / (layout.tp if sp else 1)
        if head == "lm" and not problem.fused_logprobs:  # fp32 logits for the cross entropy
            # (all-gathered over CP: the loss sees whole rows, tulu3.step)
            total += FP32 * seq * layout.cp * batch * padded_vocab(shape.vocab, layout.tp) / (
                layout.tp)
    return total


def kv_cache_bytes(problem: Problem, layout: ParallelLayout, rank: int) -> float:
    """RLVR rollouts: K and V (bf16) of the policy's layers on ``rank`` for the DP rank's batch.

    Conservative: sequences at full length, context parallelism does not split them. All of a
    data-parallel rank's sequences are generated together, or with ``generation_tokens``
    (tulu3/rollout/pipeline.py) pp micro-batches of that many slots each.
    """
    if problem.stage != "rlvr":
        return 0.0
    shape = problem.shape
    layers = sum(rank_chunk_layers(shape.layers, layout, rank))
    slots = problem.seq_len * -(-problem.step_seqs // layout.dp)
    if problem.generation_tokens is not None:
        slots = min(slots, layout.pp * max(problem.generation_tokens, problem.seq_len))
    kv_dim = shape.kv_heads // layout.tp * shape.head_dim
    return 2 * BF16 * layers * kv_dim * slots


def generation_rows(problem: Problem, layout: ParallelLayout) -> int:
    """Sequences in one generation micro-batch of a DP rank: all of its sequences, or as many
    as ``generation_tokens`` slots of ``seq_len`` hold (at least one), as the engine cuts them
    (tulu3/rollout/decode.py ``split_micro_batches``)."""
    seqs = -(-problem.step_seqs // layout.dp)
    if problem.generation_tokens is None:
        return seqs
    return min(seqs, max(1, problem.generation_tokens // problem.seq_len))


def prefill_bytes(problem: Problem, layout: ParallelLayout, rank: int) -> float:
    """RLVR rollouts: the transients of one generation micro-batch's prefill on ``rank``
    (tulu3/planner/prefill.py), bf16, every prompt at its full length; a rank runs one forward
    at a time, so one prefill is alive beside the in-flight micro-batches' KV caches."""
    if problem.stage != "rlvr":
        return 0.0
    prompt = problem.seq_len - problem.response_tokens
    peak = prefill_peak(problem.shape, generation_rows(problem, layout), prompt, layout.tp,
                        last=rank == layout.pp - 1,
                        vocab_rows=padded_vocab(problem.shape.vocab, layout.tp), act_bytes=BF16)
    return peak.total


def rank_memory(problem: Problem, layout: ParallelLayout, rank: int,
                recompute: str = "none") -> Memory:
    """Memory of one GPU of pipeline ``rank``."""
    trained, frozen = _models(problem)
    train_params = sum(rank_params(shape, layout, rank, head) for shape, head in trained)
    frozen_params = sum(rank_params(shape, layout, rank) for shape in frozen)
    shard = layout.dp * layout.cp if layout.distributed_optimizer else 1
    acts = max(activation_bytes(problem, layout, shape, rank, head, recompute)
               for shape, head in trained)
    return Memory(rank=rank, weights=BF16 * train_params, grads=FP32 * train_params,
                  optimizer=ADAM_STATE * train_params / shard, frozen=BF16 * frozen_params,
                  activations=acts, kv_cache=kv_cache_bytes(problem, layout, rank),
                  overhead=problem.overhead_gib * GIB,
                  prefill=prefill_bytes(problem, layout, rank))


def peak_memory(problem: Problem, layout: ParallelLayout, recompute: str = "none") -> Memory:
    """The most loaded GPU. Middle pipeline ranks hold the same layers and rank 1 has the most
    micro-batches in flight among them, so ranks 0, 1 and pp - 1 cover the maximum."""
    ranks = sorted({0, min(1, layout.pp - 1), layout.pp - 1})
    return max((rank_memory(problem, layout, rank, recompute) for rank in ranks),
               key=lambda m: m.total)
