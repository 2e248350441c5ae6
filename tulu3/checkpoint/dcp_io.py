"""Megatron's ``torch_dist`` checkpoint files, written and read one tensor chunk at a time.

``megatron.core.dist_checkpointing.save`` (torch_dist backend) produces a PyTorch DCP directory:
- ``.metadata``: a pickled ``torch.distributed.checkpoint.Metadata``; for every key (the
  ShardedTensor key, e.g. ``decoder.layers.mlp.linear_fc1.weight``) its global size, dtype and the
  chunks (offsets, sizes) stored, and for every chunk the file, byte offset and length;
- ``__R_T.distcp`` data files: each chunk is a ``torch.save`` of a tensor of the chunk's sizes;
  ShardedObjects (``..._extra_state/shard_...``) are ``torch.save``d lists, stored as bytes;
- ``common.pt`` (``torch.save`` of the non-sharded state, ``{}`` for a model) and
  ``metadata.json`` naming the backends.

Megatron loads such a directory at any TP/PP/VPP by intersecting the shards each rank asks for
with the stored chunks, so a writer that produces the same keys, global sizes and chunk records
makes a checkpoint megatron loads, without megatron or a process group at conversion time. The
tests check the keys and sizes against a real megatron save and load the result in megatron.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import time
import uuid
from pathlib import Path

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from tulu3.checkpoint.errors import ConversionError

BACKENDS = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
            "common_backend": "torch", "common_backend_version": 1}
DCP_VERSION = "1.0.0"
FILE_BYTES = 4 * 2**30
"""Payload bytes per ``__0_N.distcp`` file the converters write."""


class DistWriter:
    """Writes chunks into ``__0_N.distcp`` files as they come, keeping only their metadata;
    :meth:`finish` writes ``.metadata``. A new file starts once the current one holds
    ``file_bytes`` of payload (tensor bytes, not torch.save's framing), so which file a chunk
    lands in follows from the chunk sizes alone (:func:`tulu3.checkpoint.plan.write_plan`)."""

    def __init__(self, directory: str | Path, file_bytes: int = FILE_BYTES) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.file_bytes = file_bytes
        self.tensors: dict[str, TensorStorageMetadata] = {}
        self.objects: dict[str, BytesStorageMetadata] = {}
        self.storage: dict[MetadataIndex, _StorageInfo] = {}
        self._index = -1
        self._file = None
        self._payload = 0  # payload bytes in the current file

    def _stream(self, nbytes: int) -> tuple[str, io.BufferedWriter]:
        if self._file is None or self._payload >= self.file_bytes:
            if self._file is not None:
                self._file.close()
            self._index += 1
            self._payload = 0
            self._file = open(self.dir / f"__0_{self._index}.distcp", "wb")  # noqa: SIM115
        self._payload += nbytes
        return f"__0_{self._index}.distcp", self._file

    def _append(self, payload: torch.Tensor) -> _StorageInfo:
        name, f = self._stream(payload.numel() * payload.element_size())
        start = f.tell()
        torch.save(payload, f)
        return _StorageInfo(name, start, f.tell() - start)

    def add_chunk(self, key: str, global_shape: tuple[int, ...], offsets: tuple[int, ...],
                  tensor: torch.Tensor) -> None:
        """Store ``tensor`` as the chunk of ``key`` at ``offsets`` (same rank as the global)."""
        if tensor.dim() != len(global_shape) or len(offsets) != len(global_shape):
            raise ValueError(f"{key}: chunk {tuple(tensor.shape)} at {offsets} vs {global_shape}")
        if any(o + s > g for o, s, g in zip(offsets, tensor.shape, global_shape, strict=True)):
            raise ValueError(f"{key}: chunk {tuple(tensor.shape)} at {offsets} exceeds "
                             f"{global_shape}")
        # torch.save stores a view's whole storage: keep the chunk's own bytes only.
        if (tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size()
                or not tensor.is_contiguous()):
            tensor = tensor.clone()
        meta = self.tensors.setdefault(key, TensorStorageMetadata(
            TensorProperties(dtype=tensor.dtype), torch.Size(global_shape), []))
        if meta.size != torch.Size(global_shape) or meta.properties.dtype != tensor.dtype:
            raise ValueError(f"{key}: inconsistent global shape or dtype across chunks")
        meta.chunks.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(tensor.shape)))
        self.storage[MetadataIndex(key, torch.Size(offsets))] = self._append(tensor.detach())

    def add_bytes(self, key: str, data: bytes) -> None:
        """Store a ShardedObject's serialized bytes verbatim (as megatron's BytesIO items)."""
        name, f = self._stream(len(data))
        start = f.tell()
        f.write(data)
        self.objects[key] = BytesStorageMetadata()
        self.storage[MetadataIndex(key)] = _StorageInfo(name, start, len(data))

    def finish(self, common: bytes | None = None) -> None:
        """Write ``.metadata``, ``common.pt`` (``common``: its raw bytes, default ``{}``) and
        ``metadata.json``; the checkpoint is complete only after this."""
        if self._file is not None:
            self._file.close()
        metadata = Metadata(state_dict_metadata={**self.tensors, **self.objects},
                            planner_data=None, storage_data=self.storage,
                            storage_meta=StorageMeta(checkpoint_id=str(self.dir),
                                                     save_id=str(uuid.uuid4())),
                            version=DCP_VERSION)
        with open(self.dir / ".metadata.tmp", "wb") as f:
            pickle.dump(metadata, f)
        (self.dir / ".metadata.tmp").replace(self.dir / ".metadata")
        if common is None:
            buf = io.BytesIO()
            torch.save({}, buf)
            common = buf.getvalue()
        (self.dir / "common.pt").write_bytes(common)
        (self.dir / "metadata.json").write_text(json.dumps(BACKENDS))


class _FileSlice(io.RawIOBase):
    """Bytes ``[offset, offset + length)`` of an open file as a seekable stream: ``torch.load``
    reads a stored chunk straight into its tensor, without a bytes copy of the chunk first."""

    def __init__(self, f: io.BufferedReader, offset: int, length: int) -> None:
        super().__init__()
        self.f, self.offset, self.length = f, offset, length
        f.seek(offset)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.f.tell() - self.offset

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.tell(), io.SEEK_END: self.length}[whence]
        self.f.seek(self.offset + min(max(base + pos, 0), self.length))
        return self.tell()

    def readinto(self, buffer: memoryview) -> int:
        view = memoryview(buffer).cast("B")
        return self.f.readinto(view[:max(0, self.length - self.tell())])


class DistReader:
    """Reads regions of tensors from a torch_dist directory, loading one stored chunk at a time."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        backends = self.dir / "metadata.json"
        if not (self.dir / ".metadata").is_file() or not backends.is_file():
            raise ConversionError(f"{self.dir}: not a megatron torch_dist checkpoint (no "
                                  ".metadata / metadata.json)")
        found = json.loads(backends.read_text()).get("sharded_backend")
        if found != "torch_dist":
            raise ConversionError(f"{self.dir}: sharded backend {found!r}; only torch_dist is read")
        with open(self.dir / ".metadata", "rb") as f:
            self.metadata: Metadata = pickle.load(f)  # trusted: a checkpoint the user names
        self.tensors = {k: v for k, v in self.metadata.state_dict_metadata.items()
                        if isinstance(v, TensorStorageMetadata)}
        self.objects = [k for k, v in self.metadata.state_dict_metadata.items()
                        if isinstance(v, BytesStorageMetadata)]

    def check_complete(self) -> None:
        """Every stored chunk's bytes are in its file (sizes only, no reading): a truncated
        ``.distcp`` (a full disk, an interrupted copy) is named before any load starts."""
        needed: dict[str, int] = {}
        for info in self.metadata.storage_data.values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0),
                                             info.offset + info.length)
        for name, end in sorted(needed.items()):
            path = self.dir / name
            size = path.stat().st_size if path.is_file() else -1
            if size < end:
                what = "missing" if size < 0 else f"truncated ({size} of {end} bytes)"
                raise ConversionError(f"{path}: {what}; the checkpoint is damaged: use another "
                                      "one (an earlier step_N) or re-save it")

    def first_damaged(self, seconds: float) -> ConversionError | None:
        """After a load failed: the error naming the first missing, truncated or corrupt file
        (every stored tensor chunk is read back, file by file, in storage order), or None when
        none is found within ``seconds`` (a large checkpoint: the rest is left unread)."""
        deadline = time.monotonic() + seconds
        try:
            self.check_complete()
        except ConversionError as err:
            return err
        for index in sorted(self.metadata.storage_data,
                            key=lambda i: (self.metadata.storage_data[i].relative_path,
                                           self.metadata.storage_data[i].offset)):
            if time.monotonic() > deadline:
                return None
            if index.fqn in self.tensors:  # pickled objects: no reading them back safely
                try:
                    self._load_chunk(index.fqn, index.offset)
                except ConversionError as err:
                    return err
        return None

    def global_shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._meta(key).size)

    def dtype(self, key: str) -> torch.dtype:
        return self._meta(key).properties.dtype

    def _meta(self, key: str) -> TensorStorageMetadata:
        if key not in self.tensors:
            raise ConversionError(f"{self.dir}: tensor {key!r} is missing from the checkpoint")
        return self.tensors[key]

    def _info(self, index: MetadataIndex) -> _StorageInfo:
        info: _StorageInfo = self.metadata.storage_data[index]
        if info.transform_descriptors:
            raise ConversionError(f"{self.dir}: {index.fqn} uses storage transforms "
                                  f"{info.transform_descriptors}; not supported")
        return info

    def read_bytes(self, key: str) -> bytes:
        """A ShardedObject's stored bytes, verbatim."""
        info = self._info(MetadataIndex(key))
        with open(self.dir / info.relative_path, "rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
        if len(data) != info.length:
            raise ConversionError(f"{self.dir / info.relative_path}: truncated")
        return data

    def _load_chunk(self, key: str, offsets: torch.Size) -> torch.Tensor:
        info = self._info(MetadataIndex(key, offsets))
        path = self.dir / info.relative_path
        with open(path, "rb") as f:
            try:
                return torch.load(_FileSlice(f, info.offset, info.length), map_location="cpu",
                                  weights_only=True)
            except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
                size = path.stat().st_size
                what = (f"truncated ({size} bytes, {key} needs {info.offset + info.length})"
                        if size < info.offset + info.length else f"corrupt ({err})".split("\n")[0])
                raise ConversionError(f"{path}: {what}; the checkpoint is damaged: use another "
                                      "one (an earlier step_N) or re-save it") from err

    def read(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        """The region ``[offsets, offsets + sizes)`` of global tensor ``key``."""
        meta = self._meta(key)
        out = None
        covered = 0
        for chunk in meta.chunks:
            lo = [max(a, b) for a, b in zip(chunk.offsets, offsets, strict=True)]
            hi = [min(a + n, b + m) for a, n, b, m in zip(chunk.offsets, chunk.sizes, offsets,
                                                           sizes, strict=True)]
            if any(h <= low for low, h in zip(lo, hi, strict=True)):
                continue
            stored = self._load_chunk(key, chunk.offsets)
            if tuple(chunk.offsets) == tuple(offsets) and tuple(stored.shape) == tuple(sizes):
                return stored  # the region is exactly one stored chunk: no copy
            if out is None:
                out = torch.empty(sizes, dtype=meta.properties.dtype)
            src = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, chunk.offsets, strict=True))
            dst = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offsets, strict=True))
            out[dst] = stored[src]
            covered += math.prod(h - low for low, h in zip(lo, hi, strict=True))
        if out is None or covered != math.prod(sizes):
            raise ConversionError(f"{self.dir}: the stored chunks of {key!r} do not cover region "
                                  f"{offsets} + {sizes}")
        return out
