"""tulu3.train.run_stage's wiring: the run directory is locked for the run (and only for it),
and checkpoints record the tokenizer's absolute path (an export from another working directory
still finds it). A stand-in trainer: no model, one process."""

from __future__ import annotations

import os
import socket
import sys
import types
from pathlib import Path

import pytest

import tulu3.trainer
from tulu3.checkpoint.run_lock import LOCK_NAME, RunDirLocked
from tulu3.config import Config
from tulu3.train import LOOPS, run_stage


class _Trainer:
    def __init__(self, cfg: Config, stage: str) -> None:
        self.cfg, self.rank, self.run_dir = cfg, 0, Path(cfg.train.run_dir)
        self.groups = types.SimpleNamespace(vocab_shard=lambda vocab: vocab)
        self.seen: dict = {}

    def load_tokenizer(self):  # noqa: ANN201
        return types.SimpleNamespace(vocab_size=10)

    def resolve_shape(self, vocab: int):  # noqa: ANN201
        return types.SimpleNamespace(vocab=vocab)

    def build_model(self, shape, head):  # noqa: ANN001, ANN201
        return []

    def build_optimizer(self, chunks, steps) -> None:  # noqa: ANN001
        pass

    def fit(self, loop, chunks, shape, tokenizer_path):  # noqa: ANN001, ANN201
        return {"tokenizer": tokenizer_path, "locked": (self.run_dir / LOCK_NAME).is_file()}


def test_lock_and_absolute_tokenizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loop_module = types.ModuleType("fake_loop")
    loop_module.build_loop = lambda *a: types.SimpleNamespace(total_steps=lambda: 1)
    monkeypatch.setitem(sys.modules, "fake_loop", loop_module)
    monkeypatch.setitem(LOOPS, "sft", "fake_loop")
    monkeypatch.setattr(tulu3.trainer, "Trainer", _Trainer)
    monkeypatch.chdir(tmp_path)
    cfg = Config()
    cfg.train.run_dir, cfg.data.tokenizer = str(tmp_path / "run"), "tok/tokenizer.model"
    record = run_stage(cfg, "sft")
    assert record == {"tokenizer": str(tmp_path / "tok" / "tokenizer.model"), "locked": True}
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # released when the run ends
    (tmp_path / "run" / LOCK_NAME).write_text(f"{socket.gethostname()} {os.getppid()}\n")
    with pytest.raises(RunDirLocked, match=f"pid {os.getppid()}"):
        run_stage(cfg, "sft")
