"""``model.load=`` format detection and shape checks (the loading itself runs in
test_parallel_round_trip.py, on gloo ranks)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from ckpt_testlib import SHAPE, random_hf_dir

from checkpoints_tools import hf_to_megatron
from tulu3.checkpoint.errors import ConversionError
from tulu3.checkpoint.load import (
    check_shape,
    checkpoint_shape,
    detect_format,
    load_into_chunks,
    source_hf_configs,
)


def test_detects_both_formats_and_reads_their_shape(tmp_path):
    hf = random_hf_dir(tmp_path / "hf", SHAPE, torch.bfloat16)
    hf_to_megatron.convert(hf, tmp_path / "ckpt", 2, 2, quiet=True)
    assert detect_format(hf) == "hf" and detect_format(tmp_path / "ckpt") == "tulu3"
    assert checkpoint_shape(hf) == SHAPE == checkpoint_shape(tmp_path / "ckpt")
    (hf / "generation_config.json").write_text('{"eos_token_id": 7}')
    hf_to_megatron.convert(hf, tmp_path / "ckpt", 2, 2, force=True, quiet=True)
    assert source_hf_configs(tmp_path / "ckpt") == source_hf_configs(hf)
    assert source_hf_configs(hf)[1] == {"eos_token_id": 7}
    with pytest.raises(ConversionError, match="neither a tulu3 checkpoint"):
        detect_format(tmp_path / "ckpt" / "model")
    with pytest.raises(ConversionError, match="not a directory"):
        detect_format(tmp_path / "nowhere")


def test_shape_mismatch_names_every_field(tmp_path):
    other = dataclasses.replace(SHAPE, vocab=128264, layers=2, max_seq_len=8192)
    with pytest.raises(ConversionError) as err:
        check_shape(SHAPE, other, "X")
    message = str(err.value)
    assert "vocab: checkpoint 500 vs model 128264" in message
    assert "layers: checkpoint 4 vs model 2" in message
    assert "max_seq_len" not in message  # changes no weight
    hf = random_hf_dir(tmp_path / "hf", SHAPE, torch.bfloat16)
    with pytest.raises(ConversionError, match="does not match the model"):  # before any loading
        load_into_chunks(hf, [], other, None)  # type: ignore[arg-type]  # raises first
