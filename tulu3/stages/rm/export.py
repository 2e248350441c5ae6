"""Reward model -> Hugging Face ``LlamaForSequenceClassification`` (one label).

The backbone is exported exactly as a policy is (``checkpoints_tools``); the scalar head becomes
``score.weight`` [1, hidden] and ``config.json`` says ``architectures:
["LlamaForSequenceClassification"]``, ``num_labels: 1`` and a ``pad_token_id``.

The pad token matters: transformers scores each row at its last token that is not
``pad_token_id``, and tulu3 scores a sequence at its last token (the eos in Tülu-format data). So
``pad_token_id`` must be a token the scored text never ends with: never the eos. The default is
the tokenizer's pad (Llama 3: ``<|finetune_right_pad_id|>``; Tülu 3 checkpoints: ``<pad>``).

Two ways out:
- in-process, at the end of a run: :func:`export_reward_model` (every rank calls it);
- from a checkpoint, streaming, one tensor at a time:
  ``python -m tulu3.rm_export --ckpt RUN/checkpoints/step_N --out DIR [--pad-token-id N]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tulu3.config import UserError, run_command
from tulu3.model.presets import LlamaShape
from tulu3.parallel.groups import ProcessGroups
from tulu3.parallel.layout import ParallelLayout


class RMExportError(UserError):
    """The export cannot produce a model transformers scores like tulu3 does."""


def set_pad_token(out_dir: str | Path, pad_token_id: int, eos_token_id: int | None = None
                  ) -> dict[str, Any]:
    """Write ``pad_token_id`` into ``out_dir/config.json`` after checking it is not the eos."""
    path = Path(out_dir) / "config.json"
    config = json.loads(path.read_text())
    eos = config.get("eos_token_id") if eos_token_id is None else eos_token_id
    eos_ids = set(eos) if isinstance(eos, list) else {eos}
    if pad_token_id in eos_ids:
        raise RMExportError(f"pad_token_id {pad_token_id} is the eos: transformers would score "
                            "the token before each sequence's final eos; pass another pad id "
                            "(e.g. the tokenizer's <|finetune_right_pad_id|>)")
    config["pad_token_id"] = int(pad_token_id)
    path.write_text(json.dumps(config, indent=2) + "\n")
    return config


def export_reward_model(chunks: list[torch.nn.Module], shape: LlamaShape,
                        layout: ParallelLayout, out_dir: str | Path, pad_token_id: int, *,
                        eos_token_id: int | None = None, dtype: torch.dtype | None = None,
                        hf_config: dict | None = None, tokenizer: str | Path | None = None,
                        groups: ProcessGroups) -> None:
    """Write ``out_dir`` as an HF LlamaForSequenceClassification from live ScalarHeadModel chunks
    (unwrapped, this rank's; ``groups`` their process groups). Collective: every rank calls it;
    rank 0 writes."""
    from tulu3.checkpoint.export import export_hf_from_chunks

    export_hf_from_chunks(chunks, shape, layout, out_dir, dtype=dtype, hf_config=hf_config,
                          tokenizer=tokenizer, groups=groups, head="scalar")
    if dist.get_rank() == 0:
        set_pad_token(out_dir, pad_token_id, eos_token_id)
    dist.barrier()


def tokenizer_ids(source: str | Path) -> tuple[int, int]:
    """(pad id, eos id) of a tokenizer file or HF directory, as tulu3 trains with it."""
    from tulu3.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(source))
    return tok.pad_id, tok.eos_id


def export_checkpoint(ckpt: str | Path, out: str | Path, pad_token_id: int | None = None,
                      tokenizer_dir: str | Path | None = None, dtype: str | None = None,
                      force: bool = False) -> list[str]:
    """A reward-model checkpoint (``head: "scalar"`` in tulu3.json) -> HF directory."""
    from tulu3.checkpoint.format import read_meta
    from tulu3.checkpoint.load import resolve_checkpoint_dir
    from tulu3.checkpoint.to_hf import export

    ckpt = resolve_checkpoint_dir(ckpt)  # a run directory: its latest checkpoint
    meta = read_meta(ckpt)
    if meta.head != "scalar":
        raise RMExportError(f"{ckpt}: not a reward-model checkpoint (tulu3.json head is "
                            f"{meta.head!r}); export it with python -m "
                            "checkpoints_tools.megatron_to_hf")
    eos = None
    source = tokenizer_dir or meta.tokenizer
    if pad_token_id is None:
        pad_token_id = (meta.hf_config or {}).get("pad_token_id")
    if source is not None and Path(source).exists():
        tok_pad, eos = tokenizer_ids(source)
        pad_token_id = tok_pad if pad_token_id is None else pad_token_id
    if pad_token_id is None:
        raise RMExportError(f"{ckpt}: no pad token id known; pass --pad-token-id or "
                            "--tokenizer-dir")
    notes = export(ckpt, out, dtype, tokenizer_dir, force, quiet=True)
    set_pad_token(out, pad_token_id, eos)
    return notes + [f"pad_token_id: {pad_token_id}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tulu3.rm_export",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="reward-model checkpoint (tulu3.json)")
    parser.add_argument("--out", required=True, help="HF model directory to write")
    parser.add_argument("--pad-token-id", type=int, default=None,
                        help="default: the checkpoint's config, else its tokenizer's pad")
    parser.add_argument("--tokenizer-dir", default=None,
                        help="tokenizer to copy and read the pad/eos ids from (default: the one "
                        "recorded in tulu3.json)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None)
    parser.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    args = parser.parse_args(argv)
    from tulu3.checkpoint.errors import run_cli

    return run_cli(export_checkpoint, args.ckpt, args.out, args.pad_token_id, args.tokenizer_dir,
                   args.dtype, args.force, done=f"wrote {args.out}", catch=(RMExportError,))


if __name__ == "__main__":
    sys.exit(run_command(main, "tulu3.rm_export"))
