"""Preflight's row scan is skipped only when the SFT tokenization cache holds an intact entry for
exactly the same file contents (tulu3.stages.preflight.cached_scan)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import tulu3.stages.preflight as preflight
from tulu3.config import Config, load_config
from tulu3.data.dataset import build_dataset
from tulu3.data.examples import RowError
from tulu3.data.synthetic import sft_rows
from tulu3.data.tokenizer import load_tokenizer


def _config(tmp_path: Path, tiktoken_path: str, data: Path, *extra: str) -> Config:
    return load_config(None, [f"data.train={data}", f"data.tokenizer={tiktoken_path}",
                              f"data.cache_dir={tmp_path / 'cache'}", "data.max_len=64",
                              f"train.run_dir={tmp_path / 'run'}", *extra])


def _write(path: Path, rows: list) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _fill_cache(cfg: Config, kind: str = "sft") -> None:
    """What the loop does after the model build (tulu3/stages/supervised.py)."""
    data = cfg.data
    build_dataset(kind, data.train, load_tokenizer(data.tokenizer, data.bos, data.eos, data.pad),
                  data.max_len, data.add_bos, data.cache_dir, cfg.train.seed, data.skip_bad_rows)


@pytest.fixture
def scans(monkeypatch) -> list:
    """Counts the row scans preflight runs (scan_data imports scan_rows when called)."""
    import tulu3.data.dataset as dataset

    calls: list = []
    real = dataset.scan_rows

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(dataset, "scan_rows", counted)
    return calls


def test_cache_hit_skips_the_scan_with_the_same_notes(tmp_path, tiktoken_path, scans) -> None:
    data = tmp_path / "sft.jsonl"
    _write(data, sft_rows(40))
    cfg = _config(tmp_path, tiktoken_path, data)
    scanned = preflight.scan_data(cfg, "sft")  # no cache yet: rows read
    assert len(scans) == 1
    _fill_cache(cfg)
    assert preflight.scan_data(cfg, "sft") == scanned == [
        "data.train: 40 rows read, 0 malformed skipped"]
    assert len(scans) == 1  # the second call read no row


def test_changed_content_with_the_same_size_and_mtime_is_scanned(tmp_path, tiktoken_path,
                                                                  scans) -> None:
    """The key hashes contents: a row broken in place (same length, mtime put back) is found."""
    data = tmp_path / "sft.jsonl"
    _write(data, sft_rows(20))
    cfg = _config(tmp_path, tiktoken_path, data)
    _fill_cache(cfg)
    stat = data.stat()
    text = data.read_text()
    broken = text.replace('"assistant"', '"assistanx"', 1)  # an unknown role, same length
    assert len(broken) == len(text) and broken != text
    data.write_text(broken)
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(RowError, match=rf"{data.name}:1: .*role 'assistanx'"):
        preflight.scan_data(cfg, "sft")
    assert len(scans) == 1


@pytest.mark.parametrize("stage, extra", [("dpo", []), ("sft", ["data.skip_bad_rows=true"])])
def test_checks_the_build_does_not_enforce_still_scan(tmp_path, tiktoken_path, scans, stage,
                                                     extra) -> None:
    """DPO's identical-pair check is not the build's; with skip_bad_rows the counts differ."""
    from tulu3.data.synthetic import dpo_rows

    data = tmp_path / f"{stage}.jsonl"
    _write(data, dpo_rows(20) if stage == "dpo" else sft_rows(20))
    cfg = _config(tmp_path, tiktoken_path, data, *extra)
    _fill_cache(cfg, preflight.DATA_KIND[stage])
    preflight.scan_data(cfg, stage)
    assert len(scans) == 1


def test_a_cache_for_other_settings_is_not_used(tmp_path, tiktoken_path, scans) -> None:
    data = tmp_path / "sft.jsonl"
    _write(data, sft_rows(20))
    _fill_cache(_config(tmp_path, tiktoken_path, data, "train.seed=7"))
    preflight.scan_data(_config(tmp_path, tiktoken_path, data, "train.seed=8"), "sft")
    assert len(scans) == 1
