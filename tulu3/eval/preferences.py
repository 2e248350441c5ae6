"""``python -m tulu3.eval_preferences --rm RM --data prefs.jsonl``: a reward model's accuracy on
preference pairs, per source (RewardBench-style).

    python -m tulu3.eval_preferences --rm runs/tiny/rm_scratch --data runs/tiny/data/rm_eval.jsonl
    torchrun --nproc-per-node 8 -m tulu3.eval_preferences --rm D --data F.jsonl --tp 2 --out r.json

Rows are Tülu 3 preference rows: ``chosen`` and ``rejected`` message lists (prompt turns, then
the assistant reply) and an optional ``source`` (rows are grouped by it; "all" is every row).
``--rm`` is a tulu3 reward-model checkpoint, a run directory or an HF
LlamaForSequenceClassification; both replies are scored with :mod:`tulu3.stages.rm.score` at
``--tp`` x ``--pp`` (the rest of the world is data parallel). A pair counts as right when the
chosen reply scores strictly higher. Every row is checked (file:line errors) before the model
is built.

The JSON report: ``accuracy`` ({source: {n, accuracy, margin}}, margin = mean r_chosen -
r_rejected), ``settings``; with ``--scores`` also each pair's two scores.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch.distributed as dist

from tulu3.config import UserError, run_command
from tulu3.data.examples import RowError, validate_messages
from tulu3.data.loading import read_rows
from tulu3.eval.common import check_paths, default_tokenizer, finish, init_layout, start


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tulu3.eval_preferences", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rm", required=True, help="reward model: tulu3 checkpoint, run dir or "
                        "HF LlamaForSequenceClassification")
    parser.add_argument("--data", required=True, help="preference rows (chosen, rejected)")
    parser.add_argument("--tokenizer", help="default: the checkpoint's (tulu3.json) or --rm")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--max-len", type=int, default=4096, help="tokens per reply, cut after")
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per forward")
    parser.add_argument("--no-bos", action="store_true", help="no bos (as the RM was trained)")
    parser.add_argument("--scores", action="store_true", help="keep every pair's scores")
    parser.add_argument("--out", help="write the JSON report here")
    return parser.parse_args(argv)


def read_pairs(path: str) -> tuple[list[tuple[list, list]], list[str]]:
    """(chosen, rejected) message lists and the source of every row; RowError names file:line."""
    pairs, sources = [], []
    for row, where in read_rows(path):
        if not isinstance(row, dict):
            raise RowError(where, f"a preference row must be an object, got {type(row).__name__}")
        chosen = validate_messages(row.get("chosen"), where, "chosen")
        rejected = validate_messages(row.get("rejected"), where, "rejected")
        for key, messages in (("chosen", chosen), ("rejected", rejected)):
            if messages[-1]["role"] != "assistant":
                raise RowError(where, f"'{key}' must end with the assistant reply to score")
        pairs.append((chosen, rejected))
        sources.append(str(row.get("source") or "unknown"))
    if not pairs:
        raise RowError(str(path), "no preference rows")
    return pairs, sources


def pair_accuracy(chosen: list[float], rejected: list[float], sources: list[str]
                  ) -> dict[str, dict[str, float]]:
    """Per source and "all": n, accuracy (r_chosen > r_rejected), margin (mean difference)."""
    groups: dict[str, list[float]] = {}
    for c, r, source in zip(chosen, rejected, sources, strict=True):
        for key in (source, "all"):
            groups.setdefault(key, []).append(c - r)
    return {key: {"n": len(gaps), "accuracy": sum(g > 0 for g in gaps) / len(gaps),
                  "margin": sum(gaps) / len(gaps)} for key, gaps in sorted(groups.items())}


def evaluate(args: argparse.Namespace) -> dict[str, Any] | None:
    """Score every pair (collective); the report on rank 0, None elsewhere."""
    from tulu3.data.tokenizer import load_tokenizer
    from tulu3.stages.rm.score import check_reward_head, load_reward_model, score_conversations

    check_paths({"--data": args.data, "--tokenizer": args.tokenizer})
    pairs, sources = read_pairs(args.data)  # the rows first: the cheapest check of all
    check_paths({"--rm": args.rm})
    check_reward_head(args.rm)
    tok = load_tokenizer(args.tokenizer or default_tokenizer(args.rm))
    cfg, _, layout, groups = init_layout(args.rm, args.tp, args.pp, seed=0)
    chunks, _ = load_reward_model(args.rm, cfg.model, layout, groups)
    scores = score_conversations(chunks, tok, [c for pair in pairs for c in pair], layout,
                                 groups, max_len=args.max_len, micro_batch=args.micro_batch,
                                 add_bos=not args.no_bos)
    if dist.get_rank() != 0:
        return None
    chosen, rejected = scores[0::2], scores[1::2]
    report: dict[str, Any] = {"accuracy": pair_accuracy(chosen, rejected, sources),
                              "settings": vars(args)}
    if args.scores:
        report["scores"] = [{"chosen": c, "rejected": r} for c, r in zip(chosen, rejected,
                                                                         strict=True)]
    return report


def format_accuracy(accuracy: dict[str, dict[str, float]]) -> str:
    """A fixed-width table of :func:`pair_accuracy`'s output, "all" last."""
    keys = [k for k in accuracy if k != "all"] + ["all"]
    lines = [f"{'source':<24} {'n':>7} {'accuracy':>9} {'margin':>9}"]
    lines += [f"{k:<24} {accuracy[k]['n']:>7d} {accuracy[k]['accuracy']:>9.4f} "
              f"{accuracy[k]['margin']:>9.4f}" for k in keys]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    owns_group = start()
    try:
        report = evaluate(args)
    except UserError as err:  # bad rows, paths, a model without a reward head
        print(f"error: {err}", file=sys.stderr)
        return 2
    return finish(report, args.out, owns_group, lambda r: format_accuracy(r["accuracy"]))


if __name__ == "__main__":
    sys.exit(run_command(main, "tulu3.eval_preferences"))
