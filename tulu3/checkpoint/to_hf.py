"""tulu3 checkpoint -> HF Llama (sharded safetensors + config), streaming, one process.

    python -m checkpoints_tools.megatron_to_hf --ckpt CKPT --out HF [--dtype bf16|fp32]
        [--tokenizer-dir DIR] [--max-shard-size 5GB] [--force]

Reads ``CKPT/model`` one global tensor at a time (the stored TP chunks of one layer's tensor),
splits it into HF tensors with ``hf_mapping.from_global`` (vocabulary padding dropped) and writes
them at their planned place in ``model-0000i-of-0000N.safetensors``. Works on checkpoints written
by ``hf_to_megatron``, ``reshard`` and the trainer (megatron's own save), at any layout.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from tqdm import tqdm

from tulu3.checkpoint.dcp_io import DistReader
from tulu3.checkpoint.errors import ConversionError
from tulu3.checkpoint.format import (
    DTYPE_NAMES,
    MODEL_DIR,
    CheckpointMeta,
    check_checkpoint,
    disk_plan,
    read_global,
    read_meta,
    staged_output,
)
from tulu3.checkpoint.hf_config import (
    TOKENIZER_FILES,
    copy_tokenizer,
    expected_hf_shapes,
    generation_config_for,
    hf_config_for,
)
from tulu3.checkpoint.hf_io import ShardedSafetensorsWriter, TensorSpec, output_files
from tulu3.model.hf_mapping import from_global, hf_names

HF_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}


def hf_specs(meta: CheckpointMeta, dtype: torch.dtype) -> list[TensorSpec]:
    """The HF tensors in the order the conversion produces them."""
    shapes = expected_hf_shapes(meta.shape, meta.head)
    return [TensorSpec(name, shapes[name], dtype)
            for rule, layer in disk_plan(meta.shape, meta.head)
            for name in hf_names(rule, layer, meta.shape.tied_embeddings)]


def write_hf_files(out: Path, meta: CheckpointMeta, dtype: torch.dtype,
                   tokenizer_dir: str | Path | None) -> list[str]:
    """config.json, generation_config.json and tokenizer files; returns notes for the user."""
    config = hf_config_for(meta.shape, HF_DTYPE_NAMES[dtype], meta.hf_config, meta.head)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = generation_config_for(config, meta.hf_generation_config)
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    source = tokenizer_dir or meta.tokenizer
    if source is None:
        return ["no tokenizer files (pass --tokenizer-dir)"]
    if tokenizer_dir is None and not Path(source).exists():
        return [f"tokenizer source {source} recorded in tulu3.json is gone; pass --tokenizer-dir"]
    return [f"tokenizer: {', '.join(copy_tokenizer(source, out))}"]


def export(ckpt: str | Path, out: str | Path, dtype: str | None = None,
           tokenizer_dir: str | Path | None = None, force: bool = False,
           max_shard_bytes: int = 5 * 2**30, quiet: bool = False) -> list[str]:
    """Write an HF model directory from a tulu3 checkpoint; returns notes for the user."""
    ckpt, out = Path(ckpt), Path(out)
    meta = read_meta(ckpt)
    reader = DistReader(ckpt / MODEL_DIR)
    check_checkpoint(reader, meta)
    dtype = dtype or meta.dtype
    if dtype not in DTYPE_NAMES:
        raise ConversionError(f"--dtype {dtype}: expected one of {list(DTYPE_NAMES)}")
    torch_dtype = DTYPE_NAMES[dtype]
    specs = hf_specs(meta, torch_dtype)
    with staged_output(out, force, _hf_export_files) as stage:
        with tqdm(total=sum(s.nbytes for s in specs), unit="B", unit_scale=True,
                  desc="megatron -> hf", disable=quiet) as progress:
            writer = ShardedSafetensorsWriter(stage, specs, max_shard_bytes, progress.update)
            for rule, layer in disk_plan(meta.shape, meta.head):
                tensor = read_global(reader, rule, layer, meta.vocab)
                parts = from_global(rule, tensor, meta.shape, meta.vocab)
                del tensor
                for name, part in zip(hf_names(rule, layer, meta.shape.tied_embeddings), parts,
                                      strict=True):
                    writer.write(name, part.to(torch_dtype))
                del parts
            writer.close()
        return write_hf_files(stage, meta, torch_dtype, tokenizer_dir)


def _hf_export_files(out: Path) -> list[Path]:
    """What an earlier export wrote in ``out`` (replaced by ``--force``; nothing else is)."""
    return [*output_files(out), *(out / n for n in ("config.json", "generation_config.json",
                                                     "original", *TOKENIZER_FILES))]


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '1024' -> bytes (decimal units, as HF's max_shard_size)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB)")
    number, unit = float(match.group(1)), match.group(2).upper().rstrip("B")
    powers = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
              "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
    return int(number * powers[unit])
