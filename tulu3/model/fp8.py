"""FP8 tensor-parallel linears for the ``torch`` spec (no Transformer Engine): ``torch._scaled_mm``.

Current (dynamic) scaling, as TE's "tensorwise" recipe and torchao's float8 training do it: each
matmul operand is scaled by ``fp8_max / amax`` of its own values right before the cast, per
tensor, or per row (``rowwise``: one scale per row of the left operand and per column of the
right one, shared along the reduction). Activations and weights are e4m3; the output gradient
is e5m2 in the ``hybrid`` format, e4m3 in the ``e4m3`` one. All three matmuls of a linear
(forward, input gradient, weight gradient) run in FP8, accumulated in fp32 and returned in the
input's dtype. The oracle is :mod:`tulu3.model.fp8_reference`.

Why not torchao's ``convert_to_float8_training``: it swaps ``nn.Linear`` modules, and megatron's
Column/RowParallelLinear are not ``nn.Linear``; they call their own autograd function, which
this file replaces through the layers' ``_forward_impl`` hook, keeping megatron's TP
communication (sequence-parallel all-gather / reduce-scatter, input-gradient all-reduce).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    _gather_along_first_dim,
    _reduce_scatter_along_first_dim,
    copy_to_tensor_model_parallel_region,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from torch import Tensor

from tulu3.model.fp8_reference import E4M3, E5M2, FP8Format

# torch._scaled_mm (cuBLASLt) needs every dimension a multiple of 16.
_ALIGN = 16


@dataclass(frozen=True)
class FP8Options:
    """How the FP8 linears quantize: ``rowwise`` scales, and the output gradient's format."""

    rowwise: bool = False
    grad_format: FP8Format = E5M2

    @classmethod
    def from_keys(cls, fmt: str, granularity: str) -> FP8Options:
        """From ``model.fp8_format`` (hybrid | e4m3) and ``model.fp8_granularity``."""
        return cls(rowwise=granularity == "rowwise", grad_format=E5M2 if fmt == "hybrid" else E4M3)


def _pad(x: Tensor) -> Tensor:
    """Zero-pad both dims of a 2-D tensor to multiples of 16 (zeros change no sum or amax)."""
    rows, cols = (-x.shape[0]) % _ALIGN, (-x.shape[1]) % _ALIGN
    return torch.nn.functional.pad(x, (0, cols, 0, rows)) if rows or cols else x


def _to_fp8(x: Tensor, fmt: FP8Format, dim: int | None) -> tuple[Tensor, Tensor]:
    """(fp8 values, fp32 inverse scale) with scale = fmt.max / amax along ``dim`` (None: all)."""
    a = x.detach().abs().float()
    amax = a.amax() if dim is None else a.amax(dim=dim, keepdim=True)
    scale = torch.where(amax > 0, fmt.max / amax.clamp_min(1e-30), torch.ones_like(amax))
    q = (x.float() * scale).clamp(-fmt.max, fmt.max).to(fmt.dtype)
    return q, scale.reciprocal()


def fp8_matmul(a: Tensor, b: Tensor, fmt_a: FP8Format, fmt_b: FP8Format, rowwise: bool,
               out_dtype: torch.dtype) -> Tensor:
    """``a [m, k] @ b [k, n]`` in FP8 with current scaling; fp32 accumulation, ``out_dtype``."""
    m, n = a.shape[0], b.shape[1]
    qa, inv_a = _to_fp8(_pad(a), fmt_a, -1 if rowwise else None)
    qb, inv_b = _to_fp8(_pad(b), fmt_b, 0 if rowwise else None)
    # _scaled_mm wants a row-major and b column-major.
    out = torch._scaled_mm(qa.contiguous(), qb.t().contiguous().t(), scale_a=inv_a,
                           scale_b=inv_b, out_dtype=out_dtype)
    return out[:m, :n]


class FP8Linear(torch.autograd.Function):
    """``y = x @ weight.T`` with all three matmuls in FP8. x ``[..., k]``, weight ``[n, k]``.

    With ``sp_group`` (sequence parallelism), x is this rank's sequence shard ``[s / tp, ...]``:
    it is all-gathered for the forward and again for the weight gradient (only the shard is
    kept, as megatron's linear does), and the input gradient is reduce-scattered back.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, options: FP8Options, sp_group=None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.options, ctx.sp_group = options, sp_group
        total = x if sp_group is None else _gather_along_first_dim(x, sp_group)
        x2 = total.reshape(-1, x.shape[-1])
        y = fp8_matmul(x2, weight.t(), E4M3, E4M3, options.rowwise, x.dtype)
        return y.reshape(*total.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        x, weight = ctx.saved_tensors
        opt, group = ctx.options, ctx.sp_group
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = fp8_matmul(g2, weight, opt.grad_format, E4M3, opt.rowwise, x.dtype)
            grad_x = grad_x.reshape(*grad_out.shape[:-1], x.shape[-1])
            if group is not None:
                grad_x = _reduce_scatter_along_first_dim(grad_x, group)
        if ctx.needs_input_grad[1]:
            total = x if group is None else _gather_along_first_dim(x, group)
            x2 = total.reshape(-1, x.shape[-1])
            grad_w = fp8_matmul(g2.t(), x2, opt.grad_format, E4M3, opt.rowwise, weight.dtype)
        return grad_x, grad_w, None, None


def fp8_linear_impl(input: Tensor, weight: Tensor, bias: Tensor | None,
                    gradient_accumulation_fusion: bool, allreduce_dgrad: bool,
                    sequence_parallel: bool, grad_output_buffer: list | None = None,
                    wgrad_deferral_limit: int | None = None, tp_group=None, *,
                    options: FP8Options) -> Tensor:
    """Drop-in for megatron's ``linear_with_grad_accumulation_and_async_allreduce``.

    The same communication, synchronous (not overlapped with the matmuls): sequence parallel
    all-gathers the input shard in FP8Linear (its gradient is reduce-scattered), otherwise the
    input gradient is all-reduced over TP when ``allreduce_dgrad`` (megatron's mapping).
    """
    if gradient_accumulation_fusion or grad_output_buffer is not None:
        raise ValueError("FP8 linears (model.spec=torch) support neither gradient accumulation "
                         "fusion nor deferred embedding wgrad")
    if allreduce_dgrad and not sequence_parallel:
        input = copy_to_tensor_model_parallel_region(input, group=tp_group)
    out = FP8Linear.apply(input, weight, options, tp_group if sequence_parallel else None)
    return out + bias if bias is not None else out


class _FP8Matmuls:
    """Mixin for megatron's parallel linears: ``fp8`` (the options) at construction, and the
    ``_forward_impl`` hook (their matmul + TP communication) replaced by fp8_linear_impl."""

    def __init__(self, *args, fp8: FP8Options, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fp8 = fp8

    def _forward_impl(self, input: Tensor, weight: Tensor, *args, **kwargs) -> Tensor:
        return fp8_linear_impl(input, weight, *args, options=self.fp8, **kwargs)


class FP8ColumnParallelLinear(_FP8Matmuls, ColumnParallelLinear):
    """megatron's ColumnParallelLinear with its three matmuls in FP8."""


class FP8RowParallelLinear(_FP8Matmuls, RowParallelLinear):
    """megatron's RowParallelLinear with its three matmuls in FP8."""


def with_fp8_linears(layer: ModuleSpec, options: FP8Options) -> ModuleSpec:
    """A copy of a local/torch transformer-layer spec whose four TP linears run in FP8."""
    layer = copy.deepcopy(layer)
    attn, mlp = layer.submodules.self_attention.submodules, layer.submodules.mlp.submodules
    column = ModuleSpec(module=FP8ColumnParallelLinear, params={"fp8": options})
    row = ModuleSpec(module=FP8RowParallelLinear, params={"fp8": options})
    attn.linear_qkv, attn.linear_proj = column, row
    mlp.linear_fc1, mlp.linear_fc2 = column, row
    return layer
