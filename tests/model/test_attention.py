"""The torch spec's attention (tulu3/model/attention.py) against plain per-document SDPA.

Oracle: each document attended on its own (SDPA ``is_causal``, K/V heads repeated for GQA), in
fp64, so a packed row must give the same outputs and gradients up to fp64 rounding. The context-
parallel mask is checked here on one process (the queries of one CP rank against all keys); the
all-gather itself is checked by the CP layouts of tests/parallel/test_parity.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from tulu3.data.packing import packed_seq_params
from tulu3.model.attention import (
    SDPAttention,
    block_mask,
    dense_mask,
    document_ids,
    document_mask_mod,
    flex_attention,
)
from tulu3.parallel.context import cp_positions, gathered_positions, slice_batch_for_cp_rank

HEADS, GROUPS, DIM = 4, 2, 8
TOL = 1e-12  # fp64: reordering a softmax over <= 24 keys moves the result by ~1e-16 relative
SEQ_IDS = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, -1],
                        [3, 3, 3, 3, 3, 4, 4, 4, 4, 4, -1, -1]])


def _attention() -> SDPAttention:
    config = TransformerConfig(num_layers=1, hidden_size=HEADS * DIM, num_attention_heads=HEADS,
                               num_query_groups=GROUPS, attention_dropout=0.0)
    return SDPAttention(config, 1, AttnMaskType.causal)


def _qkv(seq: int, rows: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    shapes = ((seq, rows, HEADS, DIM), (seq, rows, GROUPS, DIM), (seq, rows, GROUPS, DIM))
    return tuple(torch.randn(*s, generator=gen, dtype=torch.float64).requires_grad_()
                 for s in shapes)


def _oracle(q, k, v, seq_ids: torch.Tensor) -> torch.Tensor:
    """Every segment (document, or a row's padding) on its own: [s, b, heads * d]."""
    out = torch.zeros(q.shape[0], q.shape[1], HEADS * DIM, dtype=q.dtype)
    repeat = HEADS // GROUPS
    for row in range(q.shape[1]):
        for doc in seq_ids[row].unique():
            at = (seq_ids[row] == doc).nonzero().flatten()
            qd = q[at, row].permute(1, 0, 2)
            kd = k[at, row].permute(1, 0, 2).repeat_interleave(repeat, 0)
            vd = v[at, row].permute(1, 0, 2).repeat_interleave(repeat, 0)
            o = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True)
            out[at, row] = o.permute(1, 0, 2).reshape(len(at), -1)
    return out


def test_document_ids_follow_cu_seqlens() -> None:
    docs = document_ids(packed_seq_params(SEQ_IDS, "sbhd"), 2, 12)
    assert docs.tolist() == [[0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 3],
                             [4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 6, 6]]
    with pytest.raises(ValueError, match="cover"):
        document_ids(packed_seq_params(SEQ_IDS, "sbhd"), 2, 13)


def test_packed_rows_equal_documents_alone_with_gradients() -> None:
    q, k, v = _qkv(12, 2)
    got = _attention()(q, k, v, None, packed_seq_params=packed_seq_params(SEQ_IDS, "sbhd"))
    want = _oracle(q, k, v, SEQ_IDS)
    assert (got - want).abs().max() < TOL
    weights = torch.randn_like(got)
    grads = torch.autograd.grad((got * weights).sum(), (q, k, v))
    want_grads = torch.autograd.grad((want * weights).sum(), (q, k, v))
    for a, b in zip(grads, want_grads, strict=True):
        assert (a - b).abs().max() < TOL


def test_unpacked_rows_are_plain_causal() -> None:
    q, k, v = _qkv(10, 2, seed=1)
    got = _attention()(q, k, v, None)
    assert (got - _oracle(q, k, v, torch.zeros(2, 10, dtype=torch.long))).abs().max() < TOL


def test_the_leak_is_caught() -> None:
    """The oracle comparison fails when documents may see each other (plain causal)."""
    q, k, v = _qkv(12, 2)
    leaky = _attention()(q, k, v, None)
    assert (leaky - _oracle(q, k, v, SEQ_IDS)).abs().max() > 1e-3


@pytest.mark.parametrize("cp", [2, 3])
def test_context_parallel_queries_see_their_global_past(cp: int) -> None:
    """One CP rank's queries (chunks r and 2cp-1-r) against all keys in gathered order, under
    the mask of global positions, equal those rows of the whole-row attention."""
    seq = 12
    q, k, v = _qkv(seq, 2, seed=2)
    full = _oracle(q, k, v, SEQ_IDS)
    docs = document_ids(packed_seq_params(SEQ_IDS, "sbhd"), 2, seq)
    kv_pos = gathered_positions(seq, cp)
    kg, vg = (t[kv_pos].permute(1, 2, 0, 3) for t in (k, v))
    for rank in range(cp):
        q_pos = cp_positions(seq, cp, rank)
        allowed = dense_mask(document_mask_mod(docs, q_pos, kv_pos), 2, len(q_pos), seq, None)
        out = F.scaled_dot_product_attention(q[q_pos].permute(1, 2, 0, 3), kg, vg,
                                             attn_mask=allowed, enable_gqa=True)
        out = out.permute(2, 0, 1, 3).reshape(len(q_pos), 2, -1)
        assert (out - full[q_pos]).abs().max() < TOL


def test_flex_attention_block_mask_equals_the_dense_mask() -> None:
    """The BlockMask path (CUDA's) run forward-only on CPU (FlexAttention has no CPU backward
    in torch 2.13), in fp32 against the fp64 oracle: 1e-5 covers fp32 rounding of 8-dim dots."""
    q, k, v = (t.detach().float() for t in _qkv(12, 2, seed=3))
    docs = document_ids(packed_seq_params(SEQ_IDS, "sbhd"), 2, 12)
    pos = torch.arange(12)
    mask = block_mask(document_mask_mod(docs, pos, pos), 2, 12, 12, q.device)
    out = flex_attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), mask, None)
    out = out.permute(2, 0, 1, 3).reshape(12, 2, -1)
    assert (out.double() - _oracle(q.double(), k.double(), v.double(), SEQ_IDS)).abs().max() < 1e-5


def test_cp_slicer_cuts_every_per_token_key_and_refuses_unknown_ones() -> None:
    batch = {"tokens": torch.arange(16).view(2, 8), "labels": torch.arange(16).view(2, 8) + 100,
             "example_ids": torch.tensor([5, 6])}
    part = slice_batch_for_cp_rank(batch, 2, 1)
    assert part["tokens"].tolist() == [[2, 3, 4, 5], [10, 11, 12, 13]]
    assert part["labels"].tolist() == [[102, 103, 104, 105], [110, 111, 112, 113]]
    assert part["example_ids"].tolist() == [5, 6]
    assert cp_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    with pytest.raises(ValueError, match="per-token"):
        slice_batch_for_cp_rank({**batch, "mystery": torch.zeros(2, 8)}, 2, 0)
    with pytest.raises(ValueError, match="divide"):
        cp_positions(10, 2, 0)


def test_cu_seqlens_mask_equals_the_seq_ids_document_mask() -> None:
    """The two descriptions of a packed micro-batch agree: the mask function from cu_seqlens
    (torch / te specs) and tulu3.data.packing.document_attention_mask (the local spec's)."""
    from tulu3.data.packing import document_attention_mask

    pos = torch.arange(12)
    docs = document_ids(packed_seq_params(SEQ_IDS, "sbhd"), 2, 12)
    allowed = dense_mask(document_mask_mod(docs, pos, pos), 2, 12, 12, None)
    assert torch.equal(allowed, ~document_attention_mask(SEQ_IDS))
