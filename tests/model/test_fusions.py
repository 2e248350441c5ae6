"""model.fused (tulu3/model/fusions.py): what each setting turns on, and the torch spec's fused
model (Triton RMSNorm, SwiGLU, RoPE) training like the unfused one.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET, set before any kernel is
defined); ``auto`` never picks the interpreter, ``all`` does.
"""

import os

import torch

from kernels.testing import triton_device

triton_device()

import pytest  # noqa: E402
from parity_harness import run_layout  # noqa: E402

from tulu3.config import ConfigError, load_config  # noqa: E402
from tulu3.model import fusions  # noqa: E402
from tulu3.testing import run_distributed_test  # noqa: E402

UNFUSED = dict(bias_activation_fusion=False, bias_dropout_fusion=False,
               masked_softmax_fusion=False, persist_layer_norm=False, apply_rope_fusion=False,
               gradient_accumulation_fusion=False)
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU decisions")


def test_none_is_unfused_everywhere() -> None:
    for spec in ("torch", "te", "local"):
        cfg = load_config(None, [f"model.spec={spec}", "model.fused=none"]).model
        assert fusions.decide(cfg) == fusions.Fusions(False, UNFUSED)


@CPU_ONLY
def test_auto_on_cpu_is_unfused_even_with_the_interpreter() -> None:
    assert os.environ["TRITON_INTERPRET"] == "1"
    for spec in ("torch", "te"):
        cfg = load_config(None, [f"model.spec={spec}"]).model
        assert cfg.fused == "auto" and fusions.decide(cfg) == fusions.Fusions(False, UNFUSED)


@CPU_ONLY
def test_all_needs_kernels(monkeypatch) -> None:
    cfg = load_config(None, ["model.fused=all"]).model
    assert fusions.decide(cfg).kernels  # the interpreter counts for "all"
    assert fusions.decide(cfg).megatron["apply_rope_fusion"]  # the Triton RoPE hook
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="model.fused=all: the torch spec's fused kernels") as e:
        fusions.decide(cfg)
    assert "\n" not in str(e.value)


def _fused_and_unfused() -> dict:
    from megatron.core.models.common.embeddings import rope_utils

    out = {}
    for fused in ("none", "all"):
        result = run_layout(1, [f"model.fused={fused}"], steps=1, global_batch=2)
        out[fused] = {"loss": result["loss"], "grads": result["grads"]}
    # What the fused run built: the hook megatron's RoPE calls, and the norm class.
    from kernels.rope_triton import triton_rope

    out["rope_hook"] = rope_utils.fused_apply_rotary_pos_emb is triton_rope
    return out


def test_fused_spec_uses_the_kernels() -> None:
    from tulu3.model.build import transformer_config
    from tulu3.model.norm import FusedRMSNorm, RMSNorm
    from tulu3.model.specs import layer_spec
    from tulu3.parallel.layout import make_layout

    for fused, norm, mlp in (("all", FusedRMSNorm, fusions.FusedSwiGLUMLP),
                             ("none", RMSNorm, None)):
        cfg = load_config(None, [f"model.fused={fused}", "model.fp8=current"])
        config = transformer_config(cfg.model, make_layout(cfg, 1))
        block = layer_spec("torch", config, None, cfg.model, pp_rank=0)
        assert block.layer_norm is norm
        for layer in block.layer_specs:  # fused and FP8 compose
            assert layer.submodules.input_layernorm is norm
            assert mlp is None or layer.submodules.mlp.module is mlp
            assert layer.submodules.mlp.submodules.linear_fc1.module.__name__.startswith("FP8")


@pytest.mark.distributed
def test_fused_model_equals_unfused() -> None:
    """fp32, same weights and batch: loss and every gradient agree within the kernels' fp32
    bound (8 h 2^-24 per fused op, h = 64) times the fused ops on the path (3 per layer, 4
    layers, + the final norm)."""
    r = run_distributed_test(_fused_and_unfused, 1)[0]
    assert r["rope_hook"]
    rtol = 8 * 64 * 2.0 ** -24 * (3 * 4 + 1)
    (loss_a,), (loss_b,) = r["none"]["loss"], r["all"]["loss"]
    assert abs(loss_a - loss_b) <= rtol * abs(loss_a)
    for name, grad in r["none"]["grads"].items():
        scale = float(grad.abs().max())
        assert float((grad - r["all"]["grads"][name]).abs().max()) <= rtol * scale, name
