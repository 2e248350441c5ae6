"""The oracle: log-probs and entropy the obvious way, materializing the full logits.

Everything else in ``kernels/`` is tested against these two functions. They are also the
"naive" path of the benchmark: a matmul in the input dtype, then log-softmax in fp32, then a
gather, with PyTorch autograd doing the backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100


def reference_logprobs(logits: Tensor, labels: Tensor,
                       with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """Log-probs of ``labels`` under ``softmax(logits)`` (and its entropy), full vocabulary.

    Args:
        logits: ``[..., vocab]`` any float dtype; upcast to fp32 before the log-softmax.
        labels: ``[...]`` int64 vocab ids; ``-100`` marks positions to ignore.
        with_entropy: also return ``-sum_j p_j log p_j``.

    Returns:
        ``(logprobs, entropy)``: fp32 ``[...]``, 0.0 at ignored positions; entropy None unless
        requested.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    ignore = labels == IGNORE_INDEX
    safe = labels.masked_fill(ignore, 0)
    logprobs = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1).masked_fill(ignore, 0.0)
    entropy = None
    if with_entropy:
        entropy = -(logp.exp() * logp).sum(dim=-1).masked_fill(ignore, 0.0)
    return logprobs, entropy


def reference_linear_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor,
                              with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """``reference_logprobs(hidden @ weight.T, labels)``: hidden ``[..., h]``, weight ``[v, h]``.

    The matmul runs in the inputs' dtype (bf16 logits for bf16 inputs, as Megatron's output
    layer produces them), so this is also the baseline the fused kernels must match.
    """
    return reference_logprobs(hidden @ weight.T, labels, with_entropy)
