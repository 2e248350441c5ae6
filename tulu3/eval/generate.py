"""``python -m tulu3.eval --ckpt D --data F.jsonl``: generate with a policy, score with verifiers.

    python -m tulu3.eval --ckpt runs/tiny/rlvr/checkpoints/step_20 --data runs/tiny/data/eval.jsonl
    torchrun --nproc-per-node 4 -m tulu3.eval --ckpt D --data F.jsonl --tp 2 --pp 2 \\
        --samples 8 --temperature 1.0 --out report.json

``--ckpt`` is a tulu3 checkpoint (``RUN_DIR/checkpoints/step_N``) or an HF model directory; the
model is built at ``--tp`` x ``--pp`` (the rest of the world is data parallel: each replica takes
every dp-th prompt) with the ``torch`` spec and generated with the rollout engine
(tulu3/rollout/). Rows are Tülu 3 RLVR rows (``messages``, ``ground_truth``, ``dataset``).
Each prompt gets ``--samples`` K responses (greedy when K is 1 and no ``--temperature`` is
given, else temperature 1), scored by :class:`tulu3.rewards.VerifierPool`, and with
``--reward-model RM`` also by a reward model (a tulu3 RM checkpoint, a run directory or an HF
LlamaForSequenceClassification; tulu3/stages/rm/score.py), built at the same TP x PP after the
policy is freed: each row gets ``rm_score``, the conversation (prompt turns + response) rendered
with the chat template as in RM training.

The JSON report: ``summary`` (per dataset and "all": n, correct, accuracy over all samples,
timeouts, errors, mean_reward), ``pass_at_k`` (per dataset, unbiased pass@k for k = 1, 2, 4, ...
up to K), ``samples`` (the first ``--show`` generations), ``settings``, and with a reward model
``reward_model`` (path; mean and std of ``rm_score`` per dataset and "all"). Printed as a table too.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from tulu3.config import run_command
from tulu3.eval.common import check_paths, default_tokenizer, finish, init_layout, start
from tulu3.rewards import VerifierPool, VerifyResult, rlvr_reward
from tulu3.rewards.summary import format_summary, pass_at_k_by_dataset, summarize

if TYPE_CHECKING:
    from tulu3.model.presets import LlamaShape
    from tulu3.parallel.groups import ProcessGroups
    from tulu3.parallel.layout import ParallelLayout


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tulu3.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="tulu3 checkpoint or HF model directory")
    parser.add_argument("--data", required=True, help="RLVR-format JSONL (or any data.train "
                        "source)")
    parser.add_argument("--tokenizer", help="default: the checkpoint's (tulu3.json) or --ckpt")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--samples", type=int, default=1, help="responses per prompt (K)")
    parser.add_argument("--temperature", type=float, help="default 0 (greedy) when --samples "
                        "is 1, else 1.0")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-prompt-len", type=int, default=4096)
    parser.add_argument("--limit", type=int, help="evaluate only the first N prompts")
    parser.add_argument("--batch-size", type=int, help="rows per generation batch (default all)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--no-bos", action="store_true", help="prompts without bos "
                        "(open-instruct's Tülu 3 runs)")
    parser.add_argument("--workers", type=int, default=2, help="verifier processes")
    parser.add_argument("--timeout-s", type=float, default=5.0, help="verifier time limit")
    parser.add_argument("--reward-model", help="also score every response with this reward "
                        "model (tulu3 RM checkpoint, run dir or HF LlamaForSequenceClassification)")
    parser.add_argument("--show", type=int, default=8, help="generations kept in the report")
    parser.add_argument("--out", help="write the JSON report here")
    args = parser.parse_args(argv)
    if args.temperature is None:
        args.temperature = 0.0 if args.samples == 1 else 1.0
    return args


def build_policy(ckpt: str, tp: int, pp: int, seed: int
                 ) -> tuple[list, LlamaShape, ParallelLayout, ProcessGroups]:
    """(chunks, shape, layout, groups) of the checkpoint at TP x PP on the current world."""
    from tulu3.checkpoint.load import load_into_chunks
    from tulu3.model.build import build_model_chunks

    cfg, shape, layout, groups = init_layout(ckpt, tp, pp, seed)
    chunks = build_model_chunks(cfg.model, layout, groups)
    load_into_chunks(ckpt, chunks, shape, groups)
    return chunks, shape, layout, groups


def evaluate(args: argparse.Namespace) -> dict[str, Any] | None:
    """Generate, score and (on rank 0) return the report; other ranks return None."""
    from tulu3.data.dataset import build_dataset, scan_rows
    from tulu3.data.tokenizer import load_tokenizer
    from tulu3.rewards import registered_datasets
    from tulu3.rollout import PipelineComm, SamplingParams, generate

    # every input checked before the model is built: paths, rows (file:line), verifiers
    check_paths({"--ckpt": args.ckpt, "--data": args.data, "--tokenizer": args.tokenizer,
                 "--reward-model": args.reward_model})
    scan_rows("rlvr", args.data, verifiers=registered_datasets())
    tok = load_tokenizer(args.tokenizer or default_tokenizer(args.ckpt))
    if args.reward_model:
        from tulu3.stages.rm.score import check_reward_head

        check_reward_head(args.reward_model, "--reward-model")
    chunks, shape, layout, groups = build_policy(args.ckpt, args.tp, args.pp, args.seed)
    dataset = build_dataset("rlvr", args.data, tok, args.max_prompt_len, not args.no_bos)
    count = min(len(dataset), args.limit or len(dataset))
    mine = [dataset[i] for i in range(groups.dp_rank, count, groups.dp_size)]
    k = args.samples
    params = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    started = time.monotonic()
    results = generate(chunks, [p.prompt_ids for p in mine for _ in range(k)], params,
                       shape.vocab, [tok.eos_id], batch_size=args.batch_size,
                       keys=[p.index * k + j for p in mine for j in range(k)],
                       comm=PipelineComm.from_groups(groups))
    gen_s = time.monotonic() - started
    rows = []
    if dist.get_rank() == groups.mp_first:
        texts = [tok.decode([t for t in r.tokens if t != tok.eos_id]) for r in results]
        items = [(mine[i // k].dataset, text, mine[i // k].ground_truth)
                 for i, text in enumerate(texts)]
        with VerifierPool(args.workers, args.timeout_s) as pool:
            verdicts = pool.score(items)
        rows = [_row(mine[i // k], i % k, texts[i], results[i], verdicts[i])
                for i in range(len(results))]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (rows, gen_s, sum(len(r.tokens) for r in results)))
    rows = sorted((r for part, _, _ in gathered for r in part),
                  key=lambda r: (r["index"], r["sample"]))
    if args.reward_model:
        del chunks, results  # the policy's memory goes back before the reward model is built
        _add_reward_model_scores(args, rows, tok, layout, groups)
    for row in rows:
        del row["messages"]
    if dist.get_rank() != 0:
        return None
    tokens = sum(t for _, _, t in gathered) / (args.tp * args.pp)
    return _report(args, rows, tokens / max(g for _, g, _ in gathered))


def _add_reward_model_scores(args: argparse.Namespace, rows: list[dict], tok: Any,
                             layout: ParallelLayout, groups: ProcessGroups) -> None:
    """``row["rm_score"]`` for every row (collective: every rank holds all rows)."""
    from tulu3.stages.rm.score import score_with_reward_model

    conversations = [[*row["messages"], {"role": "assistant", "content": row["response"]}]
                     for row in rows]
    scores = score_with_reward_model(args.reward_model, tok, conversations, layout, groups,
                                     max_len=args.max_prompt_len + args.max_new_tokens + 16,
                                     add_bos=not args.no_bos)
    for row, score in zip(rows, scores, strict=True):
        row["rm_score"] = score


def _row(prompt: Any, sample: int, text: str, result: Any, verdict: VerifyResult) -> dict:
    return {"index": prompt.index, "sample": sample, "dataset": prompt.dataset,
            "prompt": prompt.messages[-1]["content"] if prompt.messages else "",
            "messages": prompt.messages,
            "ground_truth": prompt.ground_truth, "response": text,
            "has_eos": result.has_eos, "correct": verdict.correct,
            "extracted": verdict.extracted, "reason": verdict.reason,
            "reward": rlvr_reward(verdict, result.has_eos)}


def _report(args: argparse.Namespace, rows: list[dict], tokens_per_s: float) -> dict[str, Any]:
    by_prompt: dict[int, tuple[str, list[bool]]] = {}
    for row in rows:
        by_prompt.setdefault(row["index"], (row["dataset"], []))[1].append(row["correct"])
    ks = [2 ** i for i in range(args.samples.bit_length()) if 2 ** i <= args.samples]
    if args.samples not in ks:
        ks.append(args.samples)
    report = {"summary": summarize(rows),
              "pass_at_k": pass_at_k_by_dataset(by_prompt.values(), ks),
              "no_eos": sum(not r["has_eos"] for r in rows) / max(len(rows), 1),
              "gen_tokens_per_s": tokens_per_s, "samples": rows[:args.show],
              "settings": {k: v for k, v in vars(args).items()}}
    if args.reward_model:
        report["reward_model"] = {"path": args.reward_model, **_score_stats(rows)}
    return report


def _score_stats(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Mean and std of ``rm_score`` per dataset (lower-cased) and "all"."""
    groups: dict[str, list[float]] = {}
    for row in rows:
        for key in (str(row["dataset"]).lower(), "all"):
            groups.setdefault(key, []).append(row["rm_score"])
    return {key: {"n": len(v), "mean": statistics.fmean(v), "std": statistics.pstdev(v)}
            for key, v in groups.items()}


def format_report(report: dict[str, Any]) -> str:
    """The summary table, pass@k per dataset and, with a reward model, its mean scores."""
    lines = [format_summary(report["summary"])]
    for dataset, values in sorted(report["pass_at_k"].items()):
        lines.append(f"{dataset:<12} " + "  ".join(f"{k} {v:.4f}" for k, v in values.items()))
    for dataset, stats in sorted(report.get("reward_model", {}).items()):
        if dataset != "path":
            lines.append(f"{dataset:<12} reward model score {stats['mean']:.4f} "
                         f"(std {stats['std']:.4f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    owns_group = start()
    return finish(evaluate(args), args.out, owns_group, format_report)


if __name__ == "__main__":
    sys.exit(run_command(main, "tulu3.eval"))
