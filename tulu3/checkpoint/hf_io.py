"""Hugging Face safetensors I/O that never holds more than the tensor (rows) being moved.

- :class:`HFReader` parses only the JSON headers of an HF directory's shards, then reads any row
  range of any tensor with ``readinto`` straight into a caller's tensor. It does not mmap: a mapped
  file's touched pages count in the process RSS until unmapped, and a reader that copies out of a
  mapping holds each tensor twice.
- :class:`ShardedSafetensorsWriter` plans every shard up front from (name, shape, dtype), writes
  each shard's header when the shard is opened and each tensor's bytes at its planned offset, and
  closes a shard as soon as its last tensor is written: nothing is buffered.

The file format (https://github.com/huggingface/safetensors): an 8-byte little-endian header
length, a JSON header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__"}``,
then the raw little-endian tensor bytes; offsets are relative to the end of the header.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tulu3.checkpoint.errors import ConversionError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class Entry:
    """Where one tensor lives: file, dtype, shape and absolute byte range."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (first dim); of one element for 1-D tensors."""
        return math.prod(self.shape[1:]) * self.dtype.itemsize


def _bytes_view(tensor: torch.Tensor) -> memoryview:
    """A writable flat byte view of a contiguous CPU tensor."""
    if not tensor.is_contiguous():
        raise ValueError("tensor must be contiguous")
    return memoryview(tensor.view(-1).view(torch.uint8).numpy()).cast("B")


def read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of one safetensors file and where its data starts (reads the header only)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > 100 * 2**20:
            raise ConversionError(f"{path}: not a safetensors file (header of {length} bytes)")
        return json.loads(f.read(length)), 8 + length


class HFReader:
    """Lazy reader of an HF model directory: ``model.safetensors.index.json`` + shards, or one
    ``model.safetensors``. Construction checks that every shard exists and every indexed tensor
    is in its shard; no tensor data is read until asked."""

    def __init__(self, hf_dir: str | Path) -> None:
        self.dir = Path(hf_dir)
        self.entries: dict[str, Entry] = {}
        self._files: dict[Path, object] = {}
        index = self.dir / INDEX_FILE
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (self.dir / SINGLE_FILE).is_file():
            weight_map, files = {}, [SINGLE_FILE]
        else:
            raise ConversionError(f"{self.dir}: no {INDEX_FILE} or {SINGLE_FILE}")
        missing = [f for f in files if not (self.dir / f).is_file()]
        if missing:
            raise ConversionError(f"{self.dir}: missing safetensors shard(s) named in {INDEX_FILE}:"
                                  f" {missing}")
        for name in files:
            self._add_file(self.dir / name)
        for name, file in weight_map.items():
            if name not in self.entries or self.entries[name].path.name != file:
                raise ConversionError(f"{self.dir / file}: tensor {name!r} listed in {INDEX_FILE}"
                                      " is not in this shard")

    def _add_file(self, path: Path) -> None:
        header, base = read_header(path)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in DTYPES:
                raise ConversionError(f"{path}: tensor {name!r} has unsupported dtype "
                                      f"{info['dtype']}")
            begin, end = info["data_offsets"]
            self.entries[name] = Entry(path, DTYPES[info["dtype"]], tuple(info["shape"]),
                                       base + begin, base + end)

    def names(self) -> list[str]:
        return list(self.entries)

    def entry(self, name: str) -> Entry:
        if name not in self.entries:
            raise ConversionError(f"{self.dir}: tensor {name!r} is missing from the checkpoint")
        return self.entries[name]

    def read_rows(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        """Fill ``out`` (contiguous, ``out.shape[0]`` rows of tensor ``name`` from row ``start``)
        straight from the file; converts when ``out.dtype`` differs from the stored dtype."""
        entry = self.entry(name)
        count = out.shape[0] if out.dim() else 1
        if start + count > (entry.shape[0] if entry.shape else 1):
            raise ValueError(f"{name}: rows {start}..{start + count} out of {entry.shape}")
        target = out if out.dtype == entry.dtype else torch.empty(out.shape, dtype=entry.dtype)
        view = _bytes_view(target)
        self._read_exact(entry.path, entry.start + start * entry.row_bytes, view)
        if target is not out:
            out.copy_(target)
        return out

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole tensor ``name`` (in ``dtype`` when given)."""
        entry = self.entry(name)
        return self.read_rows(name, 0, torch.empty(entry.shape, dtype=dtype or entry.dtype))

    def _read_exact(self, path: Path, offset: int, view: memoryview) -> None:
        if path not in self._files:
            self._files[path] = open(path, "rb", buffering=0)  # noqa: SIM115 - closed in close()
        f = self._files[path]
        f.seek(offset)
        done = 0
        while done < len(view):  # one read() returns at most ~2 GiB on Linux
            got = f.readinto(view[done:])
            if not got:
                raise ConversionError(f"{path}: truncated (wanted {len(view)} bytes at {offset})")
            done += got

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


@dataclass(frozen=True)
class TensorSpec:
    """One tensor the writer will receive."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class _Shard:
    def __init__(self, path: Path, specs: list[TensorSpec]) -> None:
        self.path = path
        self.offsets: dict[str, int] = {}
        header: dict = {"__metadata__": {"format": "pt"}}
        begin = 0
        for spec in specs:
            header[spec.name] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                                 "data_offsets": [begin, begin + spec.nbytes]}
            self.offsets[spec.name] = begin
            begin += spec.nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self.header = struct.pack("<Q", len(text)) + text
        self.data_bytes = begin
        self.pending = set(self.offsets)
        self.file = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.file is None:
            self.file = open(self.path, "wb")  # noqa: SIM115 - closed when the shard is full
            self.file.write(self.header)
        self.file.seek(len(self.header) + self.offsets[name])
        self.file.write(_bytes_view(tensor.contiguous()))
        self.pending.discard(name)
        if not self.pending:
            self.file.close()


class ShardedSafetensorsWriter:
    """Writes ``model-0000i-of-0000N.safetensors`` shards of at most ``max_shard_bytes`` (one
    bigger tensor gets a shard of its own) and ``model.safetensors.index.json``, streaming."""

    def __init__(self, out_dir: str | Path, specs: list[TensorSpec],
                 max_shard_bytes: int = 5 * 2**30,
                 on_write: Callable[[int], None] | None = None) -> None:
        self.dir = Path(out_dir)
        self.specs = {s.name: s for s in specs}
        groups: list[list[TensorSpec]] = [[]]
        size = 0
        for spec in specs:
            if groups[-1] and size + spec.nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(spec)
            size += spec.nbytes
        count = len(groups)
        self.shards = [_Shard(self.dir / f"model-{i + 1:05d}-of-{count:05d}.safetensors", g)
                       for i, g in enumerate(groups)]
        self.where = {name: shard for shard in self.shards for name in shard.offsets}
        self.on_write = on_write

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one planned tensor (any order); its shape and dtype must match the plan."""
        spec = self.specs.get(name)
        if spec is None:
            raise KeyError(f"{name!r} is not in the planned tensors")
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, planned "
                             f"{spec.shape} {spec.dtype}")
        self.where[name].write(name, tensor)
        if self.on_write:
            self.on_write(spec.nbytes)

    def close(self) -> None:
        """Check every planned tensor was written, then write the index."""
        missing = sorted(n for shard in self.shards for n in shard.pending)
        if missing:
            raise RuntimeError(f"tensors never written: {missing[:5]} ({len(missing)} in all)")
        index = {"metadata": {"total_size": sum(s.nbytes for s in self.specs.values())},
                 "weight_map": {n: self.where[n].path.name for n in self.specs}}
        (self.dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def output_files(out_dir: Path) -> list[Path]:
    """Files a previous HF export left in ``out_dir`` (removed by ``--force``)."""
    names = [INDEX_FILE, SINGLE_FILE]
    found = [out_dir / n for n in names if (out_dir / n).exists()]
    return found + sorted(out_dir.glob("model-*-of-*.safetensors"))
