"""hf_mapping's row placements (what the streaming converter reads) against an independent
implementation of the HF -> megatron global layout, and tied-embedding names."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from ckpt_testlib import SHAPE

from tulu3.checkpoint.format import tp_regions
from tulu3.model import hf_mapping
from tulu3.model.presets import padded_vocab


def _reference_global(kind: str, hf: list[torch.Tensor], shape, padded: int) -> torch.Tensor:
    """Megatron's layout written out directly (the original to_global of hf_mapping)."""
    if kind == "qkv":
        q, k, v = hf
        d, g = shape.head_dim, shape.kv_heads
        q = q.reshape(g, shape.heads // g * d, -1)
        grouped = torch.cat([q, k.reshape(g, d, -1), v.reshape(g, d, -1)], dim=1)
        return grouped.reshape(-1, q.shape[-1])
    if kind == "fc1":
        return torch.cat(hf)
    if kind == "vocab":
        return torch.cat([hf[0], hf[0].new_zeros(padded - hf[0].shape[0], hf[0].shape[1])])
    return hf[0]


@pytest.mark.parametrize("shape", [SHAPE, dataclasses.replace(SHAPE, heads=8, kv_heads=8),
                                   dataclasses.replace(SHAPE, heads=8, kv_heads=1)])
def test_to_global_matches_reference_layout(shape):
    from tulu3.checkpoint.hf_config import expected_hf_shapes

    hf_shapes = expected_hf_shapes(shape)
    padded = padded_vocab(shape.vocab, 2)
    gen = torch.Generator().manual_seed(0)
    for rule in hf_mapping.TABLE:
        names = hf_mapping.hf_names(rule, 0)
        hf = [torch.randn(hf_shapes[n], generator=gen) for n in names]
        got = hf_mapping.to_global(rule, hf, shape, padded)
        assert torch.equal(got, _reference_global(rule.kind, hf, shape, padded)), rule.megatron
        assert tuple(got.shape) == hf_mapping.global_shape(rule, [t.shape for t in hf], padded)
        back = hf_mapping.from_global(rule, got, shape, shape.vocab)
        assert all(torch.equal(a, b) for a, b in zip(back, hf, strict=True)), rule.megatron


@pytest.mark.parametrize("tp", [1, 2])
def test_tp_regions_are_the_shards(tp):
    """Each stored chunk region (cut along the TP shards) is what hf_mapping.shard gives."""
    for rule in hf_mapping.TABLE:
        full = torch.randn(8, 6) if rule.kind != "replicated" else torch.randn(6)
        regions = tp_regions(rule, tuple(full.shape), tp)
        pieces = [full[tuple(slice(o, o + s) for o, s in zip(off, size, strict=True))]
                  for off, size in regions]
        if rule.kind == "fc1":  # gate piece r and up piece r form TP rank r's shard
            pieces = [torch.cat([pieces[r], pieces[tp + r]]) for r in range(tp)]
        want = [hf_mapping.shard(rule, full, r, tp) for r in range(tp)]
        if rule.kind == "replicated":
            want = want[:1]
        assert len(pieces) == len(want), rule.megatron
        assert all(torch.equal(a, b) for a, b in zip(pieces, want, strict=True)), rule.megatron


def test_tied_output_layer_reads_the_embedding():
    rule, _ = hf_mapping.match_megatron("output_layer.weight")
    assert hf_mapping.hf_names(rule, None) == ["lm_head.weight"]
    assert hf_mapping.hf_names(rule, None, tied=True) == ["model.embed_tokens.weight"]
