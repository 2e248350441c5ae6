"""HF Llama safetensors -> tulu3 checkpoint (megatron torch_dist), streaming, one process.

    python -m checkpoints_tools.hf_to_megatron --hf-dir HF --out CKPT --tp 8 --pp 4 [--vpp 2]
        [--account-for-embedding-in-pipeline-split] [--account-for-loss-in-pipeline-split]
        [--dtype bf16|fp32] [--force]

Each stored chunk (one TP shard of one layer's tensor) is filled by reading exactly its rows
from the HF shards (``hf_mapping.placements``), written, and freed; row-parallel linears (split
by columns) are read once per tensor. Peak memory is about one such tensor, not the model: see
docs/PERFORMANCE.md. Every input is validated (files, tensor names and shapes, layout) before
anything is written.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tqdm import tqdm

from tulu3.checkpoint.dcp_io import FILE_BYTES, DistWriter
from tulu3.checkpoint.errors import ConversionError
from tulu3.checkpoint.format import (
    DTYPE_NAMES,
    MODEL_DIR,
    check_layout,
    check_output,
    converter_layout,
    disk_plan,
    disk_shape,
    make_meta,
    model_files,
    sharded_key,
    split_flags,
    staged_output,
    tp_regions,
    write_meta,
)
from tulu3.checkpoint.hf_config import (
    expected_hf_shapes,
    read_hf_config,
    read_optional_json,
    rope_warning,
    shape_from_hf_config,
)
from tulu3.checkpoint.hf_io import HFReader
from tulu3.model.hf_mapping import Placement, Rule, global_shape, hf_names, placements
from tulu3.model.presets import LlamaShape, padded_vocab

# Column-split tensors are read in blocks of this many bytes, each copied into every TP piece.
BLOCK_BYTES = 64 * 2**20


def check_hf_tensors(reader: HFReader, shape: LlamaShape) -> list[str]:
    """Raise when a tensor is missing or has the wrong shape; returns names left unused."""
    expected = expected_hf_shapes(shape)
    for name, want in expected.items():
        got = reader.entry(name).shape  # raises, naming the tensor, when missing
        if got != want:
            raise ConversionError(f"{reader.dir}: tensor {name!r} has shape {list(got)}, the "
                                  f"config.json implies {list(want)}")
    return [n for n in reader.names() if n not in expected]


def read_region(reader: HFReader, names: list[str], plan: list[Placement], rows: range,
                rest: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Rows ``rows`` (all columns) of the megatron global tensor, read straight from the HF
    files; rows no placement covers (vocabulary padding) are zero."""
    out = torch.zeros((len(rows), *rest), dtype=dtype)
    for p in plan:
        lo, hi = max(rows.start, p.dst), min(rows.stop, p.dst + p.rows)
        if lo < hi:
            reader.read_rows(names[p.source], p.src + lo - p.dst,
                             out[lo - rows.start:hi - rows.start])
    return out


def column_pieces(reader: HFReader, name: str, regions: list, dtype: torch.dtype
                  ) -> list[torch.Tensor]:
    """TP pieces of a column-split tensor: the file is read once, in row blocks."""
    rows, cols = reader.entry(name).shape
    pieces = [torch.empty(sizes, dtype=dtype) for _, sizes in regions]
    block = max(1, BLOCK_BYTES // (cols * dtype.itemsize))
    for start in range(0, rows, block):
        part = reader.read_rows(name, start, torch.empty((min(block, rows - start), cols),
                                                         dtype=dtype))
        for piece, (offsets, sizes) in zip(pieces, regions, strict=True):
            piece[start:start + part.shape[0]] = part[:, offsets[1]:offsets[1] + sizes[1]]
    return pieces


def convert_tensor(reader: HFReader, writer: DistWriter, rule: Rule, layer: int | None,
                   shape: LlamaShape, tp: int, dtype: torch.dtype, progress: tqdm) -> None:
    """Write every TP chunk of one megatron global tensor (one rule of one layer)."""
    names = hf_names(rule, layer, shape.tied_embeddings)
    hf_shapes = [reader.entry(n).shape for n in names]
    full = global_shape(rule, hf_shapes, padded_vocab(shape.vocab, tp))
    plan = placements(rule, shape, [s[0] for s in hf_shapes])
    stored, prefix = disk_shape(full, layer, shape.layers)
    key = sharded_key(rule)
    regions = tp_regions(rule, full, tp)
    # Column-split pieces come all at once (one pass over the file); others one by one.
    pieces = column_pieces(reader, names[0], regions, dtype) if rule.kind == "row" and tp > 1 \
        else []
    for offsets, sizes in regions:
        if pieces:
            piece = pieces.pop(0)
        else:
            rows = range(offsets[0], offsets[0] + sizes[0])
            piece = read_region(reader, names, plan, rows, tuple(full[1:]), dtype)
        writer.add_chunk(key, stored, (*prefix, *offsets), piece.view(*(1,) * len(prefix), *sizes))
        progress.update(piece.numel() * piece.element_size())
        del piece  # before the next piece is read


def convert(hf_dir: str | Path, out: str | Path, tp: int, pp: int, vpp: int = 1,
            dtype: str | None = None, force: bool = False, quiet: bool = False,
            account_for_embedding_in_pipeline_split: bool = False,
            account_for_loss_in_pipeline_split: bool = False) -> Path:
    """Convert an HF Llama directory into a tulu3 checkpoint at ``out``; returns ``out``.

    The layout (TP/PP/VPP and megatron's uneven-split flags) is checked as the trainer checks
    it and recorded in tulu3.json; the stored tensors depend on ``tp`` only (vocab padding and
    chunking): they load at any layout."""
    hf_dir, out = Path(hf_dir), Path(out)
    config = read_hf_config(hf_dir)
    shape = shape_from_hf_config(config)
    layout = converter_layout(tp, pp, vpp, account_for_embedding_in_pipeline_split,
                              account_for_loss_in_pipeline_split)
    check_layout(shape, layout)
    reader = HFReader(hf_dir)
    unused = check_hf_tensors(reader, shape)
    if dtype is None:
        src = reader.entry("model.embed_tokens.weight").dtype
        dtype = "bf16" if src == torch.bfloat16 else "fp32"
    if dtype not in DTYPE_NAMES:
        raise ConversionError(f"--dtype {dtype}: expected one of {list(DTYPE_NAMES)}")
    check_output(out, force)
    note = rope_warning(config)
    for message in ([note] if note else []) + ([f"ignored tensors: {unused}"] if unused else []):
        print(f"warning: {message}", file=sys.stderr)
    torch_dtype = DTYPE_NAMES[dtype]
    plan = disk_plan(shape)
    total = sum(_stored_bytes(reader, rule, layer, shape, tp, torch_dtype) for rule, layer in plan)
    with staged_output(out, force, model_files) as stage:
        writer = DistWriter(stage / MODEL_DIR, FILE_BYTES)
        with tqdm(total=total, unit="B", unit_scale=True, desc="hf -> megatron",
                  disable=quiet) as progress:
            for rule, layer in plan:
                convert_tensor(reader, writer, rule, layer, shape, tp, torch_dtype, progress)
        writer.finish()
        reader.close()
        meta = make_meta(shape, tp, pp, vpp, dtype, created_by="checkpoints_tools.hf_to_megatron",
                         hf_config=config,
                         hf_generation_config=read_optional_json(hf_dir / "generation_config.json"),
                         **split_flags(layout))
        meta.tokenizer = str(hf_dir.resolve()) if _has_tokenizer(hf_dir) else None
        meta.notes = [n for n in [note] if n]
        write_meta(stage, meta)
    return out


def _stored_bytes(reader: HFReader, rule: Rule, layer: int | None, shape: LlamaShape, tp: int,
                  dtype: torch.dtype) -> int:
    names = hf_names(rule, layer, shape.tied_embeddings)
    full = global_shape(rule, [reader.entry(n).shape for n in names],
                        padded_vocab(shape.vocab, tp))
    return int(torch.Size(full).numel()) * dtype.itemsize


def _has_tokenizer(hf_dir: Path) -> bool:
    return any((hf_dir / n).is_file() for n in ("tokenizer.json", "tokenizer.model",
                                                 "tokenizer_config.json"))
