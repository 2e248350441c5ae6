"""Triton kernels for the two tile operations of the fused log-prob (``softmax_stats.TileOps``).

Design: the matmuls stay in cuBLAS (``logprobs_chunked.py`` drives them, one large GEMM per
tile), and Triton fuses everything between them, one program per row of the tile:

- forward (``_stats_kernel``): one pass over the row in ``BLOCK_V`` blocks with an online
  log-sum-exp, the target logit and ``sum p * z`` for the entropy: the bf16 tile is read once and
  nothing of its size is written (PyTorch's version makes several fp32 copies);
- backward (``_grad_kernel``): ``g * (onehot - p) + e * p * (mean - z)`` written IN PLACE over the
  recomputed logits tile, which is then the left operand of the two gradient matmuls.

A fully fused GEMM + softmax in Triton would also skip writing the tile, but its backward needs
atomics into both gradients (or one recompute per hidden slice) and Triton GEMMs trail cuBLAS;
this split keeps the four GEMMs the fused path needs (forward, recompute, grad hidden, grad
weight) at cuBLAS speed. Runs on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.softmax_stats import ShardStats


@triton.jit
def _stats_kernel(z_ptr, stride_z, labels_ptr, lse_ptr, target_ptr, mean_ptr, n_cols,
                  WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    offs = tl.arange(0, BLOCK_V)
    run_max = float("-inf")
    sum_exp = 0.0
    sum_pz = 0.0  # sum exp(z - run_max) * z, rescaled with sum_exp
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        mask = cols < n_cols
        z = tl.load(z_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(run_max, tl.max(z, axis=0))
        scale = tl.exp(run_max - new_max)
        e = tl.exp(z - new_max)  # 0 in masked lanes
        sum_exp = sum_exp * scale + tl.sum(e, axis=0)
        if WITH_ENTROPY:
            sum_pz = sum_pz * scale + tl.sum(e * tl.where(mask, z, 0.0), axis=0)
        run_max = new_max
    tl.store(lse_ptr + row, run_max + tl.log(sum_exp))
    if WITH_ENTROPY:
        tl.store(mean_ptr + row, sum_pz / sum_exp)
    label = tl.load(labels_ptr + row)
    hit = (label >= 0) & (label < n_cols)
    target = tl.load(z_row + label, mask=hit, other=0.0).to(tl.float32)
    tl.store(target_ptr + row, target)


@triton.jit
def _grad_kernel(z_ptr, stride_z, labels_ptr, lse_ptr, mean_ptr, g_ptr, ge_ptr, n_cols,
                 WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    offs = tl.arange(0, BLOCK_V)
    lse = tl.load(lse_ptr + row)
    g = tl.load(g_ptr + row)
    label = tl.load(labels_ptr + row)
    if WITH_ENTROPY:
        mean = tl.load(mean_ptr + row)
        ge = tl.load(ge_ptr + row)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        mask = cols < n_cols
        z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(z - lse)
        grad = -g * p
        if WITH_ENTROPY:
            grad += ge * p * (mean - z)
        grad = tl.where(cols == label, grad + g, grad)
        tl.store(z_row + cols, grad.to(z_ptr.dtype.element_ty), mask=mask)


def interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check(logits: Tensor) -> None:
    if not (logits.is_cuda or interpreted()):
        raise RuntimeError("Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before "
                           "kernels.logprobs_triton is imported (CPU interpreter)")
    if logits.stride(-1) != 1:
        raise ValueError("the logits tile must be contiguous along the vocabulary")


class TritonTileOps:
    """``softmax_stats.TileOps`` with Triton kernels; ``block_v`` columns per step of a row."""

    def __init__(self, block_v: int = 4096, num_warps: int = 8):
        if block_v & (block_v - 1):
            raise ValueError(f"block_v must be a power of two, got {block_v}")
        self.block_v = block_v
        self.num_warps = num_warps

    def _block(self, cols: int) -> int:
        return min(self.block_v, triton.next_power_of_2(cols))

    def stats(self, logits: Tensor, labels: Tensor, with_entropy: bool) -> ShardStats:
        """logits ``[rows, cols]`` (fp32/bf16/fp16), labels tile-local int64 -> fp32 stats."""
        _check(logits)
        rows, cols = logits.shape
        out = torch.empty(3 if with_entropy else 2, rows, dtype=torch.float32,
                          device=logits.device)
        mean = out[2] if with_entropy else out[0]  # unused pointer when no entropy
        if rows:
            _stats_kernel[(rows,)](logits, logits.stride(0), labels.contiguous(), out[0],
                                   out[1], mean, cols, WITH_ENTROPY=with_entropy,
                                   BLOCK_V=self._block(cols), num_warps=self.num_warps)
        return ShardStats(out[0], out[1], out[2] if with_entropy else None)

    def grad(self, logits: Tensor, labels: Tensor, lse: Tensor, mean_logit: Tensor | None,
             grad_logprob: Tensor, grad_entropy: Tensor | None) -> Tensor:
        """Overwrites ``logits`` [rows, cols] with its gradient (same dtype) and returns it.

        Only for a tile the caller owns (the chunked driver's recomputed tile).
        """
        _check(logits)
        rows, cols = logits.shape
        with_entropy = grad_entropy is not None
        if rows:
            _grad_kernel[(rows,)](
                logits, logits.stride(0), labels.contiguous(), lse.contiguous(),
                mean_logit.contiguous() if with_entropy else lse,
                grad_logprob.contiguous(), grad_entropy.contiguous() if with_entropy else lse,
                cols, WITH_ENTROPY=with_entropy, BLOCK_V=self._block(cols),
                num_warps=self.num_warps)
        return logits


def compile_for_gpu(arch: int = 90, dtype: str = "bf16") -> dict[str, list[str]]:
    """Compile both kernels ahead of time for ``sm_<arch>`` (no GPU needed) -> stages produced.

    The CPU interpreter accepts code the GPU compiler rejects; this runs Triton's real compiler
    down to a cubin so such errors show up without a GPU. Needs TRITON_INTERPRET unset.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    common = {"z_ptr": f"*{dtype}", "stride_z": "i64", "labels_ptr": "*i64", "lse_ptr": "*fp32",
              "mean_ptr": "*fp32", "n_cols": "i32", "WITH_ENTROPY": "constexpr",
              "BLOCK_V": "constexpr"}
    signatures = {_stats_kernel: {**common, "target_ptr": "*fp32"},
                  _grad_kernel: {**common, "g_ptr": "*fp32", "ge_ptr": "*fp32"}}
    stages = {}
    for kernel, signature in signatures.items():
        names = list(kernel.arg_names)  # the kernel's own argument order
        signature = {name: signature[name] for name in names}
        for with_entropy in (False, True):
            source = ASTSource(kernel, signature=signature,
                               constexprs={"WITH_ENTROPY": with_entropy, "BLOCK_V": 4096})
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": 8})
            stages[f"{kernel.__name__}[entropy={with_entropy}]"] = list(compiled.asm)
    return stages
