"""``torchrun --nproc-per-node N -m tulu3.train --stage sft|dpo|rm|rlvr --config R.yaml``.

Reads the recipe and ``--set`` overrides, checks them, and hands the run to the shared trainer
with the stage's loop (:func:`run_stage`: tokenizer -> shape -> model -> loop -> optimizer ->
fit). ``--dry-run`` prints the resolved config and parallel layout and exits.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any

import yaml

from tulu3.config import Config, ConfigError, load_config

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
    args = parser.parse_args(argv)
    args.overrides = [item for group in args.overrides for item in group]
    return args


def dry_run(cfg, stage: str) -> str:  # noqa: ANN001 - Config
    """The resolved config and layout as text; starts no process group and reads no data."""
    from tulu3.model.presets import param_count, resolve_shape
    from tulu3.parallel.layout import make_layout

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.model.vocab is None and cfg.data.tokenizer and os.path.exists(cfg.data.tokenizer):
        from tulu3.data.tokenizer import load_tokenizer

        cfg.model.vocab = load_tokenizer(cfg.data.tokenizer).vocab_size
    layout = make_layout(cfg, world)
    shape = resolve_shape(cfg.model)
    micro_batches = layout.micro_batches(cfg.train.global_batch, cfg.train.micro_batch)
    lines = [f"# tulu3.train --stage {stage} (dry run: nothing was started)",
             yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(),
             f"# layout: {layout.describe()}",
             f"# model: {shape.layers} layers, hidden {shape.hidden}, "
             f"{param_count(shape) / 1e6:.2f} M parameters; spec {cfg.model.spec}",
             f"# micro-batches per step per DP rank: {micro_batches}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            text = dry_run(cfg, args.stage)
            if int(os.environ.get("RANK", "0")) == 0:
                print(text)
            return
    except ConfigError as err:
        sys.exit(f"tulu3.train: {err}")
    run_stage(cfg, args.stage)


def run_stage(cfg: Config, stage: str) -> dict:
    """Run one stage to its end; returns the last step's metrics record."""
    from tulu3.trainer import Trainer

    if stage not in LOOPS:
        raise SystemExit(f"tulu3.train: --stage {stage} is not available in this build")
    trainer = Trainer(cfg, stage)
    tokenizer = trainer.load_tokenizer()
    shape = trainer.resolve_shape(tokenizer.vocab_size)
    chunks = trainer.build_model(shape, HEADS.get(stage, "lm"))
    build_loop: Any = importlib.import_module(LOOPS[stage]).build_loop
    loop = build_loop(trainer, tokenizer, chunks, trainer.groups.vocab_shard(shape.vocab))
    trainer.build_optimizer(chunks, loop.total_steps())
    return trainer.fit(loop, chunks, shape, cfg.data.tokenizer)


if __name__ == "__main__":
    main()
