"""Which fused kernels a run uses, decided here and nowhere else (``model.fused``).

``auto``: every fusion whose kernel exists where the run is: megatron's own fusions with
Transformer Engine / apex on a GPU, and for the ``torch`` spec the Triton kernels in kernels/
(RMSNorm, SwiGLU, RoPE) compiled for CUDA. ``all``: the same, a missing torch-spec kernel is an
error instead of a fallback, and Triton's CPU interpreter counts (``TRITON_INTERPRET=1``: the
tests; far too slow to be chosen by ``auto``). ``none``: everything unfused (the numerical
reference; what CPU runs get under ``auto``).

Each kernel's oracle is its plain PyTorch version (kernels/layer_reference.py), and the fused
torch-spec model is tested against the unfused one.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.transformer.mlp import MLP
from torch import Tensor

from tulu3.config import ConfigError, ModelConfig


@dataclass(frozen=True)
class Fusions:
    """``kernels``: the torch spec's Triton RMSNorm / SwiGLU / RoPE; ``megatron``: the
    TransformerConfig fusion flags."""

    kernels: bool
    megatron: dict[str, bool]


def _importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def triton_runs_here(interpreted_ok: bool) -> bool:
    """Triton kernels can run: compiled on a GPU, or (if ``interpreted_ok``) interpreted."""
    interpreted = interpreted_ok and os.environ.get("TRITON_INTERPRET", "0") == "1"
    return _importable("triton") and (torch.cuda.is_available() or interpreted)


def decide(cfg: ModelConfig) -> Fusions:
    """The fusions of this run (raises ConfigError for ``model.fused=all`` without kernels)."""
    if cfg.fused == "none":
        return Fusions(False, _megatron_flags(False, False, False))
    kernels = cfg.spec == "torch" and triton_runs_here(interpreted_ok=cfg.fused == "all")
    if cfg.fused == "all" and cfg.spec == "torch" and not kernels:
        raise ConfigError("model.fused=all: the torch spec's fused kernels need Triton and a GPU "
                          "(or TRITON_INTERPRET=1); use model.fused=auto or none")
    te = cfg.spec == "te" and _importable("transformer_engine")
    gpu = torch.cuda.is_available()
    # megatron's ColumnParallelLinear fuses the weight-gradient accumulation with apex's
    # extension; TE's linears do it themselves. The torch spec's FP8 linears do not.
    grad_accum = gpu and (te or (cfg.spec != "te" and cfg.fp8 == "none"
                                 and _importable("fused_weight_gradient_mlp_cuda")))
    return Fusions(kernels, _megatron_flags(gpu and te, grad_accum, kernels))


def _megatron_flags(te_gpu: bool, grad_accum: bool, triton_rope: bool) -> dict[str, bool]:
    return dict(
        # megatron's torch.compile'd SwiGLU and bias-dropout-add: with the te spec on a GPU
        # (the torch spec's SwiGLU is the Triton kernel, inside its MLP).
        bias_activation_fusion=te_gpu,
        bias_dropout_fusion=te_gpu,
        # Only megatron's local DotProductAttention uses it (its CUDA kernels come with TE).
        masked_softmax_fusion=te_gpu,
        persist_layer_norm=False,  # apex's persistent LayerNorm; Llama's norm is RMSNorm
        # TuluGPTModel hands RoPE per-token angles [s, b, 1, d] (position_ids); TE's fused RoPE
        # takes [s, 1, 1, d], so only the Triton kernel (tested with both) is used.
        apply_rope_fusion=triton_rope,
        gradient_accumulation_fusion=grad_accum,
    )


def transformer_config_args(cfg: ModelConfig) -> dict[str, Any]:
    """The TransformerConfig fusion flags; installs the Triton RoPE where megatron has none."""
    fusions = decide(cfg)
    if fusions.kernels:
        _install_triton_rope()
    return fusions.megatron


def _install_triton_rope() -> None:
    """Point megatron's ``fused_apply_rotary_pos_emb`` hook (TE's kernel, or None without TE)
    at the Triton RoPE. megatron calls it for sbhd activations when ``apply_rope_fusion`` is on,
    which only the torch spec's fused runs set (TE's kernel does not take per-token angles)."""
    from megatron.core.models.common.embeddings import rope_utils

    from kernels.rope_triton import triton_rope

    rope_utils.fused_apply_rotary_pos_emb = triton_rope


class FusedSwiGLUMLP(MLP):
    """megatron's MLP (no biases, gated silu) with the Triton SwiGLU between fc1 and fc2."""

    def forward(self, hidden_states: Tensor, per_token_scale: Tensor | None = None,
                **_: Any) -> tuple[Tensor, Tensor | None]:
        from kernels.swiglu_triton import triton_swiglu

        if per_token_scale is not None:
            raise ValueError("FusedSwiGLUMLP is for dense Llama layers (no per-token scale)")
        intermediate, bias = self.linear_fc1(hidden_states)  # [s, b, 2 * ffn / tp]
        if bias is not None:
            intermediate = intermediate + bias
        return self.linear_fc2(triton_swiglu(intermediate))
