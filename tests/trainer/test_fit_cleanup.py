"""Trainer.fit cleans up however it ends: the loop is closed (RLVR: its verifier pool) and the
SIGTERM/SIGINT handlers it installed are put back. One process, no process group: the parallel
set-up, the checkpoint save and the any-rank vote are stubbed; the loop is a fake."""

from __future__ import annotations

import logging
import os
import signal
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tulu3.trainer as trainer_mod
from tulu3.config import Config
from tulu3.trainer import Trainer, stop_signal_handlers


class FakeLayout:
    world_size = 1
    rank = 0

    def describe(self) -> str:
        return "TP1xPP1xDP1 on 1 rank"


class FakeLoop:
    def __init__(self, step: Any) -> None:
        self.step = step
        self.closed = 0

    def total_steps(self) -> int:
        return 4

    def train_step(self, step: int) -> dict[str, Any]:
        return self.step(step)

    def evaluate(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def close(self) -> None:
        self.closed += 1


def _sentinel(signum: int, frame: Any) -> None:
    raise AssertionError(f"the test's own handler got signal {signum}")


@pytest.fixture
def trainer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Trainer]:
    monkeypatch.setattr(trainer_mod, "setup_parallel", lambda cfg: (FakeLayout(), None))
    monkeypatch.setattr(trainer_mod, "dist", types.SimpleNamespace(get_rank=lambda: 0))
    monkeypatch.setattr(trainer_mod, "any_rank", bool)
    logger = logging.getLogger("tulu3")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    previous = {sig: signal.signal(sig, _sentinel) for sig in trainer_mod.STOP_SIGNALS}
    cfg = Config()
    cfg.train.run_dir = str(tmp_path / "run")
    cfg.train.plots = False
    yield Trainer(cfg, "sft")
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    logger.handlers[:], logger.level, logger.propagate = handlers, level, propagate


def _fit(trainer: Trainer, loop: FakeLoop) -> dict:
    return trainer.fit(loop, [], None, None)  # type: ignore[arg-type]


def test_a_raising_step_closes_the_loop_and_restores_handlers(trainer: Trainer) -> None:
    def step(n: int) -> dict:
        assert signal.getsignal(signal.SIGTERM) is not _sentinel  # the trainer's, meanwhile
        raise RuntimeError("boom")

    loop = FakeLoop(step)
    with pytest.raises(RuntimeError, match="boom"):
        _fit(trainer, loop)
    assert loop.closed == 1
    assert all(signal.getsignal(sig) is _sentinel for sig in trainer_mod.STOP_SIGNALS)


def test_a_stop_signal_saves_stops_and_restores(trainer: Trainer,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    saved = []
    monkeypatch.setattr(trainer, "_save", lambda step, *args, **kwargs: saved.append(step))

    def step(n: int) -> dict:
        if n == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # caught by the trainer: stop after this step
        return {"loss": 1.0, "tokens": 8}

    loop = FakeLoop(step)
    with pytest.raises(SystemExit, match="stopped by signal"):
        _fit(trainer, loop)
    assert saved == [2] and loop.closed == 1
    assert all(signal.getsignal(sig) is _sentinel for sig in trainer_mod.STOP_SIGNALS)


def test_a_full_run_closes_the_loop_and_restores_handlers(trainer: Trainer,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trainer, "_save", lambda *args, **kwargs: None)
    loop = FakeLoop(lambda n: {"loss": 1.0, "tokens": 8})
    record = _fit(trainer, loop)
    assert record["step"] == 4 and loop.closed == 1
    assert all(signal.getsignal(sig) is _sentinel for sig in trainer_mod.STOP_SIGNALS)
    assert (Path(trainer.run_dir) / "metrics.jsonl").read_text().count("\n") == 4


def test_stop_signal_handlers_restore_on_error() -> None:
    before = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        pass

    with pytest.raises(KeyError), stop_signal_handlers(handler):
        assert signal.getsignal(signal.SIGINT) is handler
        raise KeyError("x")
    assert signal.getsignal(signal.SIGINT) is before
