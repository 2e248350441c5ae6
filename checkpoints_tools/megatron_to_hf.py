"""tulu3 checkpoint -> HF Llama (sharded safetensors + config), streaming, one process.

    python -m checkpoints_tools.megatron_to_hf --ckpt CKPT --out HF [--dtype bf16|fp32]
        [--tokenizer-dir DIR] [--max-shard-size 5GB] [--force]

The export is :func:`tulu3.checkpoint.to_hf.export`.
"""

from __future__ import annotations

import argparse
import sys

from tulu3.checkpoint.errors import run_cli
from tulu3.checkpoint.format import DTYPE_NAMES
from tulu3.checkpoint.to_hf import export, parse_size
from tulu3.config import run_command


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m checkpoints_tools.megatron_to_hf",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="tulu3 checkpoint directory (tulu3.json)")
    parser.add_argument("--out", required=True, help="HF model directory to write")
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None,
                        help="HF dtype (default: the checkpoint's)")
    parser.add_argument("--tokenizer-dir", default=None,
                        help="copy tokenizer files from here (default: the source recorded in "
                        "tulu3.json, if any)")
    parser.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"))
    parser.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(export, args.ckpt, args.out, args.dtype, args.tokenizer_dir, args.force,
                   args.max_shard_size, args.quiet, done=f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(run_command(main, "checkpoints_tools.megatron_to_hf"))
