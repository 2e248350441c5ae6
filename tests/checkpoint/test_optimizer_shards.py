"""Resuming from a checkpoint whose optimizer shards (torch DCP ``.distcp`` files) are truncated
or corrupt fails with one line naming the file, as damaged model shards do
(tulu3.checkpoint.training._load_trained), not with torch DCP's multi-rank traceback."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from trainer_harness import run_many, sft_overrides, tiny_data

from tulu3.testing import run_distributed_test

pytestmark = pytest.mark.distributed

RUN = ["parallel.tp=1", "parallel.pp=1", "train.max_steps=2", "train.save_every=2"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("optim_shards")
    data = tiny_data(root)
    (result,) = run_distributed_test(run_many, 1, [sft_overrides(data, root / "run", *RUN)])[0]
    assert isinstance(result, list) and len(result) == 2, result
    return root, data


def _damaged(root: Path, name: str) -> tuple[Path, Path]:
    """A copy of the saved step_2 and its largest optimizer shard (to be damaged)."""
    ckpt = root / name
    shutil.copytree(root / "run" / "checkpoints" / "step_2", ckpt)
    shard = max((ckpt / "optimizer").glob("*.distcp"), key=lambda p: p.stat().st_size)
    return ckpt, shard


def _resume(root: Path, data: dict, ckpt: Path) -> str:
    overrides = sft_overrides(data, root / f"resume_{ckpt.name}", *RUN, "train.max_steps=4",
                              f"train.resume={ckpt}")
    (result,) = run_distributed_test(run_many, 1, [overrides])[0]
    assert isinstance(result, str), result  # the run refused to start
    return result


def test_truncated_optimizer_shard_is_named(saved: tuple) -> None:
    root, data = saved
    ckpt, shard = _damaged(root, "truncated")
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:size // 2])  # a copy cut short
    message = _resume(root, data, ckpt)
    assert "\n" not in message, message
    assert re.search(rf"{re.escape(str(shard))}: truncated \({size // 2} of \d+ bytes\)",
                     message), message


def test_corrupt_optimizer_shard_is_named(saved: tuple) -> None:
    root, data = saved
    ckpt, shard = _damaged(root, "corrupt")
    size = shard.stat().st_size
    shard.write_bytes(b"\xde\xad" * (size // 2) + b"\0" * (size % 2))  # same size, garbage
    message = _resume(root, data, ckpt)
    assert "\n" not in message, message
    assert f"{shard}: corrupt" in message, message
