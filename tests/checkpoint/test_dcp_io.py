"""Streaming torch_dist writer/reader: regions across arbitrary chunks, bytes, metadata."""

from __future__ import annotations

import json

import pytest
import torch

from tulu3.checkpoint.dcp_io import DistReader, DistWriter
from tulu3.checkpoint.errors import ConversionError


def test_regions_across_chunks_round_trip(tmp_path):
    full = torch.randn(3, 64, 32, generator=torch.Generator().manual_seed(0))
    writer = DistWriter(tmp_path, file_bytes=20_000)  # several data files
    for layer in range(3):  # each layer cut in 4 row pieces, as megatron at TP 4
        for r in range(4):
            piece = full[layer:layer + 1, 16 * r:16 * r + 16]  # a view: the writer must copy it
            writer.add_chunk("w", (3, 64, 32), (layer, 16 * r, 0), piece)
    writer.add_chunk("norm", (32,), (0,), full[0, 0])
    writer.add_bytes("obj/shard_0_1", b"payload")
    writer.finish()
    assert len(list(tmp_path.glob("__0_*.distcp"))) > 1
    reader = DistReader(tmp_path)
    assert reader.global_shape("w") == (3, 64, 32) and reader.dtype("w") == torch.float32
    assert torch.equal(reader.read("w", (0, 0, 0), (3, 64, 32)), full)
    assert torch.equal(reader.read("w", (1, 10, 2), (2, 20, 3)), full[1:3, 10:30, 2:5])
    assert torch.equal(reader.read("norm", (0,), (32,)), full[0, 0])
    assert reader.read_bytes("obj/shard_0_1") == b"payload"
    assert reader.objects == ["obj/shard_0_1"]
    assert json.loads((tmp_path / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    # A chunk is stored alone (2 KiB + torch.save's ~1.5 KiB), not its view's 24 KiB base.
    sizes = [info.length for index, info in reader.metadata.storage_data.items()
             if index.fqn == "w"]
    assert max(sizes) < 16 * 32 * 4 + 2000


def test_reader_errors(tmp_path):
    with pytest.raises(ConversionError, match="not a megatron torch_dist checkpoint"):
        DistReader(tmp_path)
    writer = DistWriter(tmp_path)
    writer.add_chunk("w", (4, 2), (0, 0), torch.zeros(2, 2))
    writer.finish()
    reader = DistReader(tmp_path)
    with pytest.raises(ConversionError, match="do not cover"):
        reader.read("w", (0, 0), (4, 2))
    with pytest.raises(ConversionError, match="'x' is missing"):
        reader.read("x", (0,), (1,))
    with pytest.raises(ValueError, match="exceeds"):
        DistWriter(tmp_path / "b").add_chunk("w", (2, 2), (1, 0), torch.zeros(2, 2))
