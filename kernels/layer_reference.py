"""Oracles for the fused layer kernels: RMSNorm, SwiGLU and RoPE the plain PyTorch way.

Each is the computation the ``torch`` spec runs unfused (tulu3/model/norm.py's RMSNorm,
megatron's gated-linear-unit MLP activation, megatron's ``_apply_rotary_pos_emb_bshd``), with
PyTorch autograd for the backward. The Triton kernels (rmsnorm_triton.py, swiglu_triton.py,
rope_triton.py) are tested against these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def reference_rmsnorm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """HF Llama's RMSNorm: normalize in fp32, cast to x's dtype, scale. x ``[..., h]``."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def reference_swiglu(x: Tensor) -> Tensor:
    """megatron's GLU with silu: ``silu(gate) * up`` for ``x = [gate | up]`` ``[..., 2f]``."""
    gate, up = torch.chunk(x, 2, dim=-1)
    return F.silu(gate) * up


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def reference_rope(t: Tensor, freqs: Tensor) -> Tensor:
    """Non-interleaved rotary embedding, as megatron applies it (sbhd, mscale 1).

    t ``[s, b, heads, d]``; freqs ``[s, 1 | b, 1, d]`` fp32 angles (radians).
    """
    cos, sin = torch.cos(freqs).to(t.dtype), torch.sin(freqs).to(t.dtype)
    return t * cos + _rotate_half(t) * sin
