"""The public fused log-prob entry points; the one place that chooses an implementation.

Stages call :func:`linear_logprobs` (SFT's cross entropy, DPO's sequence log-probs, RLVR's
log-probs and entropy) and never pick a backend themselves.
"""

from __future__ import annotations

import importlib.util
from functools import cache

import torch.distributed as dist
from torch import Tensor

from kernels.logprobs_chunked import linear_logprobs_chunked
from kernels.logprobs_reference import reference_linear_logprobs
from kernels.vocab_parallel import all_reduce_grad, tp_size, vocab_parallel_logprobs

IMPLS = ("auto", "triton", "chunked", "reference")

# Elements in one logits tile. GPU: all tokens x an 8k vocab chunk at 16k tokens (256 MiB in
# bf16), big enough for cuBLAS; CPU: 4M (16 MiB fp32), the PyTorch tile ops copy it a few times.
TRITON_TILE_BUDGET = 1 << 27
CHUNKED_TILE_BUDGET = 1 << 22


def resolve_impl(impl: str, hidden: Tensor) -> str:
    """``"auto"`` -> ``"triton"`` for CUDA tensors when Triton is importable, else ``"chunked"``."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    return "triton" if hidden.is_cuda and _have_triton() else "chunked"


@cache
def _have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


@cache
def _triton_ops():
    # imported on first use: CPU-only runs never import triton
    from kernels.logprobs_triton import TritonTileOps

    return TritonTileOps()


def linear_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, *,
                    tp_group: dist.ProcessGroup | None = None, vocab_start: int = 0,
                    with_entropy: bool = False,
                    impl: str = "auto") -> tuple[Tensor, Tensor | None]:
    """Log-probs of ``labels`` under ``softmax(hidden @ weight.T)`` without ``[n, vocab]`` logits.

    Fused output layer + log-softmax + gather (+ entropy): chunked over tokens and vocabulary
    with an online log-sum-exp; the backward recomputes the logits chunk by chunk.

    Args:
        hidden: ``[..., h]`` fp32 or bf16, the final hidden states, REPLICATED across the TP group
            (Megatron's input to the output layer; with sequence parallelism, all-gather it first
            with ``gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)``,
            because the gradient this function returns is already the full one).
        weight: ``[v_local, h]`` same dtype: this rank's shard of the output weight, covering
            GLOBAL vocab ids ``[vocab_start, vocab_start + v_local)`` (the whole vocab without TP).
        labels: ``[...]`` int64 GLOBAL vocab ids, ``-100`` = ignore; must be valid ids otherwise.
        tp_group: the tensor-parallel group the vocabulary is split over; None = not split (not
            the world group).
        vocab_start: first global id of this rank's shard.
        with_entropy: also return the entropy of the full-vocabulary softmax.
        impl: ``"auto"`` (Triton for CUDA tensors when importable, else ``"chunked"``),
            ``"triton"``, ``"chunked"`` (PyTorch tiles) or ``"reference"`` (materializes the
            local logits: the plain oracle without TP, ``vocab_parallel_logprobs`` with TP).

    Returns:
        ``(logprobs, entropy)``: fp32 ``[...]``, 0.0 at ignored positions (both), identical on
        every TP rank; entropy is None unless requested.

    Gradients: ``weight`` gets this shard's gradient. ``hidden`` gets the gradient of the FULL
    loss, summed over the vocabulary shards with an all-reduce over ``tp_group`` inside the
    backward; do not also pass ``hidden`` through Megatron's
    ``copy_to_tensor_model_parallel_region`` (its backward would all-reduce it a second time).
    Both are accumulated in fp32 and returned in the inputs' dtype.
    """
    impl = resolve_impl(impl, hidden)
    kwargs = {"tp_group": tp_group, "vocab_start": vocab_start, "with_entropy": with_entropy}
    if impl == "reference":
        if tp_size(tp_group) == 1:
            return reference_linear_logprobs(hidden, weight, labels, with_entropy)
        # same gradient contract as the fused path: hidden gets the whole loss's gradient
        logits = all_reduce_grad(hidden, tp_group) @ weight.T
        return vocab_parallel_logprobs(logits, labels, **kwargs)
    if impl == "triton":
        return linear_logprobs_chunked(hidden, weight, labels, ops=_triton_ops(),
                                       tile_budget=TRITON_TILE_BUDGET, **kwargs)
    return linear_logprobs_chunked(hidden, weight, labels, tile_budget=CHUNKED_TILE_BUDGET,
                                   **kwargs)


def cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, *,
                  tp_group: dist.ProcessGroup | None = None, vocab_start: int = 0,
                  impl: str = "auto") -> Tensor:
    """Per-token cross entropy ``-logprob``: fp32 ``[...]``, 0.0 at ignored positions.

    Reduce it yourself (sum over tokens / number of tokens), e.g. for Megatron's per-token loss.
    """
    logprobs, _ = linear_logprobs(hidden, weight, labels, tp_group=tp_group,
                                  vocab_start=vocab_start, impl=impl)
    return -logprobs
