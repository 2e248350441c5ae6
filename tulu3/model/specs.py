"""Layer specs: ``te`` (Transformer Engine), ``torch`` (SDPA attention), ``local`` (reference)."""

from __future__ import annotations

import copy

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec

from tulu3.model.attention import SDPAttention


def has_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def layer_spec(name: str) -> ModuleSpec:
    """The transformer layer spec for ``model.spec``; ``te`` fails clearly without TE."""
    if name == "local":
        return get_gpt_layer_local_spec(normalization="RMSNorm")
    if name == "torch":
        spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
        return spec
    if name == "te":
        if not has_transformer_engine():
            raise RuntimeError("model.spec=te needs Transformer Engine (pip install "
                               "'tulu3[gpu]'); use model.spec=torch without it")
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec()
    raise ValueError(f"model.spec: unknown {name!r} (te | torch | local)")


def takes_document_mask(name: str) -> bool:
    """Whether the spec honours a per-document attention mask (packed sequences)."""
    return name == "torch"
