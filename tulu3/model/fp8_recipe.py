"""FP8 recipe keys (``model.fp8*``): checked when the config is loaded, mapped to megatron.

Transformer Engine's recipes (``model.spec=te``) reach megatron's TransformerConfig fields
``fp8`` (format), ``fp8_recipe``, ``fp8_margin``, ``fp8_amax_history_len``,
``fp8_amax_compute_algo``, ``fp8_param``, ``first_last_layers_bf16`` and
``num_layers_at_start/end_in_bf16``. :func:`check_fp8` refuses, in one line naming the keys,
every combination megatron-core 0.16.1's ``TransformerConfig.__post_init__`` and
``fp8_utils.get_fp8_recipe`` refuse (so no megatron exception at build time), plus keys that
would be silently ignored. The ``torch`` spec runs current scaling itself (tulu3/model/fp8.py).
No torch import: this runs before anything expensive.
"""

from __future__ import annotations

from typing import Any

from tulu3.config import ConfigError, ModelConfig
from tulu3.model.presets import resolve_shape

TE_RECIPES = {"current": "tensorwise", "tensorwise": "tensorwise", "delayed": "delayed",
              "blockwise": "blockwise", "mxfp8": "mxfp8"}
"""model.fp8 -> TransformerConfig.fp8_recipe ("current" is the older name of tensorwise)."""

TE_MIN_VERSION = {"tensorwise": "2.2.0.dev0", "blockwise": "2.3.0.dev0", "mxfp8": "2.1.0",
                  "delayed": "1.0"}
"""The Transformer Engine each recipe needs (megatron.core.fp8_utils.get_fp8_recipe)."""

_DELAYED_ONLY = (("fp8_amax_history_len", 1), ("fp8_amax_algo", "most_recent"),
                 ("fp8_margin", 0))


def check_fp8(cfg: ModelConfig, pp: int = 1) -> None:
    """Raise ConfigError (one line) for an FP8 combination that cannot run or would be ignored.

    ``pp``: pipeline-parallel size (megatron allows at most layers / pp BF16 edge layers).
    """
    if cfg.fp8 == "none":
        if cfg.fp8_param:
            raise ConfigError("model.fp8_param=true needs an FP8 recipe (model.fp8 is none)")
        return
    if cfg.spec == "local":
        raise ConfigError(f"model.fp8={cfg.fp8}: the local spec has no FP8 linears; use "
                          "model.spec=torch (current scaling) or model.spec=te")
    for key, default in _DELAYED_ONLY:
        if getattr(cfg, key) != default and cfg.fp8 != "delayed":
            raise ConfigError(f"model.{key}={getattr(cfg, key)!r} applies only to "
                              f"model.fp8=delayed (model.fp8={cfg.fp8} ignores it)")
    if cfg.spec == "torch":
        _check_torch_spec(cfg)
    elif cfg.fp8_granularity != "tensorwise":
        raise ConfigError(f"model.fp8_granularity={cfg.fp8_granularity} is for model.spec=torch; "
                          "with model.spec=te choose the scaling by model.fp8 (e.g. blockwise)")
    if cfg.fp8_bf16_edges:
        _check_edges(cfg, pp)


def _check_torch_spec(cfg: ModelConfig) -> None:
    if TE_RECIPES[cfg.fp8] != "tensorwise":
        raise ConfigError(f"model.fp8={cfg.fp8} needs model.spec=te (Transformer Engine); "
                          "model.spec=torch does model.fp8=current only")
    if cfg.fp8_param:
        raise ConfigError("model.fp8_param=true needs model.spec=te (Transformer Engine keeps "
                          "the FP8 weights); model.spec=torch casts BF16/FP32 weights per step")
    # torch's CUDA row-wise kernel is e4m3 x e4m3 -> bf16 (f8f8bf16_rowwise); torchao's rowwise
    # recipe is all-e4m3 for the same reason. The CPU kernel would accept more: refuse it here.
    if cfg.fp8_granularity == "rowwise" and (cfg.fp8_format != "e4m3" or cfg.dtype != "bf16"):
        raise ConfigError("model.fp8_granularity=rowwise needs model.fp8_format=e4m3 and "
                          f"model.dtype=bf16 (got {cfg.fp8_format}, {cfg.dtype})")


def _check_edges(cfg: ModelConfig, pp: int) -> None:
    if cfg.fp8 == "delayed":
        # TransformerConfig.__post_init__: "Delayed scaling does not support first / last
        # layer in BF16."
        raise ConfigError("model.fp8_bf16_edges=true does not work with model.fp8=delayed "
                          "(megatron refuses it); use model.fp8=tensorwise or blockwise")
    per_stage = resolve_shape(cfg).layers // pp
    for key in ("fp8_bf16_first_layers", "fp8_bf16_last_layers"):
        if getattr(cfg, key) > per_stage:
            raise ConfigError(f"model.{key}={getattr(cfg, key)} exceeds the layers per pipeline "
                              f"stage ({per_stage}); megatron allows 0..{per_stage}")


def bf16_layer(cfg: ModelConfig, layer: int, num_layers: int) -> bool:
    """Whether global layer ``layer`` (0-based) stays BF16: megatron's is_first_last_bf16_layer."""
    if cfg.fp8 == "none" or not cfg.fp8_bf16_edges:
        return False
    return layer < cfg.fp8_bf16_first_layers or layer >= num_layers - cfg.fp8_bf16_last_layers


def te_fp8_args(cfg: ModelConfig) -> dict[str, Any]:
    """TransformerConfig keyword arguments for ``model.spec=te`` ({} when FP8 is off)."""
    if cfg.fp8 == "none" or cfg.spec != "te":
        return {}
    return dict(
        fp8=cfg.fp8_format,
        fp8_recipe=TE_RECIPES[cfg.fp8],
        fp8_margin=cfg.fp8_margin,
        fp8_amax_history_len=cfg.fp8_amax_history_len,
        fp8_amax_compute_algo=cfg.fp8_amax_algo,
        fp8_param=cfg.fp8_param,
        first_last_layers_bf16=cfg.fp8_bf16_edges,
        num_layers_at_start_in_bf16=cfg.fp8_bf16_first_layers,
        num_layers_at_end_in_bf16=cfg.fp8_bf16_last_layers,
    )


def check_te_version(cfg: ModelConfig, te_version: str) -> None:
    """Refuse a recipe the installed Transformer Engine lacks (megatron would fail mid-build)."""
    from packaging.version import Version

    need = TE_MIN_VERSION[TE_RECIPES[cfg.fp8]]
    if Version(te_version) < Version(need):
        raise ConfigError(f"model.fp8={cfg.fp8} needs Transformer Engine >= {need} "
                          f"(installed: {te_version})")
