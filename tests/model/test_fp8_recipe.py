"""FP8 recipe keys (tulu3/model/fp8_recipe.py): refused combinations fail at load time in one
line; accepted ones map onto megatron's TransformerConfig, which accepts them (no Transformer
Engine needed to build the config); megatron itself refuses what tulu3 refuses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from tulu3.config import ConfigError, load_config
from tulu3.model.build import transformer_config
from tulu3.parallel.layout import make_layout

RECIPES = Path(__file__).resolve().parents[2] / "launch" / "recipes"
TE = ["model.spec=te", "model.dtype=bf16"]

REFUSED = {
    "delayed with bf16 edges": ([*TE, "model.fp8=delayed", "model.fp8_bf16_edges=true"],
                                "does not work with model.fp8=delayed"),
    "too many bf16 layers for a stage": (
        [*TE, "model.fp8=tensorwise", "model.fp8_bf16_edges=true", "parallel.pp=2",
         "model.fp8_bf16_first_layers=3"], "exceeds the layers per pipeline stage (2)"),
    "fp8_param without fp8": (["model.fp8_param=true"], "needs an FP8 recipe"),
    "history with current scaling": ([*TE, "model.fp8=current", "model.fp8_amax_history_len=16"],
                                     "applies only to model.fp8=delayed"),
    "margin with mxfp8": ([*TE, "model.fp8=mxfp8", "model.fp8_margin=1"],
                          "applies only to model.fp8=delayed"),
    "algo with blockwise": ([*TE, "model.fp8=blockwise", "model.fp8_amax_algo=max"],
                            "applies only to model.fp8=delayed"),
    "delayed on the torch spec": (["model.fp8=delayed"], "needs model.spec=te"),
    "blockwise on the torch spec": (["model.fp8=blockwise"], "needs model.spec=te"),
    "fp8_param on the torch spec": (["model.fp8=current", "model.fp8_param=true"],
                                    "needs model.spec=te"),
    "fp8 on the local spec": (["model.spec=local", "model.fp8=current"], "no FP8 linears"),
    "rowwise with e5m2 gradients": (
        ["model.dtype=bf16", "model.fp8=current", "model.fp8_granularity=rowwise"],
        "needs model.fp8_format=e4m3"),
    "rowwise in fp32": (
        ["model.fp8=current", "model.fp8_granularity=rowwise", "model.fp8_format=e4m3"],
        "needs model.fp8_format=e4m3 and model.dtype=bf16 (got e4m3, fp32)"),
    "rowwise with te": ([*TE, "model.fp8=tensorwise", "model.fp8_granularity=rowwise"],
                        "is for model.spec=torch"),
    "unknown format": (["model.fp8_format=e5m2"], "is not one of"),
    "negative margin": (["model.fp8_margin=-1"], "out of range"),
    "zero history": (["model.fp8_amax_history_len=0"], "out of range"),
}


@pytest.mark.parametrize("overrides, message", REFUSED.values(), ids=REFUSED.keys())
def test_refused_in_one_line(overrides, message) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        load_config(None, overrides)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("args", [
    dict(fp8="hybrid", fp8_recipe="delayed", first_last_layers_bf16=True),
    dict(fp8="hybrid", fp8_recipe="tensorwise", first_last_layers_bf16=True,
         num_layers_at_start_in_bf16=3, pipeline_model_parallel_size=2),
    dict(fp8_param=True),
], ids=["delayed edges", "edge count", "fp8_param alone"])
def test_megatron_refuses_the_same(args) -> None:
    """The refusals above are megatron's own (so they would otherwise fail at build time)."""
    base = dict(num_layers=4, hidden_size=64, num_attention_heads=4, bf16=True,
                params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16)
    with pytest.raises(ValueError):
        TransformerConfig(**{**base, **args})


ACCEPTED = {
    "delayed, history, max, margin, e4m3": (
        ["model.fp8=delayed", "model.fp8_format=e4m3", "model.fp8_amax_history_len=1024",
         "model.fp8_amax_algo=max", "model.fp8_margin=1"],
        dict(fp8="e4m3", fp8_recipe="delayed", fp8_amax_history_len=1024,
             fp8_amax_compute_algo="max", fp8_margin=1, first_last_layers_bf16=False)),
    "current = tensorwise with edges, fp8_param": (
        ["model.fp8=current", "model.fp8_bf16_edges=true", "model.fp8_param=true",
         "model.fp8_bf16_first_layers=2", "model.fp8_bf16_last_layers=0"],
        dict(fp8="hybrid", fp8_recipe="tensorwise", fp8_param=True, first_last_layers_bf16=True,
             num_layers_at_start_in_bf16=2, num_layers_at_end_in_bf16=0)),
    "blockwise": (["model.fp8=blockwise"], dict(fp8="hybrid", fp8_recipe="blockwise")),
    "mxfp8": (["model.fp8=mxfp8", "model.fp8_format=e4m3"],
              dict(fp8="e4m3", fp8_recipe="mxfp8")),
}


@pytest.mark.parametrize("overrides, fields", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_accepted_reach_transformer_config(overrides, fields) -> None:
    cfg = load_config(None, [*TE, *overrides])
    config = transformer_config(cfg.model, make_layout(cfg, 1))
    assert {k: getattr(config, k) for k in fields} == fields


def test_torch_spec_fp8_stays_out_of_megatron() -> None:
    """The torch spec's FP8 is its own linears: megatron's fp8 (TE's autocast) stays off."""
    cfg = load_config(None, ["model.fp8=current", "model.dtype=bf16"])
    assert transformer_config(cfg.model, make_layout(cfg, 1)).fp8 is None


@pytest.mark.parametrize("size", ["8b", "405b"])
def test_fp8_cluster_recipes(size) -> None:
    cfg = load_config(RECIPES / f"llama3.1-{size}-sft-fp8.yaml")
    m = cfg.model
    assert (m.spec, m.fp8, m.fp8_format, m.fp8_bf16_edges, m.fp8_param) == (
        "te", "tensorwise", "hybrid", True, True)
    # The torch spec variant named in the recipe's header loads too.
    load_config(RECIPES / f"llama3.1-{size}-sft-fp8.yaml",
                ["model.spec=torch", "model.fp8_param=false"])
