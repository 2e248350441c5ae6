"""Peak transient bytes of one RLVR generation prefill on one GPU (beside its KV cache).

tulu3/rollout/ prefills a generation micro-batch of ``rows`` left-padded prompts of ``prompt``
tokens (T = rows x prompt) through a pipeline stage's layers under ``torch.no_grad`` with
sequence parallelism off (tulu3/rollout/engine.py), so no layer keeps anything for a backward:
only one layer's transients are alive at a time, beside what the whole forward holds. With B
bytes an activation element, h hidden, d head dim, TP t, q = heads / t x d, k = kv_heads / t x d
and f = ffn_hidden / t (every count below was checked allocation by allocation with the torch
profiler on CPU, tests/benchmarks/bench_prefill_memory.py):

- held for the whole forward: the engine's bool mask [rows, 1, prompt, prompt] (1 byte,
  tulu3/rollout/decode.py ``causal_mask``), the per-token RoPE table [T, d] in fp32
  (tulu3/model/gpt.py), the stage's input [T, h] (embedding output or received hidden states;
  GPTModel keeps it until the forward returns) and the running layer's input [T, h] (megatron's
  TransformerBlock keeps it until the layer returns);
- one layer, at the heaviest of its phases:
  pre-MLP RMSNorm (its input, the post-attention residual B, and tulu3/model/norm.py's
  temporaries: an fp32 copy (not in fp32), the fp32 normed tensor, its cast (not in fp32), the
  output B); attention (norm output h, fused QKV output q + 2k, megatron's copy of Q, RoPE's
  three temporaries of Q (the same for K is smaller), rotated Q and K, the SDPA output q, the
  cos / sin tables 2 x 4 T d, the inverted bool mask and the additive mask SDPA builds from it in
  the query dtype: (1 + B) rows prompt^2; flash / memory-efficient SDPA keep no scores); or the
  SwiGLU MLP (residual h, norm output h, fc1's gate + up 2f, silu(gate) f, up + megatron's
  ``glu_linear_offset`` f, their product f);
- the last stage, after its layers: the final norm's temporaries, or its output [T, h] beside
  the last position's logits [rows, V / t] (B), their TP all-gather and concatenation
  [rows, V] (2B, t > 1), the fp32 copy sampling reads (4) and the sampler's fp64 work
  (tulu3/rollout/sampling.py: probabilities, sorted order, cumulative sums: 4 x 8 bytes), each x
  rows x V (V: the padded vocabulary).

Left out (small): token / position / valid buffers (17 bytes a slot), the embedding's
transpose, per-thread SDPA tiles, the log-sum-exp. The KV cache being filled is
:func:`tulu3.planner.memory.kv_cache_bytes`.
"""

from __future__ import annotations

from dataclasses import dataclass

from tulu3.model.presets import LlamaShape

FP32, FP64 = 4, 8
SAMPLER_FP64_TENSORS = 4
"""fp64 [rows, V] tensors alive at once in ``pick_tokens`` with top_p < 1 (sorted probabilities,
their order (int64), the cumulative sum and the mass before each token)."""


@dataclass(frozen=True)
class PrefillPeak:
    """Bytes of one prefill on one GPU: ``held`` for the whole forward, plus the heaviest of
    one layer's phases or, on the last stage, the output head (they never overlap)."""

    held: float
    norm: float
    attention: float
    mlp: float
    head: float
    """0 except on the last pipeline stage."""

    @property
    def total(self) -> float:
        return self.held + max(self.norm, self.attention, self.mlp, self.head)


def rmsnorm_bytes(act_bytes: int) -> float:
    """Bytes per [T, h] element tulu3's RMSNorm allocates (its input not counted): an fp32 copy
    and a cast back (neither in fp32), the fp32 normed tensor and the output."""
    convert = 0 if act_bytes == FP32 else FP32 + act_bytes
    return convert + FP32 + act_bytes


def prefill_peak(shape: LlamaShape, rows: int, prompt: int, tp: int = 1, last: bool = True,
                 vocab_rows: int | None = None, act_bytes: int = 2) -> PrefillPeak:
    """The prefill of ``rows`` prompts of ``prompt`` tokens through one stage (module doc).

    ``vocab_rows``: the output layer's padded vocabulary (default ``shape.vocab``);
    ``act_bytes``: 2 (bf16, the planner) or 4 (fp32, the CPU measurement).
    """
    tokens, h, d, b = rows * prompt, shape.hidden, shape.head_dim, act_bytes
    q, k = shape.heads // tp * d, shape.kv_heads // tp * d
    f = shape.ffn_hidden / tp
    square = rows * prompt * prompt
    held = square + FP32 * tokens * d + 2 * b * tokens * h
    norm = (b + rmsnorm_bytes(b)) * tokens * h
    # norm output, QKV, megatron's Q copy, RoPE's 3 temporaries of Q, rotated Q and K, SDPA's
    # output; cos / sin; masks. RoPE's peak and SDPA's (the masks) bounded together by their sum.
    attention = (b * tokens * (h + (q + 2 * k) + q + 3 * q + q + k + q)
                 + 2 * FP32 * tokens * d + (1 + b) * square)
    mlp = b * tokens * (2 * h + 5 * f)
    head = 0.0
    if last:
        vocab = vocab_rows or shape.vocab
        per_row = b * vocab / tp + (2 * b * vocab if tp > 1 else 0) + FP32 * vocab
        sampling = rows * (per_row + SAMPLER_FP64_TENSORS * FP64 * vocab)
        head = max(rmsnorm_bytes(b) * tokens * h, b * tokens * h + sampling)
    return PrefillPeak(held, norm, attention, mlp, head)
