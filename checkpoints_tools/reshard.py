"""Rewrite a tulu3 checkpoint for another TP/PP/VPP, streaming, one process.

    python -m checkpoints_tools.reshard --ckpt CKPT --out NEW --tp 4 --pp 2 [--vpp 2] [--force]
        [--account-for-embedding-in-pipeline-split] [--account-for-loss-in-pipeline-split]

Model weights only (optimizer state is not carried); see :func:`tulu3.checkpoint.reshard.reshard`.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

from checkpoints_tools.layout_args import add_layout_arguments, layout_text, split_kwargs
from tulu3.checkpoint.errors import run_cli
from tulu3.checkpoint.reshard import reshard
from tulu3.config import run_command


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m checkpoints_tools.reshard",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="tulu3 checkpoint directory (tulu3.json)")
    parser.add_argument("--out", required=True, help="directory for the resharded checkpoint")
    add_layout_arguments(parser)
    parser.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(partial(reshard, **split_kwargs(args)), args.ckpt, args.out, args.tp,
                   args.pp, args.vpp, args.force, args.quiet,
                   done=f"wrote {args.out} ({layout_text(args)})", warn=True)


if __name__ == "__main__":
    sys.exit(run_command(main, "checkpoints_tools.reshard"))
