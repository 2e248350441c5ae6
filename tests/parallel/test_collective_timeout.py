"""train.collective_timeout_min: a stalled rank ends the job within the timeout (not a hang for
the 30-minute default), and the trainer's one line names the rank that never started the step
(tulu3.parallel.heartbeat)."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import types

import pytest

from tulu3.parallel.init import free_port

pytestmark = pytest.mark.distributed

TIMEOUT_MIN = 0.05  # 3 s


def _rank(rank: int, port: int, results) -> None:  # noqa: ANN001 - a SimpleQueue
    import torch
    import torch.distributed as dist

    from tulu3.config import describe_error
    from tulu3.parallel.heartbeat import Heartbeat
    from tulu3.parallel.init import init_distributed
    from tulu3.trainer import guarded_step

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    init_distributed("gloo", timeout_min=TIMEOUT_MIN)
    heartbeat = Heartbeat()
    heartbeat.beat(0)
    if rank == 1:
        time.sleep(30)  # stalled in step 0: never starts step 1
        os._exit(0)
    started = time.monotonic()

    def step_1(loop_step: int) -> dict:
        dist.all_reduce(torch.ones(1))
        return {}

    try:
        guarded_step(types.SimpleNamespace(train_step=step_1), 1, heartbeat)
        results.put(("no error", time.monotonic() - started))
    except Exception as err:  # noqa: BLE001 - the fault under test
        results.put((describe_error(err) + " | " + describe_error(err.__cause__),
                     time.monotonic() - started))
    os._exit(0)


def test_stalled_rank_ends_the_collective_within_the_timeout() -> None:
    ctx = mp.get_context("fork")
    results = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, results)) for r in range(2)]
    for proc in procs:
        proc.start()
    try:
        deadline = time.monotonic() + 60
        while results.empty() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not results.empty(), "rank 0 hung past 60 s"
        message, seconds = results.get()
    finally:
        for proc in procs:
            proc.kill()
            proc.join()
    # the trainer's message names the rank; the bare timeout (no heartbeat) says what happened
    assert message.startswith("step 1: a collective timed out (train.collective_timeout_min); "
                              "stalled: rank 1 (last started step 0)"), message
    assert "a collective timed out: another rank stalled or died" in message, message
    assert TIMEOUT_MIN * 60 * 0.9 <= seconds < TIMEOUT_MIN * 60 + 15, seconds
