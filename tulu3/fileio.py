"""Atomic, durable replacement of a file or directory: the one write-temp / fsync / rename.

Standard library only, so every part of tulu3 (data, checkpoint, rewards) may import it without
an import cycle. ``atomic_path`` yields a temporary path beside the target; when the block
succeeds the temporary is fsynced, renamed onto the target with ``os.replace`` (atomic on one file
system: a reader sees the old version or the new one, never half of one), and the parent
directory is fsynced so the rename itself survives a power cut. When the block fails (or is
interrupted) the temporary is removed and the target is left as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def fsync_path(path: str | Path) -> None:
    """fsync a file (its dirty pages, whichever descriptor wrote them) or a directory (the names
    created, renamed or removed in it) by name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | Path) -> None:
    """fsync every file and directory under ``folder`` (and ``folder`` itself)."""
    for dirpath, _, files in os.walk(folder):
        for name in files:
            fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


@contextmanager
def atomic_path(path: str | Path, directory: bool = False) -> Iterator[Path]:
    """A temporary path in ``path``'s directory, renamed onto ``path`` when the block succeeds.

    ``directory=False``: the block creates the temporary file (a unique name, not yet existing).
    ``directory=True``: the temporary directory exists already (``tempfile.mkdtemp``, mode 0700)
    and the block fills it; ``os.replace`` then fails with OSError if ``path`` is a non-empty
    directory (someone else committed first). Either way the temporary's contents are fsynced
    before the rename and the parent directory after it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    else:  # a plain open() later: the file gets the usual umask mode, not mkstemp's 0600
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if directory:
            fsync_tree(tmp)
        else:
            fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        if directory:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
        else:
            tmp.unlink(missing_ok=True)
    fsync_path(path.parent)


@contextmanager
def atomic_open(path: str | Path, mode: str = "w",
                encoding: str | None = "utf-8") -> Iterator[IO]:
    """``open(path, mode)`` written under a temporary name and renamed onto ``path`` only when
    the block succeeds (see :func:`atomic_path`): a reader never sees half a file, a failure (or
    Ctrl-C) leaves ``path`` as it was, and writing a file onto its own input reads the old file to
    the end. ``mode`` is "w" or "wb" (``encoding`` is ignored for binary)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode {mode!r}; expected 'w' or 'wb'")
    with atomic_path(path) as tmp:  # it fsyncs the file by name once the block has closed it
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
