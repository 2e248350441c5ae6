"""A step's metrics.jsonl record: per-phase times beside the loop's own keys, and MFU over the
tokens trained on and the training phases only (hand-worked numbers)."""

from __future__ import annotations

import types

import pytest

import tulu3.trainer as trainer_mod
from tulu3.trainer import Trainer


def test_mfu_counts_trained_tokens_over_training_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trainer_mod, "_peak_flops", lambda: 1e12)
    monkeypatch.setattr(trainer_mod, "flops_per_token", lambda shape, seq: 6.0)
    fake = types.SimpleNamespace(cfg=types.SimpleNamespace(data=types.SimpleNamespace(max_len=64)),
                                 layout=types.SimpleNamespace(world_size=2))
    metrics = {"loss": 1.0, "tokens": 100, "trained_tokens": 400, "time/generation_s": 9.0}
    phases = {"data": 3.0, "generation": 10.0, "forward_backward": 1.5, "optimizer": 0.5}
    record = Trainer._record(fake, 7, metrics, 15.0, {"tokens": 700, "elapsed_s": 99.0}, None,
                             phases)
    # 6 FLOP/token x 400 trained tokens / (1.5 + 0.5 s) / (1e12 FLOP/s x 2 ranks)
    assert record["mfu"] == pytest.approx(6.0 * 400 / 2.0 / 2e12, rel=1e-12)
    assert record["time/data_s"] == 3.0 and record["time/forward_backward_s"] == 1.5
    assert record["time/generation_s"] == 9.0  # the loop's own measurement is kept
    assert "trained_tokens" not in record and record["step_tokens"] == 100
    assert record["tokens_per_s"] == pytest.approx(100 / 15.0)
