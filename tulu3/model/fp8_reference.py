"""The oracle for :mod:`tulu3.model.fp8`: FP8 as quantize -> dequantize -> fp64 matmul.

Nothing here calls ``torch._scaled_mm``. The FP8 linear is tested against these functions, and
:func:`matmul_error_bound` says how far an FP8 matmul may be from the exact product of its
unquantized inputs, from the formats' mantissa bits and the reduction length alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class FP8Format:
    """One FP8 encoding: its torch dtype, largest finite value, and rounding constants.

    ``unit_roundoff`` = 2^-(mantissa bits + 1): the relative error of round-to-nearest on normal
    numbers. ``subnormal_half_step`` = half the spacing of subnormals: the absolute error of a
    value that rounds into the subnormal range (in the scaled units).
    """

    dtype: torch.dtype
    max: float
    mantissa_bits: int
    min_exponent: int  # exponent of the smallest normal number

    @property
    def unit_roundoff(self) -> float:
        return 2.0 ** -(self.mantissa_bits + 1)

    @property
    def subnormal_half_step(self) -> float:
        return 2.0 ** (self.min_exponent - self.mantissa_bits - 1)


E4M3 = FP8Format(torch.float8_e4m3fn, 448.0, 3, -6)
E5M2 = FP8Format(torch.float8_e5m2, 57344.0, 2, -14)


def amax_scale(x: Tensor, fmt: FP8Format, dim: int | None) -> Tensor:
    """Current (dynamic) scaling: ``fmt.max / amax``, per tensor (dim None) or per slice.

    ``dim`` is the reduction (contraction) dimension: the scale is shared along it, one per
    row (dim=-1 of a ``[m, k]`` operand) or per column (dim=0 of a ``[k, n]`` operand).
    An all-zero slice gets scale 1. fp32, shape ``[]`` or ``x``'s shape with ``dim`` size 1.
    """
    a = x.detach().abs().float()
    amax = a.amax() if dim is None else a.amax(dim=dim, keepdim=True)
    return torch.where(amax > 0, fmt.max / amax.clamp_min(1e-30), torch.ones_like(amax))


def quantize(x: Tensor, fmt: FP8Format, dim: int | None) -> tuple[Tensor, Tensor]:
    """``(x * scale)`` rounded to ``fmt`` (saturating), and the fp32 scale."""
    scale = amax_scale(x, fmt, dim)
    q = (x.float() * scale).clamp(-fmt.max, fmt.max).to(fmt.dtype)
    return q, scale


def fake_quantize(x: Tensor, fmt: FP8Format, dim: int | None) -> Tensor:
    """x rounded through ``fmt`` and back, in fp64: the value an FP8 matmul actually multiplies."""
    q, scale = quantize(x, fmt, dim)
    return q.double() / scale.double()


def reference_matmul(a: Tensor, b: Tensor, fmt_a: FP8Format, fmt_b: FP8Format,
                     rowwise: bool) -> Tensor:
    """``a [m, k] @ b [k, n]`` with both operands fake-quantized, in fp64.

    Per-tensor scales, or (``rowwise``) one scale per row of ``a`` and per column of ``b``.
    """
    qa = fake_quantize(a, fmt_a, -1 if rowwise else None)
    qb = fake_quantize(b, fmt_b, 0 if rowwise else None)
    return qa @ qb


def reference_linear(x: Tensor, weight: Tensor, grad_out: Tensor, rowwise: bool = False,
                     grad_fmt: FP8Format = E5M2) -> tuple[Tensor, Tensor, Tensor]:
    """Forward and both backward matmuls of ``y = x @ weight.T`` as the FP8 linear does them.

    x ``[m, k]``, weight ``[n, k]``, grad_out ``[m, n]``. Returns fp64
    ``(y [m, n], grad_x [m, k], grad_w [n, k])``: e4m3 activations and weights, ``grad_fmt``
    (e5m2 in the hybrid format) for the output gradient.
    """
    y = reference_matmul(x, weight.t(), E4M3, E4M3, rowwise)
    grad_x = reference_matmul(grad_out, weight, grad_fmt, E4M3, rowwise)
    grad_w = reference_matmul(grad_out.t(), x, grad_fmt, E4M3, rowwise)
    return y, grad_x, grad_w


def matmul_error_bound(a: Tensor, b: Tensor, fmt_a: FP8Format, fmt_b: FP8Format,
                       rowwise: bool, out_dtype: torch.dtype) -> Tensor:
    """Worst-case |fp8_matmul(a, b) - a @ b| per element, ``[m, n]`` fp64.

    With ``|q(x) - x| <= u |x| + eta / scale`` for each quantized element (u: unit roundoff,
    eta: half a subnormal step), the product error is at most
    ``(u_a + u_b + u_a u_b) |a||b| + the eta terms``; on top come the fp32 accumulation over k
    (``k * 2^-24`` relative, a first-order bound) and the rounding of the result to
    ``out_dtype``.
    """
    a64, b64 = a.double().abs(), b.double().abs()
    eta_a = fmt_a.subnormal_half_step / amax_scale(a, fmt_a, -1 if rowwise else None).double()
    eta_b = fmt_b.subnormal_half_step / amax_scale(b, fmt_b, 0 if rowwise else None).double()
    ea = fmt_a.unit_roundoff * a64 + eta_a  # [m, k] per-element quantization error bounds
    eb = fmt_b.unit_roundoff * b64 + eta_b  # [k, n]
    quant = ea @ b64 + a64 @ eb + ea @ eb
    k = a.shape[-1]
    magnitude = (a64 + ea) @ (b64 + eb)
    accumulate = 1.01 * k * 2.0 ** -24 * magnitude
    out_round = torch.finfo(out_dtype).eps / 2 * magnitude
    return quant + accumulate + out_round
