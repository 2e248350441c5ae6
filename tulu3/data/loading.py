"""Reading rows: JSONL, JSON, Parquet, directories, saved HF datasets, Hugging Face hub
datasets from the local cache; mixtures of sources.

Every row comes with ``where`` ("file:line" for JSON text, "file:row N" for Parquet / HF datasets),
so a bad row anywhere is reported by location. Mixtures follow open-instruct's dataset mixer: a list
of ``{path, fraction | count}``; ``fraction`` takes that share of a source's rows, ``count`` that
many rows (more rows than the source has repeats it), chosen with a fixed seed.
"""

from __future__ import annotations

import bisect
import gzip
import json
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from tulu3.data.examples import RowError
from tulu3.fileio import atomic_open

TEXT_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
SUFFIXES = TEXT_SUFFIXES + (".parquet",)
HUB_PREFIX = "hf:"
"""A source ``hf:REPO[@CONFIG][:SPLIT]`` names a Hugging Face hub dataset (see :class:`HubId`)."""


@dataclass(frozen=True)
class HubId:
    """``hf:allenai/tulu-3-sft-mixture`` (split train), ``hf:allenai/tulu-3-sft-mixture:test``,
    ``hf:openai/gsm8k@main:test`` (config ``main``). Read with ``datasets`` from its local cache
    only (``HF_DATASETS_CACHE``, default ~/.cache/huggingface/datasets): tulu3 never downloads;
    fetch it once beforehand with ``datasets.load_dataset(REPO, CONFIG)`` on a machine online."""

    repo: str
    config: str | None = None
    split: str = "train"

    @classmethod
    def parse(cls, text: str) -> HubId:
        body = text[len(HUB_PREFIX):]
        repo, _, split = body.partition(":")
        repo, _, config = repo.partition("@")
        if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo) or (_ and not config) or \
                ":" in split:
            raise ValueError(f"{text}: not a hub dataset id (expected hf:OWNER/NAME[@CONFIG]"
                             "[:SPLIT], e.g. hf:allenai/tulu-3-sft-mixture:train)")
        return cls(repo, config or None, split or "train")

    def __str__(self) -> str:
        return (f"{HUB_PREFIX}{self.repo}" + (f"@{self.config}" if self.config else "")
                + f":{self.split}")


def is_hub_id(source: str | Path) -> bool:
    return isinstance(source, str) and source.startswith(HUB_PREFIX)


def load_hub_dataset(text: str):  # -> datasets.Dataset
    """The split ``text`` names, from the local ``datasets`` cache (offline: no network)."""
    hub = HubId.parse(text)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{hub}: reading hub datasets needs the 'datasets' package "
                         "(pip install 'tulu3[data]')") from None
    datasets.config.HF_HUB_OFFLINE = True  # if it was imported before the variables were set
    try:
        return datasets.load_dataset(hub.repo, hub.config, split=hub.split)
    except Exception as err:  # noqa: BLE001 - datasets raises many kinds; one line names the id
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise FileNotFoundError(
            f"{hub}: not in the local datasets cache ({datasets.config.HF_DATASETS_CACHE}) "
            f"and tulu3 reads the hub offline: download it first with "
            f"datasets.load_dataset({hub.repo!r}, {hub.config!r}) where there is network "
            f"({type(err).__name__}: {first})") from None


def is_hf_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file()
                                 for name in ("dataset_dict.json", "state.json"))


def data_files(path: str | Path) -> list[Path]:
    """The files a source reads (a saved HF dataset: all its files; a hub dataset: its cached
    Arrow files), sorted; for fingerprints."""
    if is_hub_id(path):
        return sorted(Path(f["filename"]) for f in load_hub_dataset(str(path)).cache_files)
    path = Path(path)
    if path.is_file():
        return [path]
    if is_hf_saved_dataset(path):
        return sorted(p for p in path.rglob("*") if p.is_file())
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))
        if not files:
            raise FileNotFoundError(f"{path}: no {', '.join(SUFFIXES)} files in this directory")
        return files
    raise FileNotFoundError(f"data source not found: {path}")


def read_rows(path: str | Path, skip_bad_rows: bool = False,
              stats: Counter | None = None) -> Iterator[tuple[object, str]]:
    """Yield ``(row, where)`` for every row of a file or directory.

    Unparseable JSON raises :class:`RowError` naming file and line, or is skipped and counted in
    ``stats["bad_rows"]`` when ``skip_bad_rows``.
    """
    if is_hub_id(path):
        for i, row in enumerate(load_hub_dataset(str(path)), start=1):
            yield row, f"{path}:row {i}"
        return
    path = Path(path)
    if is_hf_saved_dataset(path):
        yield from _read_hf_saved(path)
        return
    for file in data_files(path):
        if file.name.endswith(".parquet"):
            yield from _read_parquet(file)
        elif file.name.endswith(TEXT_SUFFIXES):
            yield from _read_json_text(file, skip_bad_rows, stats)
        else:
            raise ValueError(f"{file}: unsupported format (use one of {', '.join(SUFFIXES)})")


def _read_text(file: Path) -> str:
    opener = gzip.open if file.name.endswith(".gz") else open
    with opener(file, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:  # name the line: the decoder only knows a byte offset
        line = raw.count(b"\n", 0, err.start) + 1
        raise RowError(f"{file}:{line}", f"not UTF-8 text (byte {err.start}: "
                       f"{raw[err.start:err.start + 1]!r}); convert the file to UTF-8") from None


def _read_json_text(file: Path, skip_bad_rows: bool,
                    stats: Counter | None) -> Iterator[tuple[object, str]]:
    """A JSON array (rows located by the line their object starts on) or JSON lines (whatever the
    suffix: many ``.json`` files on the HF hub hold JSON lines)."""
    text = _read_text(file)
    if text.lstrip().startswith("["):
        yield from _read_json_array(file, text)
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{file}:{lineno}"
        try:
            yield json.loads(line), where
        except json.JSONDecodeError as err:
            if not skip_bad_rows:
                raise RowError(where, f"bad JSON ({err.msg} at column {err.colno})") from None
            if stats is not None:
                stats["bad_rows"] += 1


def _read_json_array(file: Path, text: str) -> Iterator[tuple[object, str]]:
    newlines = [m.start() for m in re.finditer("\n", text)]
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1

    def where(at: int) -> str:
        return f"{file}:{bisect.bisect_right(newlines, at - 1) + 1}"

    while True:
        pos = _skip_space(text, pos)
        if pos < len(text) and text[pos] == "]":
            return
        begin = pos
        try:
            row, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise RowError(where(err.pos), f"bad JSON ({err.msg})") from None
        yield row, where(begin)
        pos = _skip_space(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos >= len(text) or text[pos] != "]":
            raise RowError(where(pos), "bad JSON (expected ',' or ']' in the array)")


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _read_parquet(file: Path) -> Iterator[tuple[object, str]]:
    import pyarrow.parquet as pq

    for i, row in enumerate(pq.read_table(file).to_pylist(), start=1):
        yield row, f"{file}:row {i}"


def _read_hf_saved(path: Path) -> Iterator[tuple[object, str]]:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{path} is a saved HF dataset: pip install datasets") from None
    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise ValueError(f"{path}: a DatasetDict without a 'train' split "
                             f"(splits: {list(data)}); point at one split's directory")
        data = data["train"]
    for i, row in enumerate(data, start=1):
        yield row, f"{path}:row {i}"


@dataclass(frozen=True)
class Source:
    """One entry of a mixture: a path and either a fraction of its rows or a count."""

    path: str
    fraction: float | None = None
    count: int | None = None

    def take(self, available: int) -> int:
        if self.count is not None:
            return self.count
        return round((1.0 if self.fraction is None else self.fraction) * available)


def parse_mixture(spec: object) -> list[Source]:
    """A path, a list of paths / ``{path, fraction | count}``, or open-instruct's ``{path: value}``
    (value <= 1: fraction, else count) -> sources."""
    if isinstance(spec, (str, Path)):
        return [Source(str(spec))]
    if isinstance(spec, dict) and "path" not in spec:
        return [Source(p, fraction=float(v)) if v <= 1 else Source(p, count=int(v))
                for p, v in spec.items()]
    if isinstance(spec, dict):
        spec = [spec]
    if not isinstance(spec, Sequence):
        raise TypeError(f"bad data source {spec!r}: a path or a list of {{path, fraction|count}}")
    return [_parse_entry(entry) for entry in spec]


def _parse_entry(entry: object) -> Source:
    if isinstance(entry, (str, Path)):
        return Source(str(entry))
    if not isinstance(entry, dict) or "path" not in entry:
        raise ValueError(f"bad mixture entry {entry!r}: expected {{path, fraction | count}}")
    unknown = set(entry) - {"path", "fraction", "count"}
    if unknown or ("fraction" in entry and "count" in entry):
        raise ValueError(f"bad mixture entry {entry!r}: give path and one of fraction / count")
    fraction, count = entry.get("fraction"), entry.get("count")
    if fraction is not None and not float(fraction) > 0:
        raise ValueError(f"mixture entry {entry['path']}: fraction must be > 0")
    if count is not None and int(count) < 1:
        raise ValueError(f"mixture entry {entry['path']}: count must be >= 1")
    return Source(str(entry["path"]), None if fraction is None else float(fraction),
                  None if count is None else int(count))


def select_rows(available: int, take: int, seed: int, source_index: int) -> np.ndarray:
    """``take`` row indices out of ``available``: all of them in order, or a seeded sample (whole
    shuffled copies first when upsampling), returned in file order."""
    if take == available:
        return np.arange(available)
    rng = np.random.default_rng([seed, source_index])
    copies = [rng.permutation(available) for _ in range(-(-take // max(available, 1)))]
    return np.sort(np.concatenate(copies)[:take]) if copies else np.zeros(0, dtype=np.int64)


def load_mixture(spec: object, seed: int = 0, skip_bad_rows: bool = False,
                 stats: Counter | None = None) -> list[tuple[object, str]]:
    """All rows of a mixture, source by source, as ``(row, where)``."""
    rows: list[tuple[object, str]] = []
    for k, source in enumerate(parse_mixture(spec)):
        source_rows = list(read_rows(source.path, skip_bad_rows, stats))
        if not source_rows:
            raise RowError(str(source.path), "no rows")
        picked = select_rows(len(source_rows), source.take(len(source_rows)), seed, k)
        rows.extend(source_rows[i] for i in picked)
    return rows


@contextmanager
def atomic_output(path: str | Path) -> Iterator[TextIO]:
    """A UTF-8 text file written under a temporary name beside ``path`` and renamed onto it only
    when the block succeeds: a reader never sees half a file, a failure (or Ctrl-C) leaves
    ``path`` as it was, and writing a file onto its own input reads the old file to the end
    (:func:`tulu3.fileio.atomic_open`)."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        yield f


def write_jsonl(rows: Sequence[object], path: str | Path) -> str:
    """Write rows as JSON lines, atomically (see :func:`atomic_output`)."""
    with atomic_output(path) as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return str(path)
