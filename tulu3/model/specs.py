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

from tulu3.model.attention import SDPAttention
from tulu3.model.norm import RMSNorm


def has_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def layer_spec(name: str, config: TransformerConfig, vp_stage: int | None = None
               ) -> ModuleSpec | TransformerBlockSubmodules:
    """The transformer spec for ``model.spec``; ``te`` fails clearly without TE."""
    if name == "local":
        return get_gpt_layer_local_spec(normalization="RMSNorm")
    if name == "torch":
        # SDPA attention and an RMSNorm that supports sequence parallelism, final norm included.
        spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
        spec.submodules.input_layernorm = RMSNorm
        spec.submodules.pre_mlp_layernorm = RMSNorm
        layers = get_num_layers_to_build(config, vp_stage=vp_stage)
        return TransformerBlockSubmodules(layer_specs=[spec] * layers, layer_norm=RMSNorm)
    if name == "te":
        if not has_transformer_engine():
            raise RuntimeError("model.spec=te needs Transformer Engine (pip install "
                               "'tulu3[gpu]'); use model.spec=torch without it")
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec()
    raise ValueError(f"model.spec: unknown {name!r} (te | torch | local)")
