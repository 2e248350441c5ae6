"""Rewrite a tulu3 checkpoint for another TP/PP/VPP, streaming, one process.

    python -m checkpoints_tools.reshard --ckpt CKPT --out NEW --tp 4 --pp 2 [--vpp 2] [--force]

Model weights only (optimizer state is not carried); see :func:`tulu3.checkpoint.reshard.reshard`.
"""

from __future__ import annotations

import argparse
import sys

from tulu3.checkpoint.errors import run_cli
from tulu3.checkpoint.reshard import reshard


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m checkpoints_tools.reshard",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="tulu3 checkpoint directory (tulu3.json)")
    parser.add_argument("--out", required=True, help="directory for the resharded checkpoint")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=1)
    parser.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(reshard, args.ckpt, args.out, args.tp, args.pp, args.vpp, args.force,
                   args.quiet, done=f"wrote {args.out} (TP{args.tp} PP{args.pp} VPP{args.vpp})",
                   warn=True)


if __name__ == "__main__":
    sys.exit(main())
