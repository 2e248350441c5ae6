"""Core attention for the ``torch`` spec: PyTorch SDPA / FlexAttention, with context parallelism.

A drop-in for megatron's ``DotProductAttention`` (same constructor and forward signature). Which
tokens a query sees is described once, by megatron's ``PackedSeqParams`` (cu_seqlens over the
micro-batch flattened to [b * s], as tulu3.data.packing builds them) plus the context-parallel
split (tulu3.parallel.context):

- no ``packed_seq_params`` (one document per row, no CP): SDPA ``is_causal=True`` (flash on GPU),
  GQA by the kernel (``enable_gqa``), no copy of K / V;
- ``packed_seq_params`` (packed rows, or any row under CP): document-causal attention by the
  GLOBAL row positions of queries and keys; under CP, K and V are all-gathered over the CP group
  first (their gradients reduce-scattered back). On CUDA: FlexAttention with a BlockMask (blocks
  across documents are skipped); on CPU, where FlexAttention has no backward (torch 2.13:
  "FlexAttention does not support backward on CPU"), SDPA with the same mask function evaluated
  densely, once per micro-batch.

Generation (tulu3/rollout/) gives every SDPAttention a per-layer ``kv_cache`` for the length of a
``with kv_cache(...)`` block: the new (already RoPE'd) keys/values are appended to it and the
queries attend over every cached key, under the engine's mask [b, 1, s_new, s_cached].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from tulu3.parallel.context import cp_positions, gather_kv, gathered_positions

_compiled_flex: Callable | None = None


def document_ids(params: PackedSeqParams, rows: int, seq: int) -> torch.Tensor:
    """Segment index [rows, seq] of every row position, from ``params.cu_seqlens_q`` over the
    micro-batch flattened to [rows * seq] (segments never cross rows; padding is a segment)."""
    bounds = params.cu_seqlens_q.to(torch.long)
    if int(bounds[-1]) != rows * seq:
        raise ValueError(f"packed_seq_params cover {int(bounds[-1])} tokens, the micro-batch "
                         f"has {rows} x {seq}")
    flat = torch.arange(rows * seq, device=bounds.device)
    return (torch.searchsorted(bounds, flat, right=True) - 1).view(rows, seq)


def document_mask_mod(docs: torch.Tensor, q_pos: torch.Tensor, kv_pos: torch.Tensor
                      ) -> Callable:
    """FlexAttention ``mask_mod``: query ``q`` (row position ``q_pos[q]``) may see key ``kv``
    (row position ``kv_pos[kv]``) iff same document and not later. Works on scalars (flex) and
    on broadcast index tensors (the dense mask)."""
    q_docs = docs[:, q_pos]
    kv_docs = docs[:, kv_pos]

    def mask_mod(b, h, q, kv):  # noqa: ANN001, ANN202 - FlexAttention's signature
        return (q_docs[b, q] == kv_docs[b, kv]) & (kv_pos[kv] <= q_pos[q])

    return mask_mod


def dense_mask(mask_mod: Callable, rows: int, q_len: int, kv_len: int, device: torch.device
               ) -> torch.Tensor:
    """``mask_mod`` evaluated on every (row, query, key): bool [rows, 1, q_len, kv_len],
    True = may attend."""
    b = torch.arange(rows, device=device)[:, None, None]
    q = torch.arange(q_len, device=device)[None, :, None]
    kv = torch.arange(kv_len, device=device)[None, None, :]
    return mask_mod(b, None, q, kv)[:, None]


def block_mask(mask_mod: Callable, rows: int, q_len: int, kv_len: int, device: torch.device
               ) -> object:
    """FlexAttention's BlockMask of ``mask_mod`` (blocks no query of which may see any key of
    are skipped by the kernel)."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_mod, rows, None, q_len, kv_len, device=device)


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: object,
                   scale: float | None) -> torch.Tensor:
    """FlexAttention (compiled once on CUDA) under the BlockMask ``mask``; GQA in-kernel.
    q [b, n, sq, d], k / v [b, g, skv, d] -> [b, n, sq, d]."""
    from torch.nn.attention.flex_attention import flex_attention as flex

    global _compiled_flex
    fn = flex
    if q.is_cuda:
        if _compiled_flex is None:
            # Not dynamic=False: packed micro-batches change width, and a static graph would
            # recompile per width until the limit, then fall back to eager (scores in memory).
            _compiled_flex = torch.compile(flex)
        fn = _compiled_flex
    return fn(q, k, v, block_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


class SDPAttention(MegatronModule):
    """softmax(Q K^T / sqrt(d) + mask) V over this TP rank's heads (and CP rank's queries).

    Inputs are megatron's layout: query [s, b, heads_local, d], key/value [s, b, groups_local, d]
    (s: this CP rank's tokens); ``attention_mask`` None, or an explicit bool [b or 1, 1, s, s]
    (True = masked out, megatron's convention) from callers that build their own;
    ``packed_seq_params`` (qkv_format ``sbhd``): the documents of the micro-batch before the CP
    split. Output: [s, b, heads_local * d].
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str = "self", attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type: str | None = None,
                 pg_collection: object = None) -> None:
        super().__init__(config=config)
        tp = config.tensor_model_parallel_size
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups or config.num_attention_heads, tp)
        self.attn_mask_type = attn_mask_type
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale
        self.cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        if config.context_parallel_size > 1 and self.cp_group is None:
            raise ValueError("parallel.cp > 1: the torch spec's attention needs the CP group")
        self.kv_cache = None
        """A tulu3.rollout.kv_cache.LayerKVCache while generating, else None."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: AttnMaskType | None = None,
                attention_bias: torch.Tensor | None = None,
                packed_seq_params: PackedSeqParams | None = None) -> torch.Tensor:
        seq, batch = query.shape[0], query.shape[1]
        gqa = self.groups != self.heads
        if packed_seq_params is not None:
            out = self._documents(query, key, value, packed_seq_params)
            return out.permute(2, 0, 1, 3).reshape(seq, batch, self.heads * out.shape[-1])
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout = self.dropout if self.training else 0.0
        if self.kv_cache is not None:
            k, v = self.kv_cache.append(k, v)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask.to(torch.bool),
                                                 scale=self.softmax_scale, enable_gqa=gqa)
        elif attention_mask is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask.to(torch.bool),
                                                 scale=self.softmax_scale, dropout_p=dropout,
                                                 enable_gqa=gqa)
        else:
            is_causal = (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
            out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal and q.shape[2] > 1,
                                                 scale=self.softmax_scale, dropout_p=dropout,
                                                 enable_gqa=gqa)
        return out.permute(2, 0, 1, 3).reshape(seq, batch, self.heads * q.shape[-1])

    def _documents(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   params: PackedSeqParams) -> torch.Tensor:
        """Document-causal attention by global row position; K / V gathered over CP.
        Returns [b, heads, s_local, d]."""
        if params.qkv_format == "thd":
            raise ValueError("the torch spec takes packed rows as [s, b] with cu_seqlens "
                             "(qkv_format 'sbhd'); THD is Transformer Engine's format")
        if self.dropout and self.training:
            raise ValueError("attention dropout is not supported on packed / context-parallel "
                             "rows (FlexAttention has none)")
        cp = self.cp_group.size() if self.cp_group is not None else 1
        rank = self.cp_group.rank() if cp > 1 else 0
        key, value = gather_kv(key, self.cp_group), gather_kv(value, self.cp_group)
        rows, full = query.shape[1], key.shape[0]
        device = query.device
        docs = document_ids(params, rows, full)
        q_pos = cp_positions(full, cp, rank, device) if cp > 1 else torch.arange(full,
                                                                                  device=device)
        kv_pos = gathered_positions(full, cp, device) if cp > 1 else q_pos
        mask_mod = document_mask_mod(docs, q_pos, kv_pos)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if q.is_cuda:
            mask = _cached(params, (cp, rank), lambda: block_mask(
                mask_mod, rows, q.shape[2], full, device))
            return flex_attention(q, k, v, mask, self.softmax_scale)
        allowed = _cached(params, (cp, rank), lambda: dense_mask(
            mask_mod, rows, q.shape[2], full, device))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                              scale=self.softmax_scale,
                                              enable_gqa=self.groups != self.heads)


def _cached(params: PackedSeqParams, key: tuple, build: Callable) -> object:
    """The mask of one micro-batch, built by the first layer and reused by the others (every
    layer gets the same ``params`` object in one forward)."""
    cache = params.__dict__.setdefault("_tulu3_masks", {})
    if key not in cache:
        cache[key] = build()
    return cache[key]
