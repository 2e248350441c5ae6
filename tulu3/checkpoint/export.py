"""In-process HF export at the end of training: gather every tensor to rank 0 and stream it out.

Every rank walks the same list of tensors (HF order). For each, the ranks holding it (the TP
group of its pipeline stage, data/context-parallel rank 0) all-gather their TP pieces into the
megatron global tensor (``hf_mapping.unshard``); that group's TP rank 0 sends it to global rank 0,
which splits it into HF tensors (``hf_mapping.from_global``) and writes them into planned
safetensors shards. Rank 0 holds one global tensor at a time, never the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tulu3.checkpoint.format import disk_plan
from tulu3.checkpoint.hf_config import (
    copy_tokenizer,
    expected_hf_shapes,
    generation_config_for,
    hf_config_for,
)
from tulu3.checkpoint.hf_io import ShardedSafetensorsWriter, TensorSpec, output_files
from tulu3.model import hf_mapping
from tulu3.model.presets import LlamaShape
from tulu3.parallel.groups import ProcessGroups
from tulu3.parallel.layout import ParallelLayout

HF_DTYPES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}


def _local_tensors(chunks: list[torch.nn.Module], shape: LlamaShape, groups: ProcessGroups
                   ) -> dict[str, tuple[hf_mapping.Rule, torch.Tensor]]:
    """This rank's TP pieces keyed by their first HF name (spec-independent identity)."""
    if not groups.first_replica:
        return {}
    out = {}
    for chunk in chunks:
        names = hf_mapping.chunk_global_names(chunk)
        for local, param in chunk.named_parameters():
            rule, layer = hf_mapping.match_megatron(names[local])
            if shape.tied_embeddings and rule.megatron == "output_layer.weight":
                continue  # the last stage's copy of the embedding
            out[hf_mapping.hf_names(rule, layer)[0]] = (rule, param.detach())
    return out


def _owners(local: dict, groups: ProcessGroups) -> dict[str, int]:
    """First HF name -> global rank that sends it to rank 0 (its TP group's rank 0)."""
    mine = list(local) if groups.tp_rank == 0 else []
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return {name: rank for rank, names in enumerate(gathered) for name in names or []}


def _gather_tp(rule: hf_mapping.Rule, piece: torch.Tensor, groups: ProcessGroups,
               tp: int) -> torch.Tensor:
    if tp == 1:
        return piece
    pieces = [torch.empty_like(piece) for _ in range(tp)]
    dist.all_gather(pieces, piece.contiguous(), group=groups.tp)
    return hf_mapping.unshard(rule, pieces)


def export_hf_from_chunks(chunks: list[torch.nn.Module], shape: LlamaShape,
                          layout: ParallelLayout, out_dir: str | Path, *,
                          groups: ProcessGroups,
                          dtype: torch.dtype | None = None,
                          hf_config: dict[str, Any] | None = None,
                          hf_generation_config: dict[str, Any] | None = None,
                          tokenizer: str | Path | None = None,
                          max_shard_bytes: int = 5 * 2**30, head: str = "lm") -> None:
    """Write an HF LlamaForCausalLM directory from the live model (every rank calls this).

    ``dtype`` defaults to the parameters'; ``hf_config`` / ``hf_generation_config`` (e.g. from
    the tulu3.json of the checkpoint training started from) keep the source's rope scaling and
    token ids; ``tokenizer`` (an HF directory or a ``.model`` file) is copied when given.
    ``groups``: this rank's process groups (TP gather; DP/CP rank 0 holds the exported copy).
    ``head="scalar"``: the chunks are reward/value models (``ScalarHeadModel``) and the
    directory a LlamaForSequenceClassification (``tulu3.stages.rm.export`` sets its pad token).
    """
    rank = dist.get_rank()
    local = _local_tensors(chunks, shape, groups)
    owners = _owners(local, groups)
    param_dtype = next(chunks[0].parameters()).dtype
    dtype = dtype or param_dtype
    padded = chunks[0].vocab_size
    hf_shapes = expected_hf_shapes(shape, head)
    plan = disk_plan(shape, head)
    writer = None
    if rank == 0:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for stale in output_files(out):  # a previous export's shards would mix with ours
            stale.unlink()
        specs = [TensorSpec(n, hf_shapes[n], dtype) for rule, layer in plan
                 for n in hf_mapping.hf_names(rule, layer, shape.tied_embeddings)]
        writer = ShardedSafetensorsWriter(out, specs, max_shard_bytes)
    for rule, layer in plan:
        names = hf_mapping.hf_names(rule, layer, shape.tied_embeddings)
        owner = owners[names[0]]
        full = None
        if names[0] in local:
            local_rule, piece = local[names[0]]
            full = _gather_tp(local_rule, piece, groups, layout.tp)
            if rank == owner and rank != 0:
                dist.send(full.contiguous(), dst=0)
        if rank == 0:
            if owner != 0:
                size = hf_mapping.global_shape(rule, [hf_shapes[n] for n in names], padded)
                full = torch.empty(size, dtype=param_dtype)
                dist.recv(full, src=owner)
            parts = hf_mapping.from_global(rule, full, shape, shape.vocab)
            for name, part in zip(names, parts, strict=True):
                writer.write(name, part.to(dtype))
    if rank == 0:
        writer.close()
        _write_configs(Path(out_dir), shape, dtype, hf_config, hf_generation_config, tokenizer,
                       head)
    dist.barrier()


def _write_configs(out: Path, shape: LlamaShape, dtype: torch.dtype, hf_config: dict | None,
                   generation: dict | None, tokenizer: str | Path | None,
                   head: str = "lm") -> None:
    config = hf_config_for(shape, HF_DTYPES[dtype], hf_config, head)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = generation_config_for(config, generation)
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if tokenizer is not None:
        copy_tokenizer(tokenizer, out)
