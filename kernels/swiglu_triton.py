"""Fused SwiGLU (forward + backward) in Triton; oracle: ``layer_reference.reference_swiglu``.

``y = silu(gate) * up`` for ``x = [gate | up]`` (megatron's fc1 output layout per TP rank): one
pass reads x and writes y without the ``silu(gate)`` intermediate; the backward recomputes the
sigmoid and writes both halves of the input gradient,
``d gate = dy * up * s * (1 + gate * (1 - s))`` and ``d up = dy * silu(gate)``, ``s = sigmoid``.
Math in fp32, one rounding to x's dtype. Runs on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_BLOCK = 1024


@triton.jit
def _forward_kernel(x_ptr, y_ptr, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * 2 * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * 2 * n_cols + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up
    tl.store(y_ptr + row * n_cols + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(x_ptr, dy_ptr, dx_ptr, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    base = row * 2 * n_cols
    gate = tl.load(x_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + base + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(gate)
    d_gate = dy * up * s * (1.0 + gate * (1.0 - s))
    tl.store(dx_ptr + base + cols, d_gate.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dx_ptr + base + n_cols + cols, (dy * gate * s).to(dx_ptr.dtype.element_ty),
             mask=mask)


class TritonSwiGLU(torch.autograd.Function):
    """x ``[..., 2f]`` -> ``silu(x[..., :f]) * x[..., f:]`` ``[..., f]``."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        rows, f = x2.shape[0], x2.shape[1] // 2
        y = torch.empty(rows, f, dtype=x.dtype, device=x.device)
        _forward_kernel[(rows, triton.cdiv(f, _BLOCK))](x2, y, f, BLOCK=_BLOCK)
        ctx.save_for_backward(x2)
        return y.reshape(*x.shape[:-1], f)

    @staticmethod
    def backward(ctx, dy: Tensor) -> Tensor:
        (x2,) = ctx.saved_tensors
        rows, f = x2.shape[0], x2.shape[1] // 2
        dx = torch.empty_like(x2)
        _backward_kernel[(rows, triton.cdiv(f, _BLOCK))](
            x2, dy.reshape(rows, f).contiguous(), dx, f, BLOCK=_BLOCK)
        return dx.reshape(*dy.shape[:-1], 2 * f)


def triton_swiglu(x: Tensor) -> Tensor:
    """Fused SwiGLU; same result as ``reference_swiglu`` up to rounding."""
    return TritonSwiGLU.apply(x)
