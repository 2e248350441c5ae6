"""Status messages: the "tulu3" logger, INFO on rank 0 only (see :func:`setup_logging`)."""

from __future__ import annotations

import logging
import os
import sys

# --- status messages: the "tulu3" logger -----------------------------------------------------
# Modules log with ``logging.getLogger(__name__)`` (children of "tulu3"); :func:`setup_logging`
# shows INFO and WARNING from rank 0 only and ERROR and above from every rank (prefixed with the
# rank), so no call site checks the rank itself.


class _RankFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        if self.rank == 0:
            return True
        if record.levelno >= logging.ERROR:  # warnings are about the run: rank 0 says them once
            record.msg = f"(rank {self.rank}) {record.msg}"
            return True
        return False


def setup_logging(rank: int | None = None, level: int = logging.INFO) -> logging.Logger:
    """Send the "tulu3" logger to stdout as ``[tulu3] message`` (once per process).

    ``rank``: this process's global rank; by default torch.distributed's when a process group
    exists, else torchrun's ``RANK`` (0 for a single process).
    """
    if rank is None:
        rank = _process_rank()
    logger = logging.getLogger("tulu3")
    for handler in list(logger.handlers):
        if getattr(handler, "_tulu3", False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout)
    handler._tulu3 = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("[tulu3] %(message)s"))
    handler.addFilter(_RankFilter(rank))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger


def _process_rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))




