"""Fused RMSNorm (forward + backward) in Triton; oracle: ``layer_reference.reference_rmsnorm``.

Forward: one program per row reads x once, keeps ``rstd`` (fp32, one per row) for the backward
and writes ``weight * cast(x * rstd)`` (the cast to x's dtype before the scale, as HF Llama).
Backward: one program per block of rows writes the input gradient
``rstd * (dn - n * mean(dn * n))`` with ``dn = dy * weight``, ``n = x * rstd``, and its block's
partial weight gradient ``sum dy * cast(n)``; the partials are summed in fp32. Runs on CPU
tensors under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _forward_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    normed = (x * rstd).to(y_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * n_cols + cols, (normed * w).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _backward_kernel(x_ptr, w_ptr, dy_ptr, rstd_ptr, dx_ptr, dw_ptr, n_rows, n_cols,
                     rows_per_program, BLOCK: tl.constexpr):
    block = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(rows_per_program):
        row = block * rows_per_program + i
        if row < n_rows:
            offs = row * n_cols + cols
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            n = x * rstd
            dn = dy * w
            dx = rstd * (dn - n * (tl.sum(dn * n, axis=0) / n_cols))
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            dw += dy * n.to(dx_ptr.dtype.element_ty).to(tl.float32)
    tl.store(dw_ptr + block * n_cols + cols, dw, mask=mask)


_PROGRAMS = 256  # backward programs: enough to fill a GPU's SMs


def _warps(block: int) -> int:
    """More warps for wider rows (one program holds a whole row): 4 up to 2048, 32 past 16384."""
    return 4 if block <= 2048 else 8 if block <= 8192 else 16 if block <= 16384 else 32


class TritonRMSNorm(torch.autograd.Function):
    """``weight * cast(x * rsqrt(mean(x^2) + eps))``: x ``[..., h]``, weight ``[h]``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        rows, cols = x2.shape
        y = torch.empty_like(x2)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(cols)
        _forward_kernel[(rows,)](x2, weight.contiguous(), y, rstd, cols, eps, BLOCK=block,
                                 num_warps=_warps(block))
        ctx.save_for_backward(x2, weight, rstd)
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, Tensor, None]:
        x2, weight, rstd = ctx.saved_tensors
        rows, cols = x2.shape
        # At most _PROGRAMS partial weight gradients ([programs, h] fp32) to sum.
        per_program = triton.cdiv(rows, min(rows, _PROGRAMS))
        programs = triton.cdiv(rows, per_program)
        block = triton.next_power_of_2(cols)
        dx = torch.empty_like(x2)
        dw = torch.empty(programs, cols, dtype=torch.float32, device=x2.device)
        _backward_kernel[(programs,)](x2, weight.contiguous(),
                                      dy.reshape(rows, cols).contiguous(), rstd, dx, dw, rows,
                                      cols, per_program, BLOCK=block, num_warps=_warps(block))
        return dx.reshape(dy.shape), dw.sum(0).to(weight.dtype), None


def triton_rmsnorm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Fused RMSNorm; same result as ``reference_rmsnorm`` up to rounding."""
    return TritonRMSNorm.apply(x, weight, eps)
