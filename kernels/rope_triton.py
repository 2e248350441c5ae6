"""Fused rotary embedding (forward + backward) in Triton; oracle: ``reference_rope``
(kernels/layer_reference.py).

Non-interleaved RoPE on sbhd activations, the layout megatron's attention hands to
``fused_apply_rotary_pos_emb(t, freqs)``: one program per (position, batch row) loads that row's
angles once, takes their cos / sin in fp32 and rotates every head:
``[x1, x2] -> [x1 cos_a - x2 sin_a, x2 cos_b + x1 sin_b]`` (a, b: the two halves of the angles).
The backward is the transposed rotation. Runs on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _rope_kernel(t_ptr, f_ptr, out_ptr, heads, half, BACKWARD: tl.constexpr,
                 BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # one (position, batch) row: heads x 2 * half values
    offs = tl.arange(0, BLOCK)
    mask = offs < half
    fa = tl.load(f_ptr + row * 2 * half + offs, mask=mask, other=0.0).to(tl.float32)
    fb = tl.load(f_ptr + row * 2 * half + half + offs, mask=mask, other=0.0).to(tl.float32)
    cos_a, sin_a, cos_b, sin_b = tl.cos(fa), tl.sin(fa), tl.cos(fb), tl.sin(fb)
    for h in range(heads):
        base = (row * heads + h) * 2 * half
        x1 = tl.load(t_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(t_ptr + base + half + offs, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:  # the transpose of the forward rotation
            y1 = x1 * cos_a + x2 * sin_b
            y2 = x2 * cos_b - x1 * sin_a
        else:
            y1 = x1 * cos_a - x2 * sin_a
            y2 = x2 * cos_b + x1 * sin_b
        tl.store(out_ptr + base + offs, y1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptr + base + half + offs, y2.to(out_ptr.dtype.element_ty), mask=mask)


def _rotate(t: Tensor, freqs: Tensor, backward: bool) -> Tensor:
    s, b, heads, d = t.shape
    f = freqs.expand(s, b, 1, d).reshape(s * b, d).float().contiguous()
    t = t.contiguous()
    out = torch.empty_like(t)
    _rope_kernel[(s * b,)](t, f, out, heads, d // 2, BACKWARD=backward,
                           BLOCK=triton.next_power_of_2(d // 2))
    return out


class TritonRoPE(torch.autograd.Function):
    """t ``[s, b, heads, d]`` rotated by freqs ``[s, 1 | b, 1, d]`` (radians)."""

    @staticmethod
    def forward(ctx, t: Tensor, freqs: Tensor) -> Tensor:
        ctx.save_for_backward(freqs)
        return _rotate(t, freqs, backward=False)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (freqs,) = ctx.saved_tensors
        return _rotate(grad, freqs, backward=True), None


def triton_rope(t: Tensor, freqs: Tensor, interleaved: bool = False) -> Tensor:
    """megatron's ``fused_apply_rotary_pos_emb(t, freqs, interleaved)`` hook, non-interleaved."""
    if interleaved:
        raise ValueError("the Triton RoPE kernel is non-interleaved (Llama's layout)")
    if freqs.shape[-1] != t.shape[-1]:
        raise ValueError(f"partial rotary dims ({freqs.shape[-1]} of {t.shape[-1]}) are not "
                         "supported by the Triton RoPE kernel")
    return TritonRoPE.apply(t, freqs)
