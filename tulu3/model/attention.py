"""Core attention for the ``torch`` spec: PyTorch SDPA (flash / memory-efficient kernels on GPU).

A drop-in for megatron's ``DotProductAttention`` (same constructor and forward signature) that
also takes an explicit boolean mask, so packed sequences with per-document isolation work without
Transformer Engine.

Generation (tulu3/rollout/) gives every SDPAttention a per-layer ``kv_cache`` for the length of a
``with kv_cache(...)`` block: the new (already RoPE'd) keys/values are appended to it and the
queries attend over every cached key, under the engine's mask [b, 1, s_new, s_cached].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


class SDPAttention(MegatronModule):
    """softmax(Q K^T / sqrt(d) + mask) V over this TP rank's heads, with PyTorch SDPA.

    Inputs are megatron's layout: query [s, b, heads_local, d], key/value [s, b, groups_local, d];
    ``attention_mask`` is None (plain causal) or a bool tensor [b or 1, 1, s, s] where True means
    "masked out" (megatron's convention). Output: [s, b, heads_local * d].
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str = "self", attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type: str | None = None,
                 pg_collection: object = None) -> None:
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise ValueError("parallel.cp > 1 needs Transformer Engine attention (model.spec=te)")
        tp = config.tensor_model_parallel_size
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups or config.num_attention_heads, tp)
        self.attn_mask_type = attn_mask_type
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale
        self.kv_cache = None
        """A tulu3.rollout.kv_cache.LayerKVCache while generating, else None."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: AttnMaskType | None = None,
                attention_bias: torch.Tensor | None = None,
                packed_seq_params: object = None) -> torch.Tensor:
        if packed_seq_params is not None:
            raise ValueError("the torch spec takes packed sequences as an attention mask, not THD")
        seq, batch = query.shape[0], query.shape[1]
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if self.kv_cache is not None:
            k, v = self.kv_cache.append(k, v)
            allowed = ~attention_mask.to(torch.bool)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                                 scale=self.softmax_scale,
                                                 enable_gqa=self.groups != self.heads)
            return out.permute(2, 0, 1, 3).reshape(seq, batch, self.heads * q.shape[-1])
        if self.groups != self.heads:
            repeat = self.heads // self.groups
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        mask_type = attn_mask_type or self.attn_mask_type
        if attention_mask is None:
            is_causal = mask_type == AttnMaskType.causal and q.shape[2] > 1
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=is_causal, scale=self.softmax_scale,
                dropout_p=self.dropout if self.training else 0.0)
        else:
            # The caller's mask already combines causal + per-document isolation.
            allowed = ~attention_mask.to(torch.bool)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, scale=self.softmax_scale,
                dropout_p=self.dropout if self.training else 0.0)
        return out.permute(2, 0, 1, 3).reshape(seq, batch, self.heads * q.shape[-1])
