"""Reading JSONL / JSON / Parquet / directories / saved HF datasets, mixtures, and the cache."""

from __future__ import annotations

import gzip
import json
from collections import Counter

import numpy as np
import pytest

import tulu3.data.dataset as dataset_module
from tulu3.data import synthetic
from tulu3.data.dataset import build_dataset
from tulu3.data.examples import tokenize_dpo, tokenize_rlvr, tokenize_sft
from tulu3.data.loading import load_mixture, parse_mixture, read_rows, write_jsonl
from tulu3.data.tokenizer import load_tokenizer

ROWS = synthetic.sft_rows(20, seed=3)


def _contents(pairs):
    return [row for row, _ in pairs]


def test_formats_give_the_same_rows(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    write_jsonl(ROWS, tmp_path / "a.jsonl")
    (tmp_path / "b.json").write_text(json.dumps(ROWS, indent=2))
    (tmp_path / "c.json").write_text("\n".join(json.dumps(r) for r in ROWS))  # JSON lines
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in ROWS))
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "e.parquet")
    for name in ("a.jsonl", "b.json", "c.json", "d.jsonl.gz", "e.parquet"):
        assert _contents(read_rows(tmp_path / name)) == ROWS, name
    assert _contents(read_rows(tmp_path)) == ROWS * 5  # a directory: its files in sorted order
    wheres = [w for _, w in read_rows(tmp_path / "b.json")]
    assert wheres[0] == f"{tmp_path / 'b.json'}:2" and wheres[1].startswith(f"{tmp_path}/b.json:")
    assert [w for _, w in read_rows(tmp_path / "e.parquet")][4] == f"{tmp_path / 'e.parquet'}:row 5"


def test_hf_saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    assert _contents(read_rows(tmp_path / "ds")) == ROWS
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:3])}).save_to_disk(
        str(tmp_path / "dd"))
    assert _contents(read_rows(tmp_path / "dd")) == ROWS[:3]


def test_bad_json_skip_and_count(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{oops\n\n" + json.dumps(ROWS[1]) + "\n")
    stats = Counter()
    assert _contents(read_rows(path, skip_bad_rows=True, stats=stats)) == ROWS[:2]
    assert stats["bad_rows"] == 1
    assert [w for _, w in read_rows(path, skip_bad_rows=True)] == [f"{path}:1", f"{path}:4"]


def test_mixtures(tmp_path):
    a = [{"messages": [{"role": "user", "content": f"a{i}"}]} for i in range(10)]
    b = [{"messages": [{"role": "user", "content": f"b{i}"}]} for i in range(4)]
    pa, pb = write_jsonl(a, tmp_path / "a.jsonl"), write_jsonl(b, tmp_path / "b.jsonl")
    spec = [{"path": pa, "fraction": 0.5}, {"path": pb, "count": 6}]
    rows = _contents(load_mixture(spec, seed=1))
    from_a = [r for r in rows if r["messages"][0]["content"][0] == "a"]
    from_b = [r for r in rows if r["messages"][0]["content"][0] == "b"]
    assert len(from_a) == 5 and len({json.dumps(r) for r in from_a}) == 5
    assert len(from_b) == 6 and all(r in from_b for r in b)  # upsampled: every row, then more
    assert _contents(load_mixture(spec, seed=1)) == rows
    assert _contents(load_mixture(spec, seed=2)) != rows
    assert _contents(load_mixture(pa)) == a
    assert parse_mixture({pa: 0.5, pb: 3})[1].count == 3  # open-instruct's dataset_mixer form
    with pytest.raises(ValueError, match="one of fraction / count"):
        parse_mixture([{"path": pa, "fraction": 0.5, "count": 2}])
    with pytest.raises(ValueError, match="count must be >= 1"):
        parse_mixture([{"path": pa, "count": 0}])


def test_sft_dataset_matches_direct_tokenization(tok, tmp_path):
    path = write_jsonl(ROWS, tmp_path / "sft.jsonl")
    ds = build_dataset("sft", path, tok, max_len=64)
    assert len(ds) == len(ROWS) and ds.meta["stats"]["examples"] == len(ROWS)
    for i in (0, 7, 19):
        ex = ds[i]
        ref = tokenize_sft(ROWS[i], tok, 64)
        assert (ex.input_ids, ex.labels, ex.index) == (ref.input_ids, ref.labels, i)
    assert ds.lengths().tolist() == [len(tokenize_sft(r, tok, 64).input_ids) for r in ROWS]


def test_dpo_and_rlvr_datasets(tok, tmp_path):
    dpo_rows, rlvr_rows = synthetic.dpo_rows(8), synthetic.rlvr_rows(8)
    dpo = build_dataset("dpo", write_jsonl(dpo_rows, tmp_path / "d.jsonl"), tok, max_len=64)
    ref = tokenize_dpo(dpo_rows[3], tok, 64)
    got = dpo[3]
    assert (got.prompt_ids, got.chosen_ids, got.rejected_ids) == \
        (ref.prompt_ids, ref.chosen_ids, ref.rejected_ids)
    assert dpo.lengths()[3].tolist() == [len(ref.prompt_ids) + len(ref.chosen_ids),
                                         len(ref.prompt_ids) + len(ref.rejected_ids)]
    rlvr = build_dataset("rlvr", write_jsonl(rlvr_rows, tmp_path / "r.jsonl"), tok, max_len=64)
    ref = tokenize_rlvr(rlvr_rows[5], tok, 64)
    assert rlvr[5].prompt_ids == ref.prompt_ids
    assert (rlvr[5].ground_truth, rlvr[5].dataset) == (rlvr_rows[5]["ground_truth"], "gsm8k")


def test_cache_reuse_and_invalidation(tok, tiktoken_path, tmp_path, monkeypatch):
    path = write_jsonl(ROWS, tmp_path / "sft.jsonl")
    cache = tmp_path / "cache"
    first = build_dataset("sft", path, tok, max_len=64, cache_dir=cache, progress=True)
    assert not first.meta["cache_hit"]
    entries = [p for p in cache.iterdir() if p.is_dir()]
    assert len(entries) == 1 and not any(p.name.startswith(".") for p in entries)

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again despite a cache entry")

    monkeypatch.setitem(dataset_module._TOKENIZE, "sft", no_tokenizing)
    again = build_dataset("sft", path, tok, max_len=64, cache_dir=cache)
    assert again.meta["cache_hit"] and again.meta["cache_key"] == first.meta["cache_key"]
    assert isinstance(again.tokens.values, np.memmap)
    assert all(again[i].labels == first[i].labels for i in range(len(ROWS)))
    # Anything that changes the ids changes the key: max_len, tokenizer, template flag, content.
    for kwargs in ({"max_len": 32}, {"add_bos": False}):
        with pytest.raises(AssertionError, match="tokenized again"):
            build_dataset("sft", path, tok, cache_dir=cache, **{"max_len": 64, **kwargs})
    with pytest.raises(AssertionError, match="tokenized again"):
        build_dataset("sft", path, load_tokenizer(tiktoken_path, eos="<|eot_id|>"), 64,
                      cache_dir=cache)
    write_jsonl(ROWS[:-1], path)
    with pytest.raises(AssertionError, match="tokenized again"):
        build_dataset("sft", path, tok, 64, cache_dir=cache)


def _build_in_child(args):
    path, tiktoken_path, cache = args
    tok = load_tokenizer(tiktoken_path)
    return build_dataset("sft", path, tok, max_len=64, cache_dir=cache).meta["cache_hit"]


def test_concurrent_builders_tokenize_once(tiktoken_path, tmp_path):
    """Several ranks starting together: one builds under the lock, the others read its entry."""
    import multiprocessing as mp

    path = write_jsonl(synthetic.sft_rows(300), tmp_path / "sft.jsonl")
    with mp.get_context("fork").Pool(3) as pool:
        hits = pool.map(_build_in_child, [(path, tiktoken_path, str(tmp_path / "c"))] * 3)
    assert sorted(hits) == [False, True, True]
    assert len([p for p in (tmp_path / "c").iterdir() if p.is_dir()]) == 1


def _hub_cache(tmp_path, monkeypatch, repo: str, splits: dict[str, list]) -> None:
    """A ``datasets`` cache holding ``repo`` as a hub download leaves it
    (CACHE/OWNER___NAME/default/0.0.0/HASH/{dataset_info.json, *.arrow}), built offline."""
    datasets = pytest.importorskip("datasets")
    from datasets.packaged_modules.json.json import Json

    cache = tmp_path / "hf-cache"
    files = {}
    for split, rows in splits.items():
        files[split] = str(write_jsonl(rows, tmp_path / f"{split}.jsonl"))
    name = repo.replace("/", "___")
    Json(cache_dir=str(cache), dataset_name=name, config_name="default", hash="0123abcd",
         data_files=files).download_and_prepare()
    (built,) = (cache / name).iterdir()  # default-<hash of the local files>
    built.rename(cache / name / "default")
    for arrow in (cache / name).rglob("*.arrow"):  # a hub download's names: NAME-SPLIT.arrow
        arrow.rename(arrow.with_name(arrow.name.replace(f"{name}-", f"{repo.split('/')[1]}-")))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))


def test_hub_dataset_from_the_local_cache(tmp_path, monkeypatch):
    from tulu3.data.loading import HubId, data_files

    _hub_cache(tmp_path, monkeypatch, "someone/tiny-sft", {"train": ROWS[:7], "test": ROWS[7:]})
    assert _contents(read_rows("hf:someone/tiny-sft")) == ROWS[:7]
    assert _contents(read_rows("hf:someone/tiny-sft:test")) == ROWS[7:]
    wheres = [w for _, w in read_rows("hf:someone/tiny-sft:test")]
    assert wheres[1] == "hf:someone/tiny-sft:test:row 2"
    mixture = [{"path": "hf:someone/tiny-sft", "count": 3}, {"path": "hf:someone/tiny-sft:test"}]
    assert len(load_mixture(mixture)) == 3 + len(ROWS) - 7
    assert all(f.suffix == ".arrow" for f in data_files("hf:someone/tiny-sft"))
    assert HubId.parse("hf:openai/gsm8k@main:test") == HubId("openai/gsm8k", "main", "test")
    for bad in ("hf:", "hf:a/b/c", "hf:a/b@:x", "hf:a/b:x:y"):
        with pytest.raises(ValueError, match="not a hub dataset id"):
            HubId.parse(bad)
    # Not cached (and no network): one line naming the id, the cache and how to fetch it.
    with pytest.raises(FileNotFoundError) as err:
        list(read_rows("hf:allenai/not-downloaded:train"))
    message = str(err.value)
    assert "\n" not in message and "hf:allenai/not-downloaded:train" in message, message
    assert "load_dataset('allenai/not-downloaded'" in message, message
