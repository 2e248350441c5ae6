"""train.collective_timeout_min: a stalled rank ends the job within the timeout (not a hang for
the 30-minute default), and the trainer's one line names the rank that never started the step
and the rank that started it but hangs inside it, before the collective
(tulu3.parallel.heartbeat)."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import types

import pytest

from tulu3.parallel.heartbeat import GRACE_S, STORE_S
from tulu3.parallel.init import free_port

pytestmark = pytest.mark.distributed

TIMEOUT_MIN = 0.05  # 3 s
STALL_S = 60  # how long a stalled rank sleeps: "did not hang" bounds stay well below it
BARE = "a collective timed out: another rank stalled or died"


def _rank(rank: int, world: int, port: int, roles: dict, ready, results) -> None:  # noqa: ANN001
    import torch
    import torch.distributed as dist

    from tulu3 import patches
    from tulu3.config import describe_error
    from tulu3.parallel.heartbeat import Heartbeat
    from tulu3.parallel.init import init_distributed
    from tulu3.trainer import guarded_step

    # init_distributed installs the patches (imports megatron: seconds on a busy machine); done
    # first by every rank, so that the rendezvous (held to the 3 s timeout too) starts together
    patches.install()
    ready.wait()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    init_distributed("gloo", timeout_min=TIMEOUT_MIN)
    heartbeat = Heartbeat()
    heartbeat.beat(0)
    role = roles.get(rank, "reaches")
    if role == "behind":
        time.sleep(STALL_S)  # stalled in step 0: never starts step 1
        os._exit(0)
    started = time.monotonic()

    def step_1(loop_step: int) -> dict:
        if role == "stuck":
            time.sleep(STALL_S)  # started step 1, hangs before its collective (a data reader)
            os._exit(0)
        dist.all_reduce(torch.ones(1))
        return {}

    try:
        guarded_step(types.SimpleNamespace(train_step=step_1), 1, heartbeat)
        results.put((rank, "no error", time.monotonic() - started))
    except Exception as err:  # noqa: BLE001 - the fault under test
        results.put((rank, describe_error(err) + " | " + describe_error(err.__cause__),
                     time.monotonic() - started))
    os._exit(0)


def _messages(world: int, roles: dict[int, str]) -> dict[int, tuple[str, float]]:
    """rank -> (its one-line error, seconds from step start) for the ranks that reach the
    collective; the other ranks are killed."""
    ctx = mp.get_context("fork")
    results = ctx.SimpleQueue()
    ready = ctx.Barrier(world)
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, roles, ready, results))
             for r in range(world)]
    for proc in procs:
        proc.start()
    out: dict[int, tuple[str, float]] = {}
    try:
        deadline = time.monotonic() + 120
        while len(out) < world - len(roles) and time.monotonic() < deadline:
            if results.empty():
                time.sleep(0.2)
                continue
            rank, message, seconds = results.get()
            out[rank] = (message, seconds)
        assert len(out) == world - len(roles), f"ranks hung past 120 s; got {out}"
    finally:
        for proc in procs:
            proc.kill()
            proc.join()
    return out


def test_stalled_rank_ends_the_collective_within_the_timeout() -> None:
    (message, seconds), = _messages(2, {1: "behind"}).values()
    # the trainer's message names the rank; the bare timeout (no heartbeat) says what happened
    assert message.startswith("step 1: a collective timed out (train.collective_timeout_min); "
                              "stalled: rank 1 (last started step 0): see that rank's log"), message
    assert BARE in message, message
    # every rank of step 1 reported its timeout: no grace period waited
    assert TIMEOUT_MIN * 60 * 0.9 <= seconds < TIMEOUT_MIN * 60 + 15, seconds


def test_rank_stuck_inside_the_step_is_named() -> None:
    # ranks 0 and 1 reach the all_reduce; rank 2 started step 1 and hangs before it; rank 3 never
    # started step 1. Both ranks that time out name both, each in its own words.
    out = _messages(4, {2: "stuck", 3: "behind"})
    for rank, (message, seconds) in out.items():
        assert message.startswith(
            "step 1: a collective timed out (train.collective_timeout_min); "
            "stalled: rank 3 (last started step 0); "
            f"stuck inside step 1 (no error reported within {GRACE_S:g} s): rank 2: "
            "see that rank's log | "
        ), (rank, message)
        assert BARE in message, message
        # did not hang: the timeout, the grace period and the store exchanges, far below STALL_S
        assert seconds < TIMEOUT_MIN * 60 + 2 * GRACE_S + STORE_S + 10 < STALL_S, seconds
