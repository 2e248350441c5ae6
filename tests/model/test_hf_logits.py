"""The tiny megatron Llama equals transformers' LlamaForCausalLM (the independent oracle)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tulu3.config import load_config
from tulu3.model import hf_mapping
from tulu3.model.build import build_model_chunks
from tulu3.model.presets import param_count, resolve_shape
from tulu3.parallel.groups import ProcessGroups
from tulu3.parallel.layout import make_layout
from tulu3.testing import run_distributed_test, tiny_hf_llama


def _logits(overrides: list[str], hf_overrides: dict, packed: bool, seq: int = 40) -> dict:
    from tulu3.parallel.init import init_model_parallel

    cfg = load_config(None, ["model.vocab=500", *overrides])
    layout = make_layout(cfg, 1)
    init_model_parallel(layout, seed=1)
    shape = resolve_shape(cfg.model)
    hf = tiny_hf_llama(dataclasses.replace(shape, **hf_overrides), seed=3)
    (model,) = build_model_chunks(cfg.model, layout, ProcessGroups.current())
    hf_mapping.load_hf_into_chunk(model, hf.state_dict().__getitem__, shape, 0, 1)
    model.eval()
    torch.manual_seed(0)
    tokens = torch.randint(0, shape.vocab, (2, seq))
    positions = torch.arange(seq).expand(2, seq)
    with torch.no_grad():
        ours = model(tokens, positions, None)[..., : shape.vocab]
        ref = hf(tokens).logits
        out = {"diff": float((ours - ref).abs().max()), "scale": float(ref.abs().max()),
               "params": sum(p.numel() for p in hf.parameters())}
        if packed:
            # Two documents in one row: positions restart, attention is isolated per document.
            doc_a, doc_b = tokens[0, :15], tokens[1, :25]
            row = torch.cat([doc_a, doc_b]).unsqueeze(0)
            pos = torch.cat([torch.arange(15), torch.arange(25)]).unsqueeze(0)
            seq_ids = torch.cat([torch.zeros(15), torch.ones(25)]).long()
            allowed = (seq_ids[:, None] == seq_ids[None, :]) & torch.ones(40, 40).bool().tril()
            mask = (~allowed)[None, None]
            packed_logits = model(row, pos, mask)[0, :, : shape.vocab]
            alone = torch.cat([hf(doc_a[None]).logits[0], hf(doc_b[None]).logits[0]])
            out["packed_diff"] = float((packed_logits - alone).abs().max())
    return out


@pytest.mark.parametrize("spec", ["torch", "local"])
def test_logits_equal_transformers(spec: str) -> None:
    result = run_distributed_test(_logits, 1, [f"model.spec={spec}"], {}, True)[0]
    assert result["diff"] < 1e-5, result
    assert result["packed_diff"] < 1e-5, result


def test_tied_embeddings_equal_transformers() -> None:
    result = run_distributed_test(_logits, 1, ["model.tied_embeddings=true"], {}, False)[0]
    assert result["diff"] < 1e-5, result


def test_rope_scaling_is_exercised() -> None:
    """Negative control: the same weights without Llama 3.1 rope scaling give other logits,
    so the equality above really checks the scaling."""
    scaled = run_distributed_test(_logits, 1, [], {}, False, 512)[0]
    assert scaled["diff"] < 1e-5, scaled
    result = run_distributed_test(_logits, 1, [], {"rope_scaling": False}, False, 512)[0]
    assert result["diff"] > 10 * 1e-5, result  # 80x the tolerance: measured 8e-4


def test_param_count_matches_transformers() -> None:
    cfg = load_config(None, ["model.vocab=500"])
    result = run_distributed_test(_logits, 1, [], {}, False)[0]
    assert param_count(resolve_shape(cfg.model)) == result["params"]


def test_presets_have_published_sizes() -> None:
    sizes = {name: param_count(resolve_shape(load_config(None, [f"model.preset={name}"]).model))
             for name in ("llama3.1-8b", "llama3.1-70b", "llama3.1-405b")}
    assert round(sizes["llama3.1-8b"] / 1e9, 2) == 8.03
    assert round(sizes["llama3.1-70b"] / 1e9, 1) == 70.6
    assert round(sizes["llama3.1-405b"] / 1e9, 0) == 406
