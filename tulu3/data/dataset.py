"""Tokenized SFT / DPO / RLVR datasets, built once from a source or mixture and cached.

``build_dataset("sft", "data/train.jsonl", tok, max_len=4096, cache_dir="runs/cache")`` reads the
rows, validates and tokenizes them (a progress bar if asked), and saves the result under a key
made of the files' content hash, the tokenizer's name, the template, add_bos, max_len, the mixture
and the seed. A restart or another rank with the same key reads the arrays back (memory-mapped)
instead.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tulu3.config import UserError
from tulu3.data.cache import Ragged, cache_key, fingerprint_files, get_or_build
from tulu3.data.chat_template import TEMPLATE_NAME
from tulu3.data.examples import (
    IGNORE,
    DPOExample,
    RLVRPrompt,
    RowError,
    SFTExample,
    check_row,
    sft_arrays,
    tokenize_dpo,
    tokenize_rlvr,
)
from tulu3.data.loading import data_files, load_mixture, parse_mixture
from tulu3.data.tokenizer import Tokenizer

KINDS = ("sft", "dpo", "rlvr")
log = logging.getLogger(__name__)


class SFTDataset:
    """Token ids and a trained-token mask per example; ``ds[i]`` is an :class:`SFTExample`."""

    def __init__(self, arrays: dict[str, np.ndarray], meta: dict):
        self.tokens = Ragged.from_arrays(arrays, "tokens")
        self.trained = Ragged.from_arrays(arrays, "trained")
        self.meta = meta

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> SFTExample:
        ids = self.tokens[i].tolist()
        labels = np.where(self.trained[i] > 0, self.tokens[i], IGNORE).tolist()
        return SFTExample(ids, labels, index=int(i))

    def lengths(self) -> np.ndarray:
        """int64 [n] tokens per example."""
        return self.tokens.lengths()


class DPODataset:
    """Prompt, chosen and rejected ids per pair; ``ds[i]`` is a :class:`DPOExample`."""

    def __init__(self, arrays: dict[str, np.ndarray], meta: dict):
        self.prompt = Ragged.from_arrays(arrays, "prompt")
        self.chosen = Ragged.from_arrays(arrays, "chosen")
        self.rejected = Ragged.from_arrays(arrays, "rejected")
        self.meta = meta

    def __len__(self) -> int:
        return len(self.prompt)

    def __getitem__(self, i: int) -> DPOExample:
        return DPOExample(self.prompt[i].tolist(), self.chosen[i].tolist(),
                          self.rejected[i].tolist(), index=int(i))

    def lengths(self) -> np.ndarray:
        """int64 [n, 2]: tokens of (prompt + chosen, prompt + rejected) per pair."""
        prompt = self.prompt.lengths()
        return np.stack([prompt + self.chosen.lengths(), prompt + self.rejected.lengths()], 1)


class RLVRDataset:
    """Generation prompts with ground truth; ``ds[i]`` is an :class:`RLVRPrompt`."""

    def __init__(self, arrays: dict[str, np.ndarray], meta: dict):
        self.prompts = Ragged.from_arrays(arrays, "prompt")
        self.records = meta["records"]
        self.meta = meta

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> RLVRPrompt:
        record = self.records[i]
        return RLVRPrompt(self.prompts[i].tolist(), record["ground_truth"], record["dataset"],
                          record["messages"], index=int(i))

    def lengths(self) -> np.ndarray:
        return self.prompts.lengths()


DATASETS = {"sft": SFTDataset, "dpo": DPODataset, "rlvr": RLVRDataset}


def build_dataset(kind: str, source: object, tok: Tokenizer, max_len: int, add_bos: bool = True,
                  cache_dir: str | Path | None = None, seed: int = 0,
                  skip_bad_rows: bool = False, progress: bool = False
                  ) -> SFTDataset | DPODataset | RLVRDataset:
    """Read ``source`` (path or mixture), tokenize for ``kind`` ("sft" | "dpo" | "rlvr"), cache.

    ``max_len`` is the sequence budget (SFT, DPO: prompt + reply) or the prompt budget (RLVR).
    ``meta["stats"]`` counts rows read, kept, dropped by truncation and skipped as bad, and
    ``meta["cache_hit"]`` says whether this call tokenized anything.
    """
    key, settings, sources = dataset_key(kind, source, tok.name, max_len, add_bos, seed,
                                         skip_bad_rows)

    def build() -> tuple[dict[str, np.ndarray], dict]:
        stats: Counter = Counter()
        rows = load_mixture(source, seed, skip_bad_rows, stats)
        arrays, extra = _TOKENIZE[kind](rows, tok, max_len, add_bos, skip_bad_rows, stats,
                                        progress)
        stats["rows_read"] = len(rows)
        return arrays, {**settings, **extra, "sources": sources, "stats": dict(stats)}

    arrays, meta, hit = get_or_build(cache_dir, key, build)
    dataset = DATASETS[kind](arrays, {**meta, "cache_hit": hit, "cache_key": key})
    _report_dropped(kind, source, meta.get("stats", {}), len(dataset), max_len)
    return dataset


def dataset_key(kind: str, source: object, tokenizer_name: str, max_len: int, add_bos: bool,
                seed: int, skip_bad_rows: bool) -> tuple[str, dict, list[dict]]:
    """(cache key, settings, sources) of :func:`build_dataset`'s entry: the sources carry a
    sha256 of their files' contents, so the key changes whenever a row could."""
    if kind not in KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {KINDS}")
    sources = [{"path": s.path, "fraction": s.fraction, "count": s.count,
                "files": fingerprint_files(data_files(s.path))} for s in parse_mixture(source)]
    settings = {"kind": kind, "tokenizer": tokenizer_name, "template": TEMPLATE_NAME,
                "add_bos": add_bos, "max_len": max_len, "seed": seed,
                "skip_bad_rows": skip_bad_rows}
    return cache_key({**settings, "sources": sources}), settings, sources


def _report_dropped(kind: str, source: object, stats: dict, kept: int, max_len: int) -> None:
    """Log the rows dropped and why; a data set with nothing left is a one-line error."""
    dropped = {k: v for k, v in sorted(stats.items())
               if (k.startswith("dropped_") or k == "bad_rows") and v}
    reasons = ", ".join(f"{v} {k.removeprefix('dropped_').replace('_', ' ')}"
                        for k, v in dropped.items()) or "none dropped"
    if kept == 0:
        raise UserError(f"{kind} data {source}: no usable example: {stats.get('rows_read', 0)} "
                        f"rows read, dropped: {reasons} (data.max_len={max_len}); raise "
                        "data.max_len or fix the data")
    if dropped:
        log.info(f"{kind} data {source}: {stats.get('rows_read', 0)} rows read, {kept} kept; "
                 f"dropped: {reasons}")


def _examples(rows: list, tokenize: Callable, tok: Tokenizer, max_len: int, add_bos: bool,
              skip_bad_rows: bool, stats: Counter, progress: bool, desc: str) -> list:
    from tqdm import tqdm

    out = []
    for row, where in tqdm(rows, desc=desc, disable=not progress, unit="row"):
        try:
            example = tokenize(row, tok, max_len, add_bos, where=where, stats=stats)
        except RowError:
            if not skip_bad_rows:
                raise
            stats["bad_rows"] += 1
            continue
        if example is not None:
            out.append(example)
    stats["examples"] = len(out)
    return out


def _tokenize_sft(rows, tok, max_len, add_bos, skip, stats, progress):
    examples = _examples(rows, sft_arrays, tok, max_len, add_bos, skip, stats, progress,
                         "tokenizing sft")
    tokens = Ragged.from_lists([ids for ids, _ in examples])
    trained = Ragged.from_lists([mask for _, mask in examples], dtype=np.uint8)
    return {**tokens.arrays("tokens"), **trained.arrays("trained")}, {}


def _tokenize_dpo(rows, tok, max_len, add_bos, skip, stats, progress):
    pairs = _examples(rows, tokenize_dpo, tok, max_len, add_bos, skip, stats, progress,
                      "tokenizing dpo")
    arrays = {}
    for name in ("prompt", "chosen", "rejected"):
        arrays.update(Ragged.from_lists([getattr(p, f"{name}_ids") for p in pairs]).arrays(name))
    return arrays, {}


def _tokenize_rlvr(rows, tok, max_len, add_bos, skip, stats, progress):
    prompts = _examples(rows, tokenize_rlvr, tok, max_len, add_bos, skip, stats, progress,
                        "tokenizing rlvr")
    records = [{"ground_truth": p.ground_truth, "dataset": p.dataset, "messages": p.messages}
               for p in prompts]
    return Ragged.from_lists([p.prompt_ids for p in prompts]).arrays("prompt"), \
        {"records": records}


_TOKENIZE = {"sft": _tokenize_sft, "dpo": _tokenize_dpo, "rlvr": _tokenize_rlvr}


def scan_rows(kind: str, source: object, seed: int = 0, skip_bad_rows: bool = False,
              verifiers: list[str] | None = None) -> Counter:
    """Read every row of ``source`` and check its schema for ``kind`` without tokenizing: the
    pre-flight of ``tulu3.train`` (before any model is built). RLVR rows must name one of
    ``verifiers`` (case-insensitive) when given. Returns counts: ``rows_read``, ``bad_rows``
    (skipped when ``skip_bad_rows``) and ``rows_ok``; raises :class:`RowError` with file:line."""
    stats: Counter = Counter()
    rows = load_mixture(source, seed, skip_bad_rows, stats)
    stats["rows_read"] = len(rows) + stats["bad_rows"]  # rows of bad JSON were skipped already
    known = {name.lower() for name in verifiers or ()}
    for row, where in rows:
        try:
            name = check_row(kind, row, where)
            if verifiers is not None and name is not None and name.lower() not in known:
                raise RowError(where, f"no verifier for dataset {name!r}; registered: "
                                      f"{', '.join(sorted(verifiers))}")
        except RowError:
            if not skip_bad_rows:
                raise
            stats["bad_rows"] += 1
            continue
        stats["rows_ok"] += 1
        if kind == "dpo" and row["chosen"][-1] == row["rejected"][-1]:  # type: ignore[index]
            stats["identical_pairs"] += 1  # nothing to learn: the DPO loop skips them
    return stats
