"""Rewrite a tulu3 checkpoint for another TP/PP/VPP, streaming, one process.

    python -m checkpoints_tools.reshard --ckpt CKPT --out NEW --tp 4 --pp 2 [--vpp 2] [--force]
        [--account-for-embedding-in-pipeline-split] [--account-for-loss-in-pipeline-split]

A tulu3 ``model/`` already loads at any layout (megatron intersects each rank's shards with the
stored chunks), so resharding only re-pads the vocabulary rows to 128 x the new TP, cuts the stored
chunks along the new TP shards (a load at the new TP then reads only its own bytes) and records
the new layout. ``_extra_state`` objects and ``common.pt`` are copied verbatim. Model weights
only: optimizer and other training state beside ``model/`` is NOT carried (the tool says so);
to resume training with optimizer state at a new layout, resume from the original checkpoint.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from tqdm import tqdm

from tulu3.checkpoint.dcp_io import DistReader, DistWriter
from tulu3.checkpoint.errors import ConversionError
from tulu3.checkpoint.format import (
    META_FILE,
    MODEL_DIR,
    CheckpointMeta,
    check_checkpoint,
    check_layout,
    check_output,
    converter_layout,
    disk_plan,
    disk_shape,
    model_files,
    read_global,
    read_meta,
    sharded_key,
    split_flags,
    staged_output,
    tp_regions,
    write_meta,
)
from tulu3.model.presets import padded_vocab


def _repad(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """``tensor`` (already cut to at most ``rows`` rows) zero-padded to ``rows`` rows."""
    if tensor.shape[0] == rows:
        return tensor
    out = tensor.new_zeros((rows, *tensor.shape[1:]))
    out[:tensor.shape[0]] = tensor
    return out


def reshard(ckpt: str | Path, out: str | Path, tp: int, pp: int, vpp: int = 1,
            force: bool = False, quiet: bool = False,
            account_for_embedding_in_pipeline_split: bool = False,
            account_for_loss_in_pipeline_split: bool = False) -> list[str]:
    """Write ``out`` = ``ckpt``'s model for layout TP ``tp`` x PP ``pp`` x VPP ``vpp`` (and
    megatron's uneven pipeline-split flags, checked as the trainer does); returns notes for the
    user (what was not carried)."""
    ckpt, out = Path(ckpt), Path(out)
    meta = read_meta(ckpt)
    reader = DistReader(ckpt / MODEL_DIR)
    check_checkpoint(reader, meta)
    layout = converter_layout(tp, pp, vpp, account_for_embedding_in_pipeline_split,
                              account_for_loss_in_pipeline_split)
    check_layout(meta.shape, layout)
    if out.resolve() == ckpt.resolve():
        raise ConversionError("--out must differ from --ckpt")
    check_output(out, force)
    rows = padded_vocab(meta.vocab, tp)
    with staged_output(out, force, model_files) as stage:
        _write_model(reader, stage / MODEL_DIR, meta, rows, tp, quiet,
                     common=(ckpt / MODEL_DIR / "common.pt").read_bytes())
        notes = []
        left = sorted(p.name for p in ckpt.iterdir() if p.name not in (MODEL_DIR, META_FILE))
        if left:
            notes.append(f"NOT carried: {left} (optimizer / training state): {out} holds model "
                         "weights only; load it with model.load=, or resume training from "
                         f"{ckpt} itself, which megatron reshards on load")
        origin = f"resharded from {ckpt} (TP{meta.tp} PP{meta.pp} VPP{meta.vpp})"
        new = dataclasses.replace(meta, tp=tp, pp=pp, vpp=vpp, padded_vocab=rows,
                                  **split_flags(layout),
                                  created_by="checkpoints_tools.reshard",
                                  notes=[*meta.notes, origin, *notes])
        write_meta(stage, new)
    return notes


def _write_model(reader: DistReader, model_dir: Path, meta: CheckpointMeta, rows: int, tp: int,
                 quiet: bool, common: bytes) -> None:
    """Every tensor of ``reader`` re-padded to ``rows`` vocabulary rows and cut for TP ``tp``."""
    writer = DistWriter(model_dir)
    plan = disk_plan(meta.shape, meta.head)
    with tqdm(total=len(plan), unit="tensor", desc="reshard", disable=quiet) as progress:
        for rule, layer in plan:
            tensor = read_global(reader, rule, layer, rows)
            if rule.kind == "vocab":
                tensor = _repad(tensor, rows)
            stored, prefix = disk_shape(tuple(tensor.shape), layer, meta.shape.layers)
            for offsets, sizes in tp_regions(rule, tuple(tensor.shape), tp):
                region = tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))
                piece = tensor[region].reshape(*(1,) * len(prefix), *sizes)
                writer.add_chunk(sharded_key(rule), stored, (*prefix, *offsets), piece)
            progress.update()
    for key in reader.objects:
        writer.add_bytes(key, reader.read_bytes(key))
    writer.finish(common=common)
