"""``python -m tulu3.rewards score IN.jsonl --out OUT.jsonl [--workers N] [--timeout S]``

Scores rows ``{"dataset", "response", "ground_truth"}`` (an optional ``has_eos``, default true)
with the sandboxed verifiers and writes the same rows plus ``reward``, ``correct``, ``extracted``
and ``reason``, streaming in chunks. Prints a summary per dataset. Rows that cannot be scored
(bad JSON, a missing key, an unknown dataset) are named by line on stderr and left out of OUT;
the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from typing import Any, TextIO

from tqdm import tqdm

from tulu3.config import run_command
from tulu3.data.loading import atomic_output
from tulu3.rewards.base import get_verifier, rlvr_reward
from tulu3.rewards.sandbox import VerifierPool
from tulu3.rewards.summary import format_summary, summarize


def _parse_row(line: str) -> dict[str, Any]:
    """A row ready to score, or ValueError/TypeError saying what is wrong with it."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise TypeError("not a JSON object")
    missing = [k for k in ("dataset", "response", "ground_truth") if k not in row]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    if not isinstance(row["dataset"], str) or not isinstance(row["response"], str):
        raise TypeError("dataset and response must be strings")
    get_verifier(row["dataset"])  # ValueError naming the known datasets
    return row


def _ground_truth(row: dict[str, Any]) -> str:
    """IFEval ground truths sometimes arrive as JSON objects rather than strings."""
    gt = row["ground_truth"]
    return gt if isinstance(gt, str) else json.dumps(gt)


def _chunks(lines: TextIO, size: int, bad: list[str]) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            chunk.append(_parse_row(line))
        except (ValueError, TypeError) as e:
            bad.append(f"line {lineno}: {e}")
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def score_file(args: argparse.Namespace) -> int:
    with open(args.input, encoding="utf-8") as f:
        total = sum(1 for line in f if line.strip())
    bad: list[str] = []
    scored: list[dict[str, Any]] = []  # only the summary fields: rows are streamed out
    # The output is renamed into place at the end, so --out may name the input (or a file another
    # reader uses): it is replaced only by a complete result.
    with open(args.input, encoding="utf-8") as src, atomic_output(args.out) as dst, \
            VerifierPool(workers=args.workers, timeout_s=args.timeout) as pool, \
            tqdm(total=total, unit="row", desc="scoring", file=sys.stderr) as bar:
        for chunk in _chunks(src, args.chunk, bad):
            items = [(r["dataset"], r["response"], _ground_truth(r)) for r in chunk]
            for row, result in zip(chunk, pool.score(items)):
                reward = rlvr_reward(result, bool(row.get("has_eos", True)),
                                     args.correct_reward, args.no_eos_penalty)
                row.update(reward=reward, correct=result.correct, extracted=result.extracted,
                           reason=result.reason)
                dst.write(json.dumps(row, ensure_ascii=False) + "\n")
                scored.append({k: row[k] for k in ("dataset", "correct", "reason", "reward")})
            bar.update(len(chunk))
        bar.update(total - bar.n)  # the bad rows
        stats = pool.stats
    for message in bad:
        print(message, file=sys.stderr)
    print(format_summary(summarize(scored)))
    print(f"pool: {stats.scored} scored, {stats.timeouts} timeouts, {stats.errors} errors, "
          f"{stats.restarts} worker restarts; {len(bad)} bad rows")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tulu3.rewards",
                                     description="Verifiable rewards for RLVR and evaluation.")
    sub = parser.add_subparsers(dest="command", required=True)
    score = sub.add_parser("score", help="score a JSONL file of {dataset, response, ground_truth}")
    score.add_argument("input", help="input JSONL")
    score.add_argument("--out", required=True, help="output JSONL (rows + reward, correct, ...)")
    score.add_argument("--workers", type=int, default=2, help="verifier processes (default 2)")
    score.add_argument("--timeout", type=float, default=5.0, help="seconds per row (default 5)")
    score.add_argument("--chunk", type=int, default=512, help="rows scored per batch")
    score.add_argument("--correct-reward", type=float, default=10.0)
    score.add_argument("--no-eos-penalty", type=float, default=-10.0,
                       help="reward of a row whose has_eos is false")
    args = parser.parse_args(argv)
    return score_file(args)


if __name__ == "__main__":
    sys.exit(run_command(main, "tulu3.rewards"))
