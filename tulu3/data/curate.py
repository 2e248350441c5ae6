"""Data curation: ``python -m tulu3.curate decontaminate | dedup | mix | stats``.

decontaminate  Tülu 3's rule: an eval instance overlaps a training instance when more than half
               of its words are covered by n-grams (default 8) that occur in that training
               instance. The matching training rows are removed, and each eval set is reported
               with how many of its instances overlap; a set with overlap on more than 2% of its
               instances is flagged as contaminated. Eval n-grams go in a hash index (evals are
               small); every training row is hashed once (numpy rolling hash) and looked up:
               O(total words), no pairwise scans.
dedup          drop exact duplicate rows (same conversation), keeping the first.
mix            write a mixture file from ``PATH:COUNT`` / ``PATH:FRACTION`` sources, fixed seed.
stats          rows, tokens (template tokens with --tokenizer, else words), length histogram PNG.

Text compared: a row's prompt side (system and user turns; a DPO row's shared prompt) by default,
``--train-field all`` for every turn. Eval rows may be chats or have prompt / question / problem /
instruction fields. Words are lower-cased ``\\w+`` runs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tulu3.config import run_command
from tulu3.data.examples import messages_text
from tulu3.data.loading import load_mixture, read_rows, write_jsonl

WORD = re.compile(r"\w+")
EVAL_FIELDS = ("prompt", "question", "problem", "instruction", "input")
_MULT = np.uint64(0x9E3779B97F4A7C15)


def row_text(row: object, field: str = "prompt") -> str:
    """The text of a row to compare: prompt side (system + user turns) or ``all`` turns."""
    if not isinstance(row, dict):
        return ""
    roles = ("system", "user") if field == "prompt" else ("system", "user", "assistant")
    for key in ("messages", "chosen", "rejected"):
        if isinstance(row.get(key), list):
            texts = [messages_text(row[key], roles)]
            if field == "all" and key == "chosen" and isinstance(row.get("rejected"), list):
                texts.append(messages_text(row["rejected"][-1:], roles))
            return "\n".join(texts)
    return "\n".join(row[k] for k in EVAL_FIELDS if isinstance(row.get(k), str))


class NgramHasher:
    """Words -> ids (one shared table) -> 64-bit hashes of every run of ``n`` word ids."""

    def __init__(self, n: int):
        self.n = n
        self.ids: dict[str, int] = {}
        self.powers = np.array([pow(0x100000001B3, k, 1 << 64) for k in range(n)], np.uint64)

    def words(self, text: str) -> np.ndarray:
        table = self.ids
        return np.array([table.setdefault(w, len(table)) for w in WORD.findall(text.lower())],
                        dtype=np.uint64)

    def hashes(self, word_ids: np.ndarray) -> np.ndarray:
        """uint64 [len - n + 1]: hash of the n-gram starting at each word (wrapping arithmetic)."""
        if len(word_ids) < self.n:
            return np.zeros(0, dtype=np.uint64)
        windows = np.lib.stride_tricks.sliding_window_view(word_ids * _MULT + np.uint64(1), self.n)
        return (windows * self.powers).sum(axis=1, dtype=np.uint64)


def decontaminate(train_rows: Sequence[object], evals: dict[str, Sequence[object]], n: int = 8,
                  threshold: float = 0.5, train_field: str = "prompt"
                  ) -> tuple[list[int], dict]:
    """Indices of training rows that overlap any eval instance, and a report per eval set."""
    hasher = NgramHasher(n)
    index: dict[int, list[tuple[int, int]]] = defaultdict(list)  # hash -> [(instance, start)]
    instances: list[tuple[str, int, int]] = []  # (eval set, row, number of words)
    report = {name: {"instances": len(rows), "too_short": 0, "overlapping": 0}
              for name, rows in evals.items()}
    for name, rows in evals.items():
        for i, row in enumerate(rows):
            words = hasher.words(row_text(row))
            if len(words) < n:
                report[name]["too_short"] += 1
            for start, h in enumerate(hasher.hashes(words).tolist()):
                index[h].append((len(instances), start))
            instances.append((name, i, len(words)))
    removed: list[int] = []
    hit_instances: dict[int, list[int]] = defaultdict(list)  # eval instance -> train rows
    for t, row in enumerate(train_rows):
        matched = _overlapping(hasher, index, instances, row_text(row, train_field), threshold)
        if matched:
            removed.append(t)
            for inst in matched:
                hit_instances[inst].append(t)
    for inst, rows in hit_instances.items():
        entry = report[instances[inst][0]]
        entry["overlapping"] += 1
        entry.setdefault("examples", []).append({"eval_row": instances[inst][1],
                                                 "train_rows": rows[:5]})
    for entry in report.values():
        entry["overlap_frac"] = entry["overlapping"] / max(entry["instances"], 1)
        entry["contaminated"] = entry["overlap_frac"] > 0.02
    return removed, {"eval_sets": report, "train_rows": len(train_rows),
                     "removed_rows": len(removed), "n": n, "threshold": threshold}


def _overlapping(hasher: NgramHasher, index: dict, instances: list, text: str,
                 threshold: float) -> list[int]:
    """Eval instances more than ``threshold`` covered by n-grams of this one training text."""
    hashes = set(hasher.hashes(hasher.words(text)).tolist())
    starts: dict[int, list[int]] = defaultdict(list)
    for h in hashes & index.keys():
        for inst, start in index[h]:
            starts[inst].append(start)
    matched = []
    for inst, positions in starts.items():
        covered = np.zeros(instances[inst][2], dtype=bool)
        for start in positions:
            covered[start:start + hasher.n] = True
        if covered.mean() > threshold:
            matched.append(inst)
    return matched


def dedup(rows: Sequence[object]) -> list[int]:
    """Indices of rows to keep: the first of every group of identical conversations."""
    seen, keep = set(), []
    for i, row in enumerate(rows):
        body = row
        if isinstance(row, dict):
            parts = {k: row[k] for k in ("messages", "chosen", "rejected") if k in row}
            body = parts or row
        key = json.dumps(body, sort_keys=True, ensure_ascii=False)
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return keep


def parse_source(text: str) -> dict:
    """``PATH[:COUNT|:FRACTION]`` -> a mixture entry (a value with a '.' is a fraction)."""
    path, _, value = text.rpartition(":")
    if not path or not re.fullmatch(r"\d+(\.\d*)?|\.\d+", value):
        return {"path": text}
    return {"path": path, "fraction": float(value)} if "." in value else \
        {"path": path, "count": int(value)}


def length_stats(rows: Sequence[object], tokenizer: str | None = None, field: str = "all"
                 ) -> tuple[np.ndarray, str]:
    """Per-row lengths: template tokens with a tokenizer (SFT chat / DPO chosen / RLVR prompt), else
    words of the row's text. Returns (lengths, unit)."""
    if tokenizer is None:
        return np.array([len(WORD.findall(row_text(r, field))) for r in rows]), "words"
    from tulu3.data.chat_template import tokenize_conversation
    from tulu3.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    lengths = []
    for row in rows:
        messages = row.get("messages") or row.get("chosen") or []
        prompt_only = "ground_truth" in row
        lengths.append(len(tokenize_conversation(messages, tok,
                                                 add_generation_prompt=prompt_only)[0]))
    return np.array(lengths), "tokens"


def histogram_png(lengths: np.ndarray, unit: str, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(lengths, bins=min(50, max(5, len(set(lengths.tolist())))))
    ax.set_xlabel(f"{unit} per row")
    ax.set_ylabel("rows")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _rows(path: str, skip_bad_rows: bool = False) -> list[object]:
    return [row for row, _ in read_rows(path, skip_bad_rows)]


def _cmd_decontaminate(args: argparse.Namespace) -> dict:
    train = _rows(args.train)
    evals = {Path(p).name: _rows(p) for p in args.eval}
    removed, report = decontaminate(train, evals, args.n, args.threshold, args.train_field)
    drop = set(removed)
    write_jsonl([r for i, r in enumerate(train) if i not in drop], args.out)
    report["out"] = args.out
    return report


def _cmd_dedup(args: argparse.Namespace) -> dict:
    rows = _rows(args.input)
    keep = dedup(rows)
    write_jsonl([rows[i] for i in keep], args.out)
    return {"rows": len(rows), "kept": len(keep), "duplicates": len(rows) - len(keep),
            "out": args.out}


def _cmd_mix(args: argparse.Namespace) -> dict:
    spec = [parse_source(s) for s in args.source]
    rows = [row for row, _ in load_mixture(spec, seed=args.seed)]
    write_jsonl(rows, args.out)
    return {"sources": spec, "rows": len(rows), "seed": args.seed, "out": args.out}


def _cmd_stats(args: argparse.Namespace) -> dict:
    rows = _rows(args.input, skip_bad_rows=True)
    lengths, unit = length_stats(rows, args.tokenizer)
    summary = {"rows": len(rows), "unit": unit, "total": int(lengths.sum())}
    if len(lengths):
        summary.update({"mean": float(lengths.mean()), "max": int(lengths.max()),
                        **{f"p{q}": float(np.percentile(lengths, q)) for q in (50, 90, 99)}})
    if args.max_len:
        summary["over_max_len"] = int((lengths > args.max_len).sum())
    if args.png:
        histogram_png(lengths, unit, args.png, Path(args.input).name)
        summary["png"] = args.png
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tulu3.curate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("decontaminate", help="remove training rows that overlap eval sets")
    p.add_argument("--train", required=True)
    p.add_argument("--eval", required=True, nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=8, help="n-gram size in words (Tülu 3: 8)")
    p.add_argument("--threshold", type=float, default=0.5, help="coverage above which it overlaps")
    p.add_argument("--train-field", choices=("prompt", "all"), default="prompt")
    p.set_defaults(run=_cmd_decontaminate)
    p = sub.add_parser("dedup", help="remove exact duplicate rows")
    p.add_argument("--input", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(run=_cmd_dedup)
    p = sub.add_parser("mix", help="build a mixture file from sources")
    p.add_argument("--source", required=True, nargs="+", help="PATH[:COUNT|:FRACTION]")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_cmd_mix)
    p = sub.add_parser("stats", help="rows, tokens, length histogram")
    p.add_argument("--input", required=True)
    p.add_argument("--tokenizer", default=None, help="count template tokens (default: words)")
    p.add_argument("--max-len", type=int, default=None)
    p.add_argument("--png", default=None, help="write a length histogram here")
    p.set_defaults(run=_cmd_stats)
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    result = args.run(args)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    sys.exit(run_command(main, "tulu3.curate"))
