"""config.json <-> LlamaShape: both rope styles, Tülu 3's vocab, errors, export config."""

from __future__ import annotations

import dataclasses

import pytest
from ckpt_testlib import SHAPE, TIED

from tulu3.checkpoint.errors import ConversionError
from tulu3.checkpoint.hf_config import (
    LLAMA31_ROPE,
    hf_config_for,
    rope_warning,
    shape_from_hf_config,
)

LLAMA31_8B = {  # config.json of the released Llama 3.1 8B / Tülu 3 8B (vocab 128264)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "vocab_size": 128264, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "max_position_embeddings": 131072, "tie_word_embeddings": False, "bos_token_id": 128000,
    "eos_token_id": 128001, "torch_dtype": "bfloat16"}


def test_tulu3_released_config_is_accepted():
    shape = shape_from_hf_config(LLAMA31_8B)
    assert (shape.vocab, shape.kv_heads, shape.rope_scaling, shape.head_dim) == (128264, 8, True,
                                                                                 128)
    assert rope_warning(LLAMA31_8B) is None


def test_transformers5_rope_parameters_style():
    cfg = {k: v for k, v in LLAMA31_8B.items() if k not in ("rope_theta", "rope_scaling")}
    cfg["rope_parameters"] = {**LLAMA31_8B["rope_scaling"], "rope_theta": 500000.0}
    assert shape_from_hf_config(cfg) == shape_from_hf_config(LLAMA31_8B)
    plain = {**cfg, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    assert shape_from_hf_config(plain).rope_scaling is False
    assert shape_from_hf_config(plain).rope_theta == 10000.0


def test_unknown_architecture_and_other_rope_are_reported():
    with pytest.raises(ConversionError, match=r"unknown architecture \['MistralForCausalLM'\]"):
        shape_from_hf_config({**LLAMA31_8B, "architectures": ["MistralForCausalLM"]})
    llama32 = {**LLAMA31_8B, "rope_scaling": {**LLAMA31_8B["rope_scaling"], "factor": 32.0}}
    assert "factor': 32.0" in rope_warning(llama32)


def test_export_config_round_trips_shape_and_rope():
    for shape in (SHAPE, TIED, dataclasses.replace(SHAPE, rope_scaling=False)):
        cfg = hf_config_for(shape, "float32")
        assert shape_from_hf_config(cfg) == shape
        assert cfg["rope_scaling"] == (LLAMA31_ROPE if shape.rope_scaling else None)
    kept = hf_config_for(shape_from_hf_config(LLAMA31_8B), "bfloat16", base=LLAMA31_8B)
    assert kept["rope_scaling"] == LLAMA31_8B["rope_scaling"]
    assert (kept["bos_token_id"], kept["eos_token_id"]) == (128000, 128001)
