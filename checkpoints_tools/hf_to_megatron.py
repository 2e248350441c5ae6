"""HF Llama safetensors -> tulu3 checkpoint (megatron torch_dist), streaming, one process.

    python -m checkpoints_tools.hf_to_megatron --hf-dir HF --out CKPT --tp 8 --pp 4 [--vpp 2]
        [--account-for-embedding-in-pipeline-split] [--account-for-loss-in-pipeline-split]
        [--dtype bf16|fp32] [--force]

The conversion is :func:`tulu3.checkpoint.from_hf.convert`.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

from checkpoints_tools.layout_args import add_layout_arguments, layout_text, split_kwargs
from tulu3.checkpoint.errors import run_cli
from tulu3.checkpoint.format import DTYPE_NAMES
from tulu3.checkpoint.from_hf import convert
from tulu3.config import run_command


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m checkpoints_tools.hf_to_megatron",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--hf-dir", required=True, help="HF model directory (config.json + "
                        "safetensors)")
    parser.add_argument("--out", required=True, help="tulu3 checkpoint directory to write")
    add_layout_arguments(parser)
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None,
                        help="stored dtype (default: the HF tensors')")
    parser.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--plan", action="store_true", help="print which stored pieces each "
                        "pipeline rank reads, and from which files (config.json only: no weights "
                        "are read, nothing is written)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plan:
        return run_cli(print_plan, args.hf_dir, args, done="(plan only: nothing written)")
    layout = layout_text(args)
    return run_cli(partial(convert, **split_kwargs(args)), args.hf_dir, args.out, args.tp,
                   args.pp, args.vpp, args.dtype, args.force, args.quiet,
                   done=lambda out: f"wrote {out} ({layout}; loads at any layout)")


def print_plan(hf_dir: str, args: argparse.Namespace) -> None:
    """The conversion's plan from config.json alone (tulu3.checkpoint.plan.describe_plan)."""
    from tulu3.checkpoint.format import check_layout, converter_layout
    from tulu3.checkpoint.hf_config import read_hf_config, shape_from_hf_config
    from tulu3.checkpoint.plan import describe_plan

    shape = shape_from_hf_config(read_hf_config(Path(hf_dir)))
    layout = converter_layout(args.tp, args.pp, args.vpp, *split_kwargs(args).values())
    check_layout(shape, layout)
    print("\n".join(describe_plan(shape, layout, DTYPE_NAMES[args.dtype or "bf16"])))


if __name__ == "__main__":
    sys.exit(run_command(main, "checkpoints_tools.hf_to_megatron"))
