"""Shared pieces of the checkpoint-tool tests: tiny HF directories, tensor comparison, and a
manual pipeline forward (any TP x PP x VPP) for the multi-process tests."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from tulu3.checkpoint.hf_config import expected_hf_shapes, hf_config_for
from tulu3.checkpoint.hf_io import ShardedSafetensorsWriter, TensorSpec
from tulu3.model.presets import PRESETS, LlamaShape

VOCAB = 500  # not a multiple of 128 x TP: vocabulary padding is exercised
SHAPE = dataclasses.replace(PRESETS["tiny"], vocab=VOCAB)  # GQA 4:2, rope scaling, untied
TIED = dataclasses.replace(SHAPE, tied_embeddings=True)
TOKENIZER_FILES = {"tokenizer.json": '{"fake": true}', "tokenizer_config.json": "{}"}


def save_tiny_hf(path: Path, shape: LlamaShape, seed: int, max_shard: str = "150KB") -> Path:
    """A random transformers LlamaForCausalLM saved as sharded safetensors + fake tokenizer."""
    from tulu3.testing import tiny_hf_llama

    model = tiny_hf_llama(shape, seed)
    model.save_pretrained(path, max_shard_size=max_shard)
    for name, text in TOKENIZER_FILES.items():
        (path / name).write_text(text)
    return path


def random_hf_dir(path: Path, shape: LlamaShape, dtype: torch.dtype = torch.bfloat16,
                  seed: int = 0, max_shard_bytes: int = 2**20) -> Path:
    """A random HF directory written with safetensors directly (no transformers: fast)."""
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shapes = expected_hf_shapes(shape)
    specs = [TensorSpec(n, s, dtype) for n, s in shapes.items()]
    writer = ShardedSafetensorsWriter(path, specs, max_shard_bytes)
    for spec in specs:
        writer.write(spec.name, torch.randn(spec.shape, generator=gen).to(dtype))
    writer.close()
    config = hf_config_for(shape, "bfloat16" if dtype == torch.bfloat16 else "float32")
    (path / "config.json").write_text(json.dumps(config))
    return path


def hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory (via the safetensors library, independent of hf_io)."""
    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def assert_bit_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want), sorted(set(got) ^ set(want))
    for name, expected in want.items():
        assert got[name].dtype == expected.dtype, name
        assert got[name].shape == expected.shape, name
        assert torch.equal(got[name].view(torch.uint8), expected.view(torch.uint8)), name


def reference_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    """transformers' fp32 logits [b, s, vocab] for ``tokens`` [b, s]."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def pipeline_logits(chunks: list, tokens: torch.Tensor, vocab: int) -> torch.Tensor | None:
    """Forward ``tokens`` [b, s] through this rank's chunks of a TP x PP x VPP model, passing
    activations [s, b, h] between stages by hand; returns full logits [b, s, vocab] on the
    ranks of the last stage, None elsewhere. Virtual stage order: (v, p) for v, then p."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    pp, pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    hidden_shape = (tokens.shape[1], tokens.shape[0], chunks[0].config.hidden_size)
    out = None
    for v, chunk in enumerate(chunks):
        for p in range(pp):
            if p != pp_rank:
                continue
            if not (v == 0 and p == 0):
                hidden = torch.empty(hidden_shape)
                dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
                chunk.set_input_tensor(hidden)
            with torch.no_grad():
                out = chunk(tokens, positions, None)
            if not (v == len(chunks) - 1 and p == pp - 1):
                dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
                out = None
    if out is None:
        return None
    pieces = [torch.empty_like(out) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(pieces, out.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(pieces, dim=-1)[..., :vocab]


def expected_params(chunk: torch.nn.Module, hf: dict[str, torch.Tensor], shape: LlamaShape,
                    tp_rank: int, tp: int) -> dict[str, torch.Tensor]:
    """What each parameter of ``chunk`` must hold: its TP piece of the HF weights."""
    from tulu3.model import hf_mapping

    names = hf_mapping.chunk_global_names(chunk)
    out = {}
    for local, param in chunk.named_parameters():
        rule, layer = hf_mapping.match_megatron(names[local])
        sources = [hf[n] for n in hf_mapping.hf_names(rule, layer, shape.tied_embeddings)]
        full = hf_mapping.to_global(rule, sources, shape, chunk.vocab_size)
        out[local] = hf_mapping.shard(rule, full, tp_rank, tp).to(param.dtype)
    return out


def mismatched_params(chunks: list, hf: dict[str, torch.Tensor], shape: LlamaShape,
                      tp_rank: int, tp: int) -> list[str]:
    """Names of parameters that differ (bitwise) from their expected piece."""
    bad = []
    for index, chunk in enumerate(chunks):
        want = expected_params(chunk, hf, shape, tp_rank, tp)
        for local, param in chunk.named_parameters():
            if not torch.equal(param.detach(), want[local]):
                bad.append(f"chunk{index}.{local}")
    return bad


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize
