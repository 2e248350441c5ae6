"""Tokenization cache: ragged int arrays in ``.npy`` files, keyed by everything that changes them.

A cache entry is a directory ``CACHE_DIR/<key>/`` of ``.npy`` arrays plus ``meta.json``. It is
written into a temporary directory and renamed into place, so a reader sees a whole entry or none;
a lock file makes concurrent builders (several ranks on one node, a restarted job) build once while
the others wait and then read it. Arrays load memory-mapped: a 1B-token dataset costs page cache,
not per-process RAM.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tulu3.fileio import atomic_path

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the tokenized format or the tokenization rules change


@dataclass
class Ragged:
    """Variable-length rows stored flat: row i is ``values[offsets[i]:offsets[i + 1]]``."""

    values: np.ndarray
    offsets: np.ndarray  # int64 [n + 1]

    @classmethod
    def from_lists(cls, rows: Sequence[Sequence[int]], dtype: type = np.int32) -> Ragged:
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = (np.concatenate([np.asarray(r, dtype=dtype) for r in rows]) if rows
                  else np.zeros(0, dtype=dtype))
        return cls(values.astype(dtype, copy=False), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i]:self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.values": self.values, f"{prefix}.offsets": self.offsets}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> Ragged:
        return cls(arrays[f"{prefix}.values"], arrays[f"{prefix}.offsets"])


def fingerprint_files(files: Sequence[Path], chunk: int = 1 << 22) -> str:
    """sha256 over the files' names and contents (order given)."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as f:
            while block := f.read(chunk):
                digest.update(block)
    return digest.hexdigest()


def cache_key(parts: dict) -> str:
    """Stable key from a JSON-serialisable description (tokenizer name, template, files...)."""
    blob = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def save_entry(directory: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write arrays + meta into ``directory`` atomically and durably (a temporary directory in
    the same parent, fsynced, renamed: :func:`tulu3.fileio.atomic_path`)."""
    try:
        with atomic_path(directory, directory=True) as tmp:
            for name, array in arrays.items():
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(array))
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    except OSError:
        if not (directory / "meta.json").is_file():  # not "someone else finished it first"
            raise


def load_entry(directory: Path) -> tuple[dict[str, np.ndarray], dict]:
    arrays = {p.name[:-4]: np.load(p, mmap_mode="r") for p in directory.glob("*.npy")}
    return arrays, json.loads((directory / "meta.json").read_text())


def _load_intact(directory: Path) -> tuple[dict[str, np.ndarray], dict] | None:
    """The entry in ``directory``, or None when it is missing or damaged (a truncated .npy
    fails to map, a truncated meta.json to parse)."""
    if not (directory / "meta.json").is_file():
        return None
    try:
        return load_entry(directory)
    except (OSError, ValueError):  # json.JSONDecodeError is a ValueError
        return None


def intact_meta(cache_dir: str | Path, key: str) -> dict | None:
    """``meta.json`` of the entry ``key`` when it is whole (what :func:`get_or_build` would
    read back without building), else None. Reads no rows."""
    entry = _load_intact(Path(cache_dir) / key)
    return None if entry is None else entry[1]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def get_or_build(cache_dir: str | Path | None, key: str,
                 build: Callable[[], tuple[dict[str, np.ndarray], dict]]
                 ) -> tuple[dict[str, np.ndarray], dict, bool]:
    """``(arrays, meta, hit)``: the cached entry, else ``build()`` (saved when cache_dir is set)."""
    if cache_dir is None:
        arrays, meta = build()
        return arrays, meta, False
    directory = Path(cache_dir) / key
    entry = _load_intact(directory)
    if entry is not None:
        return (*entry, True)
    with _locked(Path(cache_dir) / f"{key}.lock"):
        entry = _load_intact(directory)  # another process built it while we waited
        if entry is not None:
            return (*entry, True)
        if directory.exists():  # damaged (truncated by a full disk or a copy): rebuilt
            log.warning(f"tokenization cache {directory} is damaged; rebuilding it")
            shutil.rmtree(directory, ignore_errors=True)
        arrays, meta = build()
        save_entry(directory, arrays, meta)
    return (*load_entry(directory), False)
