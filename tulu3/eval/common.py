"""What the eval commands share: start-up, the parallel layout of a checkpoint, the tokenizer it
records, and printing / writing the report at the end.

Each command calls :func:`start` first, :func:`init_layout` once (which returns this rank's
:class:`~tulu3.parallel.groups.ProcessGroups`, the only handle on megatron's process state the
command passes on), and :func:`finish` last.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

if TYPE_CHECKING:
    from tulu3.config import Config
    from tulu3.model.presets import LlamaShape
    from tulu3.parallel.groups import ProcessGroups
    from tulu3.parallel.layout import ParallelLayout


def start() -> bool:
    """One thread per process unless set, logging on; True when this command will open the
    process group (and so must close it in :func:`finish`)."""
    from tulu3.metrics import setup_logging

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    setup_logging()
    return not dist.is_initialized()


def init_layout(ckpt: str, tp: int, pp: int, seed: int
                ) -> tuple[Config, LlamaShape, ParallelLayout, ProcessGroups]:
    """(config, shape, layout, groups) for the checkpoint at TP x PP on the current world (the
    rest data parallel, one sequence per micro-batch), set up as a training run is
    (:func:`tulu3.parallel.init.setup_parallel`: torch.distributed and megatron's groups)."""
    from tulu3.checkpoint.load import checkpoint_shape
    from tulu3.config import Config
    from tulu3.model.presets import with_shape
    from tulu3.parallel.init import setup_parallel

    world = dist.get_world_size() if dist.is_initialized() else \
        int(os.environ.get("WORLD_SIZE", "1"))
    cfg = Config()
    cfg.parallel.tp, cfg.parallel.pp = tp, pp
    cfg.train.seed = seed
    shape = checkpoint_shape(ckpt)
    cfg.model = with_shape(cfg.model, shape)
    cfg.train.global_batch, cfg.train.micro_batch = max(1, world // (tp * pp)), 1
    layout, groups = setup_parallel(cfg)
    return cfg, shape, layout, groups


def default_tokenizer(ckpt: str) -> str:
    """The tokenizer recorded in a tulu3 checkpoint (or a run directory's latest), else ``ckpt``
    itself (an HF directory)."""
    from tulu3.checkpoint.format import is_tulu3_checkpoint, read_meta
    from tulu3.checkpoint.load import resolve_checkpoint_dir

    ckpt = str(resolve_checkpoint_dir(ckpt))
    if is_tulu3_checkpoint(ckpt):
        path = read_meta(ckpt).tokenizer
        if not path:
            from tulu3.config import UserError

            raise UserError(f"{ckpt} records no tokenizer: pass --tokenizer")
        return path
    return ckpt


def check_paths(options: dict[str, str | None]) -> None:
    """Each command-line option that names a path (when given) exists: the error names the
    option, before any process group starts."""
    from tulu3.config import UserError

    for option, path in options.items():
        if path and not Path(path).exists():
            raise UserError(f"{option} {path}: not found (from {os.getcwd()})")


def finish(report: dict[str, Any] | None, out: str | None, owns_group: bool,
           show: Callable[[dict[str, Any]], str]) -> int:
    """Print ``show(report)`` and write it to ``out`` (rank 0: the others have None), then close
    the process group if this command opened it."""
    if report is not None:
        print(show(report))
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(report, indent=1))
            print(f"report: {out}")
    if owns_group:
        dist.barrier()
        dist.destroy_process_group()
    return 0
