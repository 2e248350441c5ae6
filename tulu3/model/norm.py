"""RMSNorm for the ``torch`` spec: Llama's norm, with sequence-parallel gradient handling.

megatron's torch-norm wrapper refuses sequence parallelism (its norm weights would need their
grads all-reduced over TP); this one marks its weight ``sequence_parallel`` so megatron's
``finalize_model_grads`` does that all-reduce.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps), computed in fp32 as HF Llama does. x: [..., h]."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                 **_: object) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class FusedRMSNorm(RMSNorm):
    """The same RMSNorm through the Triton kernel (kernels/rmsnorm_triton.py): one read of x
    forward, one fused backward. Chosen by tulu3/model/fusions.py."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from kernels.rmsnorm_triton import triton_rmsnorm

        return triton_rmsnorm(x, self.weight, self.eps)
