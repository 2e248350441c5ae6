"""``model.load=``: put an HF directory's or a tulu3 checkpoint's weights into this rank's chunks.

The format is detected: a directory with ``tulu3.json`` is a tulu3 checkpoint (megatron
``dist_checkpointing.load`` at the current layout, any layout it was saved at); one with
``config.json`` + safetensors is an HF model (each rank reads, lazily, only the tensors of its
own chunks and keeps its TP piece through ``hf_mapping``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from tulu3.checkpoint.errors import ConversionError
from tulu3.checkpoint.format import is_tulu3_checkpoint, load_model, read_meta
from tulu3.checkpoint.hf_config import (
    read_hf_config,
    read_optional_json,
    shape_from_hf_config,
)
from tulu3.checkpoint.hf_io import INDEX_FILE, SINGLE_FILE, HFReader
from tulu3.model import hf_mapping
from tulu3.model.presets import LlamaShape
from tulu3.parallel.groups import ProcessGroups

# Fields that may differ between a checkpoint and the model: they change no weight.
FREE_FIELDS = ("max_seq_len",)


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """The checkpoint directory ``path`` names: itself, or, for a run's ``checkpoints/``
    directory (or the run directory holding it), the step its ``latest`` file names."""
    path = Path(path)
    if is_tulu3_checkpoint(path) or (path / "config.json").is_file():
        return path
    for root in (path, path / "checkpoints"):
        latest = root / "latest"
        if latest.is_file():
            return root / latest.read_text().strip()
    return path


def detect_format(path: str | Path) -> str:
    """'tulu3' or 'hf'; raises ConversionError naming what was looked for."""
    path = resolve_checkpoint_dir(path)
    if not path.is_dir():
        raise ConversionError(f"{path}: not a directory (a checkpoint directory expected)")
    if is_tulu3_checkpoint(path):
        return "tulu3"
    if (path / "config.json").is_file() and ((path / INDEX_FILE).is_file()
                                             or (path / SINGLE_FILE).is_file()):
        return "hf"
    raise ConversionError(f"{path}: neither a tulu3 checkpoint (tulu3.json) nor an HF "
                          f"model directory (config.json + {INDEX_FILE} or {SINGLE_FILE})")


def checkpoint_shape(path: str | Path) -> LlamaShape:
    """The model shape stored in a checkpoint of either format (to build a matching model)."""
    path = resolve_checkpoint_dir(path)
    if detect_format(path) == "tulu3":
        return read_meta(path).shape
    return shape_from_hf_config(read_hf_config(path))


def source_hf_configs(path: str | Path) -> tuple[dict | None, dict | None]:
    """(config.json, generation_config.json) of the HF model a checkpoint came from, if known.

    Pass them to ``format.make_meta`` when saving and to ``export_hf_from_chunks``, so the rope
    scaling and token ids of the source survive training and export.
    """
    path = resolve_checkpoint_dir(path)
    if detect_format(path) == "tulu3":
        meta = read_meta(path)
        return meta.hf_config, meta.hf_generation_config
    return read_hf_config(path), read_optional_json(Path(path) / "generation_config.json")


def check_shape(found: LlamaShape, expected: LlamaShape, where: str | Path) -> None:
    """Raise naming every field where the checkpoint and the model disagree."""
    diffs = [f"{f.name}: checkpoint {getattr(found, f.name)} vs model {getattr(expected, f.name)}"
             for f in dataclasses.fields(LlamaShape)
             if f.name not in FREE_FIELDS and getattr(found, f.name) != getattr(expected, f.name)]
    if diffs:
        raise ConversionError(f"model.load={where} does not match the model: " + "; ".join(diffs)
                              + " (set the model.* keys, or build the model from "
                              "tulu3.checkpoint.load.checkpoint_shape)")


def load_into_chunks(path: str | Path, chunks: list[torch.nn.Module], shape: LlamaShape,
                     groups: ProcessGroups) -> str:
    """Load weights into this rank's model chunks (collective for tulu3 checkpoints).

    ``shape`` is the model's; it must equal the checkpoint's (max_seq_len aside). ``groups``
    gives the chunks' TP rank and size (an HF source is cut here). Returns the detected format.
    """
    path = resolve_checkpoint_dir(path)
    kind = detect_format(path)
    check_shape(checkpoint_shape(path), shape, path)
    if kind == "tulu3":
        load_model(chunks, path)
        return kind
    reader = HFReader(path)
    try:
        for chunk in chunks:
            hf_mapping.load_hf_into_chunk(chunk, reader.read, shape, groups.tp_rank,
                                          groups.tp_size)
    finally:
        reader.close()
    return kind
