"""Lazy safetensors reader and planned sharded writer, checked against the safetensors library."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tulu3.checkpoint.errors import ConversionError
from tulu3.checkpoint.hf_io import (
    INDEX_FILE,
    HFReader,
    ShardedSafetensorsWriter,
    TensorSpec,
)


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"a": torch.randn(7, 5, generator=gen).to(torch.bfloat16),
            "b": torch.randn(300, generator=gen),
            "c": torch.randn(4, 3, 2, generator=gen).to(torch.float16),
            "d": torch.randint(0, 100, (9,), generator=gen)}


def test_writer_shards_and_safetensors_reads_them(tmp_path):
    tensors = _tensors()
    seen = []
    writer = ShardedSafetensorsWriter(tmp_path, [TensorSpec(n, tuple(t.shape), t.dtype)
                                                 for n, t in tensors.items()],
                                      max_shard_bytes=1000, on_write=seen.append)
    for name in ["c", "a", "d", "b"]:  # any order
        writer.write(name, tensors[name])
    writer.close()
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in tensors.values())
    assert len(set(index["weight_map"].values())) == 3  # b (1200 bytes) gets a shard of its own
    from ckpt_testlib import assert_bit_exact, hf_tensors

    assert_bit_exact(hf_tensors(tmp_path), tensors)
    assert sum(seen) == index["metadata"]["total_size"]


def test_writer_rejects_wrong_tensor_and_missing_write(tmp_path):
    writer = ShardedSafetensorsWriter(tmp_path, [TensorSpec("a", (2, 2), torch.float32),
                                                 TensorSpec("b", (2,), torch.float32)])
    with pytest.raises(ValueError, match="a: got"):
        writer.write("a", torch.zeros(2, 3))
    with pytest.raises(KeyError):
        writer.write("zz", torch.zeros(2))
    writer.write("a", torch.zeros(2, 2))
    with pytest.raises(RuntimeError, match="never written.*'b'"):
        writer.close()


def test_reader_rows_and_dtype_conversion(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "model.safetensors")
    reader = HFReader(tmp_path)
    assert reader.entry("c").shape == (4, 3, 2)
    for name, tensor in tensors.items():
        assert torch.equal(reader.read(name), tensor)
    assert torch.equal(reader.read_rows("a", 2, torch.empty(3, 5, dtype=torch.bfloat16)),
                       tensors["a"][2:5])
    assert torch.equal(reader.read_rows("b", 100, torch.empty(50)), tensors["b"][100:150])
    assert torch.equal(reader.read("a", torch.float32), tensors["a"].float())
    with pytest.raises(ConversionError, match="'nope' is missing"):
        reader.read("nope")
    reader.close()


def test_reader_reports_missing_shard_and_misindexed_tensor(tmp_path):
    tensors = _tensors()
    save_file({"a": tensors["a"]}, tmp_path / "s1.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ConversionError, match=r"missing safetensors shard.*s2\.safetensors"):
        HFReader(tmp_path)
    save_file({"c": tensors["c"]}, tmp_path / "s2.safetensors")
    with pytest.raises(ConversionError, match="'b' listed in .* is not in this shard"):
        HFReader(tmp_path)
    (tmp_path / INDEX_FILE).unlink()
    with pytest.raises(ConversionError, match="no model.safetensors.index.json"):
        HFReader(tmp_path)
