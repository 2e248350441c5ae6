"""HF Llama safetensors -> tulu3 checkpoint (megatron torch_dist), streaming, one process.

    python -m checkpoints_tools.hf_to_megatron --hf-dir HF --out CKPT --tp 8 --pp 4 [--vpp 2]
        [--dtype bf16|fp32] [--force]

The conversion is :func:`tulu3.checkpoint.from_hf.convert`.
"""

from __future__ import annotations

import argparse
import sys

from tulu3.checkpoint.errors import run_cli
from tulu3.checkpoint.format import DTYPE_NAMES
from tulu3.checkpoint.from_hf import convert


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m checkpoints_tools.hf_to_megatron",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--hf-dir", required=True, help="HF model directory (config.json + "
                        "safetensors)")
    parser.add_argument("--out", required=True, help="tulu3 checkpoint directory to write")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (vocab padding, "
                        "chunking)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (validated, "
                        "recorded)")
    parser.add_argument("--vpp", type=int, default=1, help="virtual stages per pipeline rank")
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None,
                        help="stored dtype (default: the HF tensors')")
    parser.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    layout = f"TP{args.tp} PP{args.pp} VPP{args.vpp}"
    return run_cli(convert, args.hf_dir, args.out, args.tp, args.pp, args.vpp, args.dtype,
                   args.force, args.quiet,
                   done=lambda out: f"wrote {out} ({layout}; loads at any layout)")


if __name__ == "__main__":
    sys.exit(main())
