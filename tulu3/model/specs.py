"""Layer specs: ``te`` (Transformer Engine), ``torch`` (SDPA attention), ``local`` (reference)."""

from __future__ import annotations

import copy

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from tulu3.config import ModelConfig
from tulu3.model.attention import SDPAttention
from tulu3.model.fp8_recipe import bf16_layer
from tulu3.model.fusions import FusedSwiGLUMLP
from tulu3.model.fusions import decide as decide_fusions
from tulu3.model.norm import FusedRMSNorm, RMSNorm

PACKED_FORMATS = {"torch": "sbhd", "te": "thd", "local": "mask"}
"""How each spec takes packed rows (tulu3.step): ``sbhd``: megatron's PackedSeqParams
(cu_seqlens) beside [s, b] activations (tulu3.model.attention); ``thd``: PackedSeqParams with the
micro-batch as one [1, b * s] row, as Megatron-LM feeds Transformer Engine; ``mask``: a dense
[b, 1, s, s] document mask (megatron's local DotProductAttention, the numerical reference)."""


def has_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def layer_spec(name: str, config: TransformerConfig, vp_stage: int | None = None,
               model: ModelConfig | None = None, pp_rank: int | None = None,
               ) -> ModuleSpec | TransformerBlockSubmodules:
    """The transformer spec for ``model.spec``; ``te`` fails clearly without TE.

    ``model`` (the torch spec's FP8 and fusion keys) and ``pp_rank`` (which layers this stage
    builds, for FP8's BF16 edge layers) matter only for ``torch``.
    """
    if name == "local":
        return get_gpt_layer_local_spec(normalization="RMSNorm")
    if name == "torch":
        # SDPA attention and an RMSNorm that supports sequence parallelism, final norm included.
        # Fused: the Triton RMSNorm and SwiGLU (RoPE: megatron's hook, see fusions.py).
        fused = model is not None and decide_fusions(model).kernels
        norm = FusedRMSNorm if fused else RMSNorm
        spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
        spec.submodules.input_layernorm = norm
        spec.submodules.pre_mlp_layernorm = norm
        if fused:
            spec.submodules.mlp.module = FusedSwiGLUMLP
        layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
        specs = [spec] * layers
        if model is not None and model.fp8 != "none":
            specs = _fp8_layers(spec, config, model, vp_stage, pp_rank, layers)
        return TransformerBlockSubmodules(layer_specs=specs, layer_norm=norm)
    if name == "te":
        if not has_transformer_engine():
            raise RuntimeError("model.spec=te needs Transformer Engine (pip install "
                               "'tulu3[gpu]'); use model.spec=torch without it")
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec()
    raise ValueError(f"model.spec: unknown {name!r} (te | torch | local)")


def _fp8_layers(spec: ModuleSpec, config: TransformerConfig, model: ModelConfig,
                vp_stage: int | None, pp_rank: int | None, layers: int) -> list[ModuleSpec]:
    """This stage's layer specs with FP8 linears, BF16 where fp8_bf16_edges keeps a layer."""
    from tulu3.model.fp8 import FP8Options, with_fp8_linears

    fp8 = with_fp8_linears(spec, FP8Options.from_keys(model.fp8_format, model.fp8_granularity))
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return [spec if bf16_layer(model, offset + i, config.num_layers) else fp8
            for i in range(layers)]

