"""Aggregate verifier results: accuracy per dataset and the unbiased pass@k estimator.

Shared by the ``score`` CLI and ``tulu3.eval`` (which adds generation on top).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from math import comb
from typing import Any

__all__ = ["format_summary", "pass_at_k", "pass_at_k_by_dataset", "summarize"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of ``k`` samples drawn without replacement from ``n``
    (of which ``c`` are correct) is correct: ``1 - C(n-c, k) / C(n, k)`` (Chen et al., 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def pass_at_k_by_dataset(groups: Iterable[tuple[str, Sequence[bool]]], ks: Sequence[int]
                         ) -> dict[str, dict[str, float]]:
    """Mean pass@k over prompts, per dataset (lower-cased) and "all".

    Args:
        groups: one ``(dataset, [correct of each sample])`` per prompt.
        ks: the k values; a k larger than a prompt's sample count is skipped for that prompt.
    """
    sums: dict[str, dict[str, list[float]]] = {}
    for dataset, outcomes in groups:
        n, c = len(outcomes), sum(bool(o) for o in outcomes)
        for key in (dataset.lower(), "all"):
            for k in ks:
                if 1 <= k <= n:
                    sums.setdefault(key, {}).setdefault(f"pass@{k}", []).append(pass_at_k(n, c, k))
    return {key: {name: sum(v) / len(v) for name, v in by_k.items()} for key, by_k in sums.items()}


def summarize(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per dataset (lower-cased) and "all": n, correct, accuracy, timeouts, errors, mean_reward.

    Each row needs ``dataset``, ``correct`` and ``reason``; ``reward`` is averaged when present.
    """
    out: dict[str, dict[str, float]] = {}
    for row in rows:
        for key in (str(row["dataset"]).lower(), "all"):
            s = out.setdefault(key, {"n": 0, "correct": 0, "timeouts": 0, "errors": 0,
                                     "reward_sum": 0.0, "rewarded": 0})
            s["n"] += 1
            s["correct"] += bool(row["correct"])
            s["timeouts"] += row["reason"] == "timeout"
            s["errors"] += str(row["reason"]).startswith("error:")
            if row.get("reward") is not None:
                s["reward_sum"] += float(row["reward"])
                s["rewarded"] += 1
    for s in out.values():
        s["accuracy"] = s["correct"] / s["n"]
        s["mean_reward"] = s.pop("reward_sum") / s["rewarded"] if s["rewarded"] else float("nan")
        del s["rewarded"]
    return out


def format_summary(summary: Mapping[str, Mapping[str, float]]) -> str:
    """A fixed-width table of :func:`summarize`'s output, "all" last."""
    keys = sorted(k for k in summary if k != "all") + (["all"] if "all" in summary else [])
    header = (f"{'dataset':<12} {'n':>8} {'accuracy':>9} {'timeouts':>9} {'errors':>7} "
              f"{'mean_reward':>12}")
    lines = [header]
    for k in keys:
        s = summary[k]
        lines.append(f"{k:<12} {s['n']:>8d} {s['accuracy']:>9.4f} {s['timeouts']:>9d} "
                     f"{s['errors']:>7d} {s['mean_reward']:>12.4f}")
    return "\n".join(lines)
