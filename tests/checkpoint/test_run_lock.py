"""RUN_DIR/.lock: a second job is refused naming the holder; a stale lock is taken over; and
the checkpoint layer's faults name their file (corrupt JSON, a full disk)."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tulu3.checkpoint.errors import ConversionError, disk_full_error, read_json
from tulu3.checkpoint.run_lock import LOCK_NAME, RunDirLocked, acquire, release, run_dir_lock
from tulu3.config import UserError


def test_second_job_refused_naming_host_and_pid(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_NAME).write_text(f"{socket.gethostname()} {holder.pid}\n")
        with pytest.raises(RunDirLocked, match=rf"host {socket.gethostname()}, pid "
                                               rf"{holder.pid}"):
            acquire(tmp_path)
        assert (tmp_path / LOCK_NAME).read_text().split()[1] == str(holder.pid)  # untouched
    finally:
        holder.kill()
        holder.wait()
    # the holder is dead now (kill -9): the lock is stale and taken over
    path = acquire(tmp_path)
    assert path.read_text() == f"{socket.gethostname()} {os.getpid()}\n"
    release(path)
    assert not path.exists()


def test_other_host_and_half_written_locks(tmp_path: Path) -> None:
    (tmp_path / LOCK_NAME).write_text("some-other-node 12\n")
    with pytest.raises(RunDirLocked, match="host some-other-node, pid 12.*delete"):
        acquire(tmp_path)
    (tmp_path / LOCK_NAME).write_text("")  # killed between create and write
    with run_dir_lock(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text().split() == [socket.gethostname(),
                                                              str(os.getpid())]
    assert not (tmp_path / LOCK_NAME).exists()
    with run_dir_lock(tmp_path / "new", hold=False):  # ranks > 0 take nothing
        assert not (tmp_path / "new").exists()


def test_corrupt_json_and_full_disk_name_the_file(tmp_path: Path) -> None:
    meta = tmp_path / "trainer.json"
    meta.write_text('{"step": 3, "sched')
    with pytest.raises(ConversionError, match=rf"{meta}: corrupt JSON .* damaged"):
        read_json(meta)
    enospc = OSError(errno.ENOSPC, "No space left on device")
    outer = RuntimeError("unexpected pos 4096")
    outer.__context__ = enospc
    error = disk_full_error(tmp_path / "checkpoints", outer)
    assert error is not None and str(error).startswith(f"no space left on {tmp_path}/checkpoints")
    assert disk_full_error(tmp_path, RuntimeError("a bug")) is None  # this disk has room


def test_train_takes_the_lock_on_rank_0_only(tmp_path: Path) -> None:
    from tulu3.train import lock_run_dir

    (tmp_path / LOCK_NAME).write_text(f"{socket.gethostname()} {os.getppid()}\n")  # alive
    with pytest.raises(RunDirLocked, match=f"pid {os.getppid()}"):
        with lock_run_dir(tmp_path, rank=0):
            pass
    with lock_run_dir(tmp_path, rank=1):  # one process: no other rank to hear from
        pass
    (tmp_path / LOCK_NAME).unlink()
    with lock_run_dir(tmp_path, rank=0):
        assert (tmp_path / LOCK_NAME).exists()
    assert not (tmp_path / LOCK_NAME).exists()


def test_truncated_distcp_names_the_file(tmp_path: Path, capsys) -> None:
    import torch
    from ckpt_testlib import SHAPE, random_hf_dir

    from checkpoints_tools import hf_to_megatron, megatron_to_hf

    hf = random_hf_dir(tmp_path / "hf", SHAPE, torch.float32)
    hf_to_megatron.convert(hf, tmp_path / "ckpt", 1, 1, quiet=True)
    shard = sorted((tmp_path / "ckpt").rglob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])  # a copy cut short
    out = tmp_path / "out"
    assert megatron_to_hf.main(["--ckpt", str(tmp_path / "ckpt"), "--out", str(out),
                                "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{shard}: truncated (" in err, err
    assert not out.exists()  # nothing left behind
    from tulu3.stages.preflight import check_checkpoint  # tulu3.train: before the model

    with pytest.raises(UserError, match=rf"model.load=.*{shard}: truncated \(\d+ of \d+ bytes"):
        check_checkpoint("model.load", str(tmp_path / "ckpt"))
