"""The command-line converters in one process: bit-exact round trips at several layouts and
dtypes, Tülu 3's vocabulary, resharding, and every bad-input error (raised before writing)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from ckpt_testlib import (
    SHAPE,
    TIED,
    TOKENIZER_FILES,
    assert_bit_exact,
    hf_tensors,
    random_hf_dir,
)

from checkpoints_tools import hf_to_megatron, megatron_to_hf, reshard
from tulu3.checkpoint import from_hf
from tulu3.checkpoint.dcp_io import DistReader
from tulu3.checkpoint.errors import ConversionError
from tulu3.checkpoint.format import read_meta


@pytest.fixture(scope="module")
def hf_bf16(tmp_path_factory):
    path = random_hf_dir(tmp_path_factory.mktemp("hf") / "bf16", SHAPE, torch.bfloat16)
    for name, text in TOKENIZER_FILES.items():
        (path / name).write_text(text)
    return path


@pytest.mark.parametrize("shape,layout", [(SHAPE, (2, 2, 1)), (SHAPE, (1, 2, 2)),
                                          (TIED, (2, 1, 1)), (TIED, (1, 2, 2))])
def test_round_trip_bit_exact(tmp_path, monkeypatch, shape, layout):
    monkeypatch.setattr(from_hf, "BLOCK_BYTES", 1000)  # column pieces: many row blocks
    hf = random_hf_dir(tmp_path / "hf", shape, torch.bfloat16, max_shard_bytes=50_000)
    tp, pp, vpp = layout
    hf_to_megatron.convert(hf, tmp_path / "ckpt", tp, pp, vpp, quiet=True)
    meta = read_meta(tmp_path / "ckpt")
    assert (meta.tp, meta.pp, meta.vpp, meta.dtype, meta.shape) == (tp, pp, vpp, "bf16", shape)
    assert meta.padded_vocab == 512 and meta.hf_config["vocab_size"] == 500
    fc1 = DistReader(tmp_path / "ckpt" / "model").tensors["decoder.layers.mlp.linear_fc1.weight"]
    assert len(fc1.chunks) == shape.layers * 2 * tp  # gate and up pieces per TP rank, per layer
    megatron_to_hf.export(tmp_path / "ckpt", tmp_path / "out", quiet=True, max_shard_bytes=40_000)
    assert_bit_exact(hf_tensors(tmp_path / "out"), hf_tensors(hf))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] == shape.tied_embeddings
    assert config["rope_scaling"]["rope_type"] == "llama3"


def test_dtype_conversion_both_ways(tmp_path):
    hf = random_hf_dir(tmp_path / "hf", SHAPE, torch.float32)
    hf_to_megatron.convert(hf, tmp_path / "ckpt", 2, 1, dtype="bf16", quiet=True)
    megatron_to_hf.export(tmp_path / "ckpt", tmp_path / "bf16", quiet=True)
    want = {k: v.to(torch.bfloat16) for k, v in hf_tensors(hf).items()}
    assert_bit_exact(hf_tensors(tmp_path / "bf16"), want)
    megatron_to_hf.export(tmp_path / "ckpt", tmp_path / "fp32", dtype="fp32", quiet=True)
    assert_bit_exact(hf_tensors(tmp_path / "fp32"), {k: v.float() for k, v in want.items()})
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["torch_dtype"] == "float32"


def test_tulu3_vocab_128264_and_tokenizer(tmp_path, hf_bf16):
    shape = dataclasses.replace(SHAPE, layers=1, vocab=128264)
    hf = random_hf_dir(tmp_path / "hf", shape, torch.bfloat16, max_shard_bytes=2**24)
    hf_to_megatron.convert(hf, tmp_path / "ckpt", 2, 1, quiet=True)
    reader = DistReader(tmp_path / "ckpt" / "model")
    assert reader.global_shape("embedding.word_embeddings.weight") == (128512, 64)  # 256 x 502
    notes = megatron_to_hf.export(tmp_path / "ckpt", tmp_path / "out", quiet=True,
                                  tokenizer_dir=hf_bf16)
    assert_bit_exact(hf_tensors(tmp_path / "out"), hf_tensors(hf))
    assert "tokenizer.json" in notes[0]
    assert (tmp_path / "out" / "tokenizer.json").read_text() == TOKENIZER_FILES["tokenizer.json"]


def test_reshard_repads_vocab_and_keeps_weights(tmp_path):
    shape = dataclasses.replace(SHAPE, vocab=300)  # padded 384 at TP 1, 512 at TP 2
    hf = random_hf_dir(tmp_path / "hf", shape, torch.bfloat16)
    hf_to_megatron.convert(hf, tmp_path / "tp1", 1, 1, quiet=True)
    assert reshard.reshard(tmp_path / "tp1", tmp_path / "tp2", 2, 2, quiet=True) == []
    assert reshard.reshard(tmp_path / "tp2", tmp_path / "back", 1, 2, 2, quiet=True) == []
    for name, rows in (("tp1", 384), ("tp2", 512), ("back", 384)):
        reader = DistReader(tmp_path / name / "model")
        assert reader.global_shape("output_layer.weight") == (rows, 64), name
        assert read_meta(tmp_path / name).padded_vocab == rows
        pad = reader.read("output_layer.weight", (300, 0), (rows - 300, 64))
        assert not pad.any(), name  # padding rows are zeros
        megatron_to_hf.export(tmp_path / name, tmp_path / f"hf_{name}", quiet=True)
        assert_bit_exact(hf_tensors(tmp_path / f"hf_{name}"), hf_tensors(hf))
    with pytest.raises(ConversionError, match="--tp=4 does not divide model.kv_heads=2"):
        reshard.reshard(tmp_path / "tp1", tmp_path / "tp4", 4, 1, quiet=True)


UNEVEN = {"account_for_embedding_in_pipeline_split": True,
          "account_for_loss_in_pipeline_split": True}


def test_uneven_pipeline_split_converts_reshards_and_records(tmp_path, hf_bf16):
    """4 layers + embedding + loss = 6 units over PP3 (the trainer's check); recorded in
    tulu3.json; a file without the fields (older checkpoints) reads as an even split."""
    with pytest.raises(ConversionError, match=r"--pp x --vpp = 3 x 1 does not divide "
                       r"model.layers=4$"):
        hf_to_megatron.convert(hf_bf16, tmp_path / "even", 1, 3, quiet=True)
    hf_to_megatron.convert(hf_bf16, tmp_path / "ckpt", 2, 3, quiet=True, **UNEVEN)
    meta = read_meta(tmp_path / "ckpt")
    assert (meta.tp, meta.pp, meta.account_for_embedding_in_pipeline_split,
            meta.account_for_loss_in_pipeline_split) == (2, 3, True, True)
    assert [list(r) for p in range(3) for r in meta.layout().chunk_layer_ranges(4, p)] == \
        [[0], [1, 2], [3]]
    with pytest.raises(ConversionError, match=r"does not divide model.layers=4 \+ 1"):
        reshard.reshard(tmp_path / "ckpt", tmp_path / "bad", 1, 3, quiet=True,
                        account_for_loss_in_pipeline_split=True)
    reshard.reshard(tmp_path / "ckpt", tmp_path / "even", 1, 2, quiet=True)
    assert not read_meta(tmp_path / "even").account_for_loss_in_pipeline_split
    assert reshard.main(["--ckpt", str(tmp_path / "even"), "--out", str(tmp_path / "pp6"),
                         "--pp", "3", "--vpp", "2", "--account-for-embedding-in-pipeline-split",
                         "--account-for-loss-in-pipeline-split", "--quiet"]) == 0
    assert read_meta(tmp_path / "pp6").account_for_embedding_in_pipeline_split
    for name in ("ckpt", "even", "pp6"):
        megatron_to_hf.export(tmp_path / name, tmp_path / f"hf_{name}", quiet=True)
        assert_bit_exact(hf_tensors(tmp_path / f"hf_{name}"), hf_tensors(hf_bf16))
    old = json.loads((tmp_path / "ckpt" / "tulu3.json").read_text())
    for key in UNEVEN:
        del old[key]
    (tmp_path / "ckpt" / "tulu3.json").write_text(json.dumps(old))
    assert read_meta(tmp_path / "ckpt").layout().split_extra == 0


# --- bad input: each error names the problem, and nothing is written -----------------------


def _tamper_config(hf, **changes):
    config = json.loads((hf / "config.json").read_text())
    config.update(changes)
    (hf / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("layout,message", [
    ((3, 1, 1), "--tp=3 does not divide model.heads=4"),
    ((4, 1, 1), "--tp=4 does not divide model.kv_heads=2"),
    ((1, 3, 1), r"--pp x --vpp = 3 x 1 does not divide model.layers=4"),
    ((1, 2, 4), r"--pp x --vpp = 2 x 4 does not divide model.layers=4"),
    ((1, 1, 2), "--vpp=2 needs --pp > 1"),
    ((0, 1, 1), "--tp=0 must be >= 1"),
    ((1, 1, 1, True), r"--account-for-\*-in-pipeline-split needs --pp > 1"),
])
def test_bad_layout(tmp_path, hf_bf16, layout, message):
    tp, pp, vpp, *uneven = layout
    with pytest.raises(ConversionError, match=message):
        hf_to_megatron.convert(hf_bf16, tmp_path / "out", tp, pp, vpp, quiet=True,
                               account_for_loss_in_pipeline_split=bool(uneven))
    assert not (tmp_path / "out").exists()


def test_bad_hf_inputs(tmp_path):
    hf = random_hf_dir(tmp_path / "hf", SHAPE, torch.bfloat16, max_shard_bytes=50_000)
    out = tmp_path / "out"
    _tamper_config(hf, num_hidden_layers=5)
    with pytest.raises(ConversionError, match="'model.layers.4.input_layernorm.weight' is missing"):
        hf_to_megatron.convert(hf, out, 1, 1, quiet=True)
    _tamper_config(hf, num_hidden_layers=4, intermediate_size=256)
    with pytest.raises(ConversionError, match=r"'model.layers.0.mlp.gate_proj.weight' has shape "
                                              r"\[128, 64\], the config.json implies \[256, 64\]"):
        hf_to_megatron.convert(hf, out, 1, 1, quiet=True)
    _tamper_config(hf, intermediate_size=128, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ConversionError, match=r"unknown architecture \['GPT2LMHeadModel'\]"):
        hf_to_megatron.convert(hf, out, 1, 1, quiet=True)
    _tamper_config(hf, architectures=["LlamaForCausalLM"])
    shards = sorted(hf.glob("model-*.safetensors"))
    shards[1].unlink()
    with pytest.raises(ConversionError, match=f"missing safetensors shard.*{shards[1].name}"):
        hf_to_megatron.convert(hf, out, 1, 1, quiet=True)
    assert not out.exists()
    (hf / "config.json").unlink()
    with pytest.raises(ConversionError, match="no config.json"):
        hf_to_megatron.convert(hf, out, 1, 1, quiet=True)


def test_non_empty_output_needs_force(tmp_path, hf_bf16):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ConversionError, match="is not empty .*--force"):
        hf_to_megatron.convert(hf_bf16, out, 1, 1, quiet=True)
    hf_to_megatron.convert(hf_bf16, out, 1, 1, force=True, quiet=True)
    hf_to_megatron.convert(hf_bf16, out, 2, 1, force=True, quiet=True)  # over a checkpoint
    assert read_meta(out).tp == 2 and (out / "keep.txt").is_file()
    with pytest.raises(ConversionError, match="is not empty"):
        megatron_to_hf.export(out, out, quiet=True)


def test_bad_checkpoint_inputs(tmp_path, hf_bf16):
    with pytest.raises(ConversionError, match="no tulu3.json"):
        megatron_to_hf.export(hf_bf16, tmp_path / "out", quiet=True)
    ckpt = tmp_path / "ckpt"
    hf_to_megatron.convert(hf_bf16, ckpt, 1, 1, quiet=True)
    meta = json.loads((ckpt / "tulu3.json").read_text())
    meta["shape"]["ffn_hidden"] = 256
    (ckpt / "tulu3.json").write_text(json.dumps(meta))
    with pytest.raises(ConversionError, match=r"'decoder.layers.mlp.linear_fc1.weight' has global "
                                              r"shape \[4, 256, 64\]; .* implies \[4, 512, 64\]"):
        megatron_to_hf.export(ckpt, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_command_lines(tmp_path, hf_bf16, capsys):
    """``python -m`` entry points: a real run, and errors as exit code 2 + one line."""
    run = subprocess.run([sys.executable, "-m", "checkpoints_tools.hf_to_megatron", "--hf-dir",
                          str(hf_bf16), "--out", str(tmp_path / "ckpt"), "--tp", "2", "--pp", "2"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    assert "wrote" in run.stdout and "B/s" in run.stderr  # tqdm's bytes progress bar
    assert megatron_to_hf.main(["--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"),
                                "--quiet", "--max-shard-size", "100KB"]) == 0
    assert_bit_exact(hf_tensors(tmp_path / "hf"), hf_tensors(hf_bf16))
    assert (tmp_path / "hf" / "tokenizer.json").is_file()  # from the source recorded in tulu3.json
    assert reshard.main(["--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "r"),
                         "--tp", "1", "--quiet"]) == 0
    capsys.readouterr()
    assert hf_to_megatron.main(["--hf-dir", str(hf_bf16), "--out", str(tmp_path / "x"),
                                "--tp", "3", "--quiet"]) == 2
    assert capsys.readouterr().err.startswith("error: --tp=3 does not divide")


def _snapshot(folder) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_failed_conversion_leaves_output_as_it_was(tmp_path, hf_bf16):
    """A source that is corrupt past its metadata (a truncated .distcp / safetensors shard) is
    found only while converting: ``--force`` must not have deleted the old output by then, and a
    failed first conversion must leave no partial ``--out`` (nor a hidden staging folder)."""
    ckpt, export = tmp_path / "ckpt", tmp_path / "export"
    hf_to_megatron.convert(hf_bf16, ckpt, 1, 1, quiet=True)
    megatron_to_hf.export(ckpt, export, quiet=True)
    before = _snapshot(export)
    shard = max((ckpt / "model").glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(BaseException):  # noqa: B017 - torch's DCP errors are BaseExceptions
        megatron_to_hf.export(ckpt, export, force=True, quiet=True)
    assert _snapshot(export) == before
    with pytest.raises(BaseException):  # noqa: B017
        reshard.reshard(ckpt, tmp_path / "resharded", 2, 1, quiet=True)
    broken_hf = tmp_path / "hf"
    broken_hf.mkdir()
    for path in hf_bf16.iterdir():
        data = path.read_bytes()
        (broken_hf / path.name).write_bytes(data[: len(data) - 1000] if path.suffix ==
                                            ".safetensors" else data)
    with pytest.raises(BaseException):  # noqa: B017
        hf_to_megatron.convert(broken_hf, tmp_path / "new", 1, 1, quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "export", "hf"]
