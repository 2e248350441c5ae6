"""Data faults that must end loudly or heal: a data set with every row dropped (how many were
read and why), a truncated tokenization cache (rebuilt), an empty tokenizer file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tulu3.config import UserError
from tulu3.data.cache import get_or_build
from tulu3.data.dataset import build_dataset, scan_rows
from tulu3.data.loading import write_jsonl
from tulu3.data.tokenizer import load_tokenizer


def test_everything_dropped_says_rows_read_and_why(tok, tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": "word " * 50},
                          {"role": "assistant", "content": "ok"}]}] * 3
    data = write_jsonl(rows, tmp_path / "long.jsonl")
    with pytest.raises(UserError, match=r"no usable example: 3 rows read, dropped: 3 no "
                                        r"trained tokens \(data.max_len=8\)"):
        build_dataset("sft", data, tok, max_len=8)
    assert len(build_dataset("sft", data, tok, max_len=512)) == 3


def test_scan_counts_skipped_rows(tmp_path: Path) -> None:
    good = {"messages": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "yo"}]}
    path = tmp_path / "d.jsonl"
    path.write_text('{"messages": []}\n{bad json\n' + json.dumps(good) + "\n")
    stats = scan_rows("sft", path, skip_bad_rows=True)
    assert (stats["rows_read"], stats["bad_rows"], stats["rows_ok"]) == (3, 2, 1)


def test_truncated_cache_is_rebuilt(tmp_path: Path) -> None:
    calls = []

    def build() -> tuple[dict, dict]:
        calls.append(1)
        return {"tokens": np.arange(1000, dtype=np.int64)}, {"n": 1000}

    arrays, _, hit = get_or_build(tmp_path, "k", build)
    assert not hit and len(calls) == 1
    npy = tmp_path / "k" / "tokens.npy"
    npy.write_bytes(npy.read_bytes()[:500])  # a full disk or an interrupted copy
    arrays, meta, hit = get_or_build(tmp_path, "k", build)
    assert not hit and len(calls) == 2 and meta == {"n": 1000}
    assert np.array_equal(arrays["tokens"], np.arange(1000))
    assert get_or_build(tmp_path, "k", build)[2] and len(calls) == 2  # intact: a hit


def test_empty_tokenizer_file(tmp_path: Path) -> None:
    empty = tmp_path / "tokenizer.model"
    empty.write_text("\n")
    with pytest.raises(UserError, match=rf"{empty}: the tokenizer file is empty"):
        load_tokenizer(str(empty))
