"""Generation refuses what it cannot do right (tulu3/rollout/engine.py check_generation_spec):
TE attention (it ignores the left-padding mask). Context parallelism is accepted: generation
runs without it on the same ranks (the CP2 parity: tests/stages/rlvr/test_rlvr_cp.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tulu3.rollout.engine import check_generation_spec


def _model(packed_format: str, cp: int = 1) -> SimpleNamespace:
    return SimpleNamespace(packed_format=packed_format,
                           config=SimpleNamespace(context_parallel_size=cp))


def test_torch_and_local_specs_generate() -> None:
    check_generation_spec([_model("sbhd")])
    check_generation_spec([_model("mask")])
    check_generation_spec([_model("sbhd", cp=2)])  # generates without CP on the same ranks


def test_te_is_refused() -> None:
    with pytest.raises(ValueError, match="needs model.spec=torch"):
        check_generation_spec([_model("thd")])
    with pytest.raises(ValueError, match="needs model.spec=torch"):
        check_generation_spec([_model("thd", cp=2)])
