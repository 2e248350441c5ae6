"""The layout flags hf_to_megatron and reshard share (Megatron-LM's names for the uneven split)."""

from __future__ import annotations

import argparse


def add_layout_arguments(parser: argparse.ArgumentParser) -> None:
    """--tp / --pp / --vpp and megatron's two pipeline-split flags."""
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (vocab padding, "
                        "chunking)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (validated, "
                        "recorded)")
    parser.add_argument("--vpp", type=int, default=1, help="virtual stages per pipeline rank")
    parser.add_argument("--account-for-embedding-in-pipeline-split", action="store_true",
                        help="count the embedding as one layer in the pipeline split (as "
                        "parallel.account_for_embedding_in_pipeline_split)")
    parser.add_argument("--account-for-loss-in-pipeline-split", action="store_true",
                        help="count the output layer + loss as one layer in the pipeline split")


def split_kwargs(args: argparse.Namespace) -> dict[str, bool]:
    """The pipeline-split flags as keywords of convert / reshard."""
    return {"account_for_embedding_in_pipeline_split": args.account_for_embedding_in_pipeline_split,
            "account_for_loss_in_pipeline_split": args.account_for_loss_in_pipeline_split}


def layout_text(args: argparse.Namespace) -> str:
    """``TP8 PP16 VPP1 (+embedding +loss in the split)`` for the tools' closing line."""
    extra = [name for name, on in (("+embedding", args.account_for_embedding_in_pipeline_split),
                                   ("+loss", args.account_for_loss_in_pipeline_split)) if on]
    split = f" ({' '.join(extra)} in the split)" if extra else ""
    return f"TP{args.tp} PP{args.pp} VPP{args.vpp}{split}"
