"""The converters' plan (which stored piece lands in which file, which rank reads it), checked
against the files a conversion really writes (tiny model) and, without weights, for Llama 3.1
405B at TP8 x PP16 with megatron's uneven split against megatron's own layer assignment."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from ckpt_testlib import SHAPE, random_hf_dir

from tulu3.checkpoint import from_hf
from tulu3.checkpoint.dcp_io import DistReader
from tulu3.checkpoint.format import check_layout, converter_layout
from tulu3.checkpoint.plan import rank_pieces, write_plan
from tulu3.model.presets import PRESETS

UNEVEN = (True, True)
SIX = dataclasses.replace(SHAPE, layers=6)


def test_plan_is_what_the_converter_writes(tmp_path, monkeypatch):
    """Every stored chunk's key, offsets, sizes and file equal the plan's (small files: the
    payload rolls over into several ``__0_N.distcp``)."""
    monkeypatch.setattr(from_hf, "FILE_BYTES", 40_000)
    hf = random_hf_dir(tmp_path / "hf", SIX, torch.bfloat16)
    from_hf.convert(hf, tmp_path / "ckpt", 2, 4, quiet=True,
                    account_for_embedding_in_pipeline_split=True,
                    account_for_loss_in_pipeline_split=True)
    reader = DistReader(tmp_path / "ckpt" / "model")
    stored = {(key, tuple(c.offsets)): (tuple(c.sizes),
                                        reader.metadata.storage_data[_index(key, c)].relative_path)
              for key, meta in reader.tensors.items() for c in meta.chunks}
    plan = write_plan(SIX, 2, torch.bfloat16, file_bytes=40_000)
    assert {(p.key, p.offsets): (p.sizes, p.file) for p in plan} == stored
    assert len({p.file for p in plan}) > 3


def _index(key, chunk):
    from torch.distributed.checkpoint.metadata import MetadataIndex

    return MetadataIndex(key, chunk.offsets)


def test_tiny_uneven_ranks_read_every_piece_once():
    """6 layers + embedding + loss over PP4: layers 1, 2, 2, 1; every TP-sharded piece is read
    by one rank, every replicated one by both TP ranks of one stage."""
    layout = converter_layout(2, 4, 1, *UNEVEN)
    check_layout(SIX, layout)
    plan = write_plan(SIX, 2, torch.float32)
    readers: dict = {}
    for pp in range(4):
        for tp in range(2):
            for p in rank_pieces(plan, SIX, layout, tp, pp):
                readers.setdefault((p.key, p.offsets), []).append((tp, pp))
    assert len(readers) == len(plan)
    for p in plan:
        ranks = readers[(p.key, p.offsets)]
        assert len(ranks) == (1 if p.tp_index is not None else 2), (p, ranks)
        assert len({pp for _, pp in ranks}) == 1
    layers = [sorted({p.layer for p in rank_pieces(plan, SIX, layout, 0, pp)} - {None})
              for pp in range(4)]
    assert layers == [[0], [1, 2], [3, 4], [5]]


@pytest.mark.parametrize("vpp", [1, 2])
def test_405b_plan_at_tp8_pp16_uneven(vpp):
    """Llama 3.1 405B (126 layers) at TP8 x PP16 (and PP8 x VPP2), embedding and loss counted:
    each rank's layers are megatron's (get_transformer_layer_offset / get_num_layers_to_build on
    the trainer's TransformerConfig), its bytes are its parameters' (a hand count), and the 128
    ranks together read every piece exactly as often as it has TP copies."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from tulu3.config import ModelConfig
    from tulu3.model.build import transformer_config

    shape = PRESETS["llama3.1-405b"]
    pp = 16 // vpp
    layout = converter_layout(8, pp, vpp, *UNEVEN)
    with pytest.raises(Exception, match="does not divide model.layers=126$"):
        check_layout(shape, converter_layout(8, pp, vpp))
    check_layout(shape, layout)
    plan = write_plan(shape, 8, torch.bfloat16)
    h, kv, f, vocab = shape.hidden, shape.kv_heads * shape.head_dim, shape.ffn_hidden, 129024
    per_layer = (h * h + 2 * kv * h + h * h + 3 * f * h + 2 * h) * 2
    assert sum(p.nbytes for p in plan) == 126 * per_layer + (2 * vocab * h + h) * 2
    config = transformer_config(ModelConfig(preset="llama3.1-405b", dtype="bf16"), layout)
    seen: dict = {}
    for pp_rank in range(pp):
        want = []
        for vp in range(vpp):
            stage = vp if vpp > 1 else None
            first = get_transformer_layer_offset(config, vp_stage=stage, pp_rank=pp_rank)
            count = get_num_layers_to_build(config, vp_stage=stage, pp_rank=pp_rank)
            want += range(first, first + count)
        for tp_rank in (0, 7):
            pieces = rank_pieces(plan, shape, layout, tp_rank, pp_rank)
            assert sorted({p.layer for p in pieces} - {None}) == want, pp_rank
            edges = (pp_rank == 0) * vocab * h + (pp_rank == pp - 1) * (vocab * h + h)
            replicated = sum(p.nbytes for p in pieces if p.tp_index is None)
            assert sum(p.nbytes for p in pieces) - replicated == \
                (len(want) * (per_layer - 4 * h) + 2 * edges - 2 * h * (pp_rank == pp - 1)) // 8
        for tp_rank in range(8):
            for p in rank_pieces(plan, shape, layout, tp_rank, pp_rank):
                seen[(p.key, p.offsets)] = seen.get((p.key, p.offsets), 0) + 1
    assert {k: n for k, n in seen.items()} == \
        {(p.key, p.offsets): 8 if p.tp_index is None else 1 for p in plan}
    assert 180 < len({p.file for p in plan}) < 200  # ~812 GB in 4 GiB files


def test_hf_to_megatron_plan_reads_only_the_config(tmp_path, capsys):
    """``hf_to_megatron --plan`` on a directory holding only 405B's config.json: one line per
    pipeline rank (megatron's uneven split), nothing written; the even split is refused."""
    import json

    from checkpoints_tools import hf_to_megatron
    from tulu3.checkpoint.hf_config import hf_config_for

    shape = PRESETS["llama3.1-405b"]
    (tmp_path / "config.json").write_text(json.dumps(hf_config_for(shape, "bfloat16")))
    args = ["--hf-dir", str(tmp_path), "--out", str(tmp_path / "out"), "--tp", "8", "--pp", "16",
            "--plan"]
    flags = ["--account-for-embedding-in-pipeline-split", "--account-for-loss-in-pipeline-split"]
    assert hf_to_megatron.main(args + flags) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("PP rank 0: layers 0-6; 5.69 GiB per TP rank")
    assert lines[15].startswith("PP rank 15: layers 119-125;")
    assert lines[16].startswith("5309 pieces, 756.0 GiB in 185 files")
    assert not (tmp_path / "out").exists()
    assert hf_to_megatron.main(args) == 2
    assert "does not divide model.layers=126" in capsys.readouterr().err
