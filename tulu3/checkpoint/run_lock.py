"""``RUN_DIR/.lock``: one job per run directory.

Two jobs on one run directory (a scheduler requeue while the first still runs) would both resume,
both append to metrics.jsonl and both write checkpoints. The first job's rank 0 creates the lock
file (``O_EXCL``) with its host and pid; a second job is refused, naming the holder. A lock left by
a job killed with ``kill -9`` on this host (its pid no longer alive) is stale and taken over; one
from another host cannot be checked from here, so the message says how to remove it.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from tulu3.config import UserError

LOCK_NAME = ".lock"


class RunDirLocked(UserError):
    """Another live job holds the run directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _holder(path: Path) -> tuple[str, int] | None:
    """(host, pid) written in the lock file, or None when it is unreadable / half written."""
    try:
        host, pid = path.read_text().split()
        return host, int(pid)
    except (OSError, ValueError):
        return None


def acquire(run_dir: str | Path) -> Path:
    """Create ``run_dir/.lock`` for this process; returns its path. Raises
    :class:`RunDirLocked` naming the holder's host and pid when a live job holds it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    me = f"{socket.gethostname()} {os.getpid()}\n"
    for _ in range(3):  # a stale lock is replaced, then created again exclusively
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if holder is None or holder == (socket.gethostname(), os.getpid()):
                path.unlink(missing_ok=True)  # half written by a killed job, or ours
                continue
            host, pid = holder
            if host == socket.gethostname() and not _pid_alive(pid):
                path.unlink(missing_ok=True)  # stale: its job was killed
                continue
            raise RunDirLocked(
                f"{run_dir} is in use by another job (host {host}, pid {pid}; {path}): wait "
                f"for it, or pick another train.run_dir; if that job is gone, delete {path}"
            ) from None
        with os.fdopen(fd, "w") as f:
            f.write(me)
            f.flush()
            os.fsync(f.fileno())
        return path
    raise RunDirLocked(f"{path}: could not take the run-directory lock (another job races for it)")


def release(path: Path) -> None:
    """Remove the lock if this process still holds it."""
    if _holder(path) == (socket.gethostname(), os.getpid()):
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def run_dir_lock(run_dir: str | Path, hold: bool = True) -> Iterator[None]:
    """Hold ``run_dir/.lock`` while the block runs (``hold=False``: a no-op, for ranks > 0)."""
    if not hold:
        yield
        return
    path = acquire(run_dir)
    try:
        yield
    finally:
        release(path)
