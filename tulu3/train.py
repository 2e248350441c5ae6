"""``torchrun --nproc-per-node N -m tulu3.train --stage sft|dpo|rm|rlvr --config R.yaml``.

Reads the recipe and ``--set`` overrides, checks them, the layout, the paths and every data row
(:func:`tulu3.stages.preflight.preflight`, before any model is built), takes the run directory's
lock (``RUN_DIR/.lock``) and hands the run to the shared trainer
with the stage's loop (:func:`run_stage`: tokenizer -> shape -> model -> loop -> optimizer ->
fit). ``--dry-run`` prints the resolved config and parallel layout, builds rank ``$RANK``'s
model on the meta device (``WORLD_SIZE=256 RANK=255``: a 256-GPU run's last stage, on a laptop)
and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tulu3.config import Config, load_config, run_command
from tulu3.stages.preflight import preflight

LOOPS = {"sft": "tulu3.stages.sft", "dpo": "tulu3.stages.dpo.loop", "rm": "tulu3.stages.rm.stage",
         "rlvr": "tulu3.stages.rlvr.loop"}
"""Stage -> the module whose ``build_loop(trainer, tokenizer, chunks, shard)`` makes its loop."""
STAGES = tuple(LOOPS)
HEADS = {"rm": "scalar"}
"""The model head a stage trains when it is not the LM head (tulu3.model.scalar_head)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tulu3.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", required=True, choices=STAGES)
    parser.add_argument("--config", required=True, help="recipe YAML (launch/recipes/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], nargs="+",
                        metavar="KEY=VALUE", help="override recipe keys (repeatable)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config and layout, then exit")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of a failure (or TULU3_DEBUG=1)")
    args = parser.parse_args(argv)
    args.overrides = [item for group in args.overrides for item in group]
    return args


def dry_run(cfg: Config, stage: str) -> str:
    """The resolved config and layout, and rank ``$RANK`` of ``$WORLD_SIZE``'s model built by
    megatron on the meta device (:mod:`tulu3.model.dry_run`); starts no real process group."""
    from tulu3.model.dry_run import dry_run as build_dry_run

    return build_dry_run(cfg, stage, HEADS.get(stage, "lm"))


def main(argv: list[str] | None = None) -> int:
    """The command: one line on rank 0 and a non-zero status for any failure (run_command)."""
    return run_command(_main, "tulu3.train", argv)


def _main(argv: list[str]) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    notes = preflight(cfg, args.stage)
    if args.dry_run:
        text = dry_run(cfg, args.stage)
        # torchrun's ranks all build their stage; rank 0 prints. Alone (WORLD_SIZE=256 RANK=r,
        # no torchrun) the chosen rank prints.
        if int(os.environ.get("RANK", "0")) == 0 or "LOCAL_RANK" not in os.environ:
            print(text + "".join(f"\n# {note}" for note in notes))
        return
    run_stage(cfg, args.stage)


def run_stage(cfg: Config, stage: str) -> dict:
    """Run one stage to its end; returns the last step's metrics record."""
    from tulu3.trainer import Trainer

    if stage not in LOOPS:
        raise SystemExit(f"tulu3.train: --stage {stage} is not available in this build")
    trainer = Trainer(cfg, stage)
    with lock_run_dir(trainer.run_dir, trainer.rank):
        tokenizer = trainer.load_tokenizer()
        shape = trainer.resolve_shape(tokenizer.vocab_size)
        chunks = trainer.build_model(shape, HEADS.get(stage, "lm"))
        build_loop: Any = importlib.import_module(LOOPS[stage]).build_loop
        loop = build_loop(trainer, tokenizer, chunks, trainer.groups.vocab_shard(shape.vocab))
        trainer.build_optimizer(chunks, loop.total_steps())
        # absolute: an export run from another directory still finds the tokenizer
        tokenizer_path = os.path.abspath(cfg.data.tokenizer) if cfg.data.tokenizer else None
        return trainer.fit(loop, chunks, shape, tokenizer_path)


@contextlib.contextmanager
def lock_run_dir(run_dir: Path, rank: int) -> Iterator[None]:
    """Hold RUN_DIR/.lock (rank 0) for the run; every rank stops when another job holds it."""
    from tulu3.checkpoint.run_lock import RunDirLocked, run_dir_lock
    from tulu3.step import any_rank

    with contextlib.ExitStack() as stack:
        error: RunDirLocked | None = None
        if rank == 0:
            try:
                stack.enter_context(run_dir_lock(run_dir))
            except RunDirLocked as err:
                error = err
        if any_rank(error is not None):
            raise error or RunDirLocked(f"{run_dir} is in use by another job (see rank 0)")
        yield


if __name__ == "__main__":
    sys.exit(main())
