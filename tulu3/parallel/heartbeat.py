"""Which rank stalled: each rank records the step it starts in torch.distributed's key-value
store (the rendezvous store every rank already talks to), so that when a collective times out
(``train.collective_timeout_min``) the ranks still alive can name the ones that never reached the
step. A rank that started the step but hangs inside it (a data reader, a verifier) is found the
other way round: every rank whose step fails records that in the store, and a rank that timed out
waits ``GRACE_S`` for the others of its step to do so; the ones that started the step and did not
are stuck inside it (torch's flight recorder finds the same rank by comparing collective
sequence numbers; this needs no dump, one store key per rank).

A few bytes per rank per step; nothing when the store is not available. The store exchanges of a
failing step run in a daemon thread given ``2 GRACE_S + STORE_S`` seconds at most: a TCPStore
client call does not honour the store's timeout when the server host hangs (it blocks in recv),
so a hung store ends with the bare timeout message instead of a hang."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

from tulu3.config import RunFault, is_collective_failure

PREFIX = "tulu3/step_started/"
FAILED = "tulu3/step_failed/"  # + rank: the last step this rank left with an error
FAILED_COUNT = "tulu3/steps_failed/"  # + step: how many ranks left that step with an error
READ_COUNT = "tulu3/steps_read/"  # + step: how many of those have read who is stuck
# How long a timed-out rank waits for the others of its step to report theirs (it returns as soon
# as all have). Ranks that entered the collective up to this much later time out later too and
# must still count as reporting: seconds, against timeouts of minutes.
GRACE_S = 10.0
STORE_S = 3.0  # the most the store exchanges may take on top of the grace (then: bare message)
POLL_S = 0.1  # between two reads of the failure count during the grace

T = TypeVar("T")


def _store() -> dist.Store | None:
    try:  # private but stable since torch 1.x; naming a stalled rank is best effort
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store() if dist.is_initialized() else None
    except Exception:  # noqa: BLE001 - no store, no names: the timeout still ends the job
        return None


def bounded(work: Callable[[], T], seconds: float) -> T | None:
    """``work()`` in a daemon thread; None when it raises or is not done within ``seconds``
    (the thread is then left behind: the job is failing anyway)."""
    out: list[T] = []

    def run() -> None:
        try:
            out.append(work())
        except Exception:  # noqa: BLE001 - the store is gone (rank 0 died): no names
            pass

    thread = threading.Thread(target=run, name="tulu3-heartbeat", daemon=True)
    thread.start()
    thread.join(seconds)
    return out[0] if out else None


class Heartbeat:
    """``beat(step)`` at the start of each step; ``fault(step, err)`` when the step raised."""

    def __init__(self) -> None:
        self.store = _store()
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1

    def beat(self, step: int) -> None:
        if self.store is not None and self.world > 1:
            self.store.set(f"{PREFIX}{self.rank}", str(step))

    def _read(self, prefix: str) -> dict[int, int | None]:
        """rank -> the step stored under ``prefix`` + rank (None: no key)."""
        assert self.store is not None
        keys = [f"{prefix}{rank}" for rank in range(self.world)]
        return {rank: int(self.store.get(key)) if self.store.check([key]) else None
                for rank, key in enumerate(keys)}

    def stuck(self, step: int, started: dict[int, int | None]) -> list[int]:
        """Ranks that started ``step`` (``started``: rank -> last step started) and did not
        report leaving it with an error within ``GRACE_S`` (returns as soon as all have).
        Raises when the store is gone."""
        assert self.store is not None
        in_step = [r for r, s in started.items() if s == step]
        deadline = time.monotonic() + GRACE_S
        # one counter read per poll, not one per rank: every failing rank polls rank 0's store
        while (int(self.store.add(f"{FAILED_COUNT}{step}", 0)) < len(in_step)
               and time.monotonic() < deadline):
            time.sleep(POLL_S)
        failed = self._read(FAILED)
        self._linger(step)
        return [r for r in in_step if failed[r] != step]

    def _linger(self, step: int) -> None:
        """Without torchrun's agent store, rank 0's process hosts the store and ends right after
        this fault: it waits (up to ``GRACE_S``) for the other failed ranks to finish reading."""
        assert self.store is not None
        deadline = time.monotonic() + GRACE_S
        done = int(self.store.add(f"{READ_COUNT}{step}", 1))
        while (self.rank == 0 and time.monotonic() < deadline
               and done < int(self.store.add(f"{FAILED_COUNT}{step}", 0))):
            time.sleep(POLL_S)
            done = int(self.store.add(f"{READ_COUNT}{step}", 0))

    def _report(self, step: int, timed_out: bool) -> tuple[dict, list[int]] | None:
        assert self.store is not None
        self.store.set(f"{FAILED}{self.rank}", str(step))
        self.store.add(f"{FAILED_COUNT}{step}", 1)
        if not timed_out:
            self.store.add(f"{READ_COUNT}{step}", 1)  # nothing to read: rank 0 need not wait
            return None
        started = self._read(PREFIX)
        behind = {r: s for r, s in started.items() if s is None or s < step}
        return behind, self.stuck(step, started)

    def fault(self, step: int, err: BaseException) -> RunFault | None:
        """Record that this rank left ``step`` with ``err``; when ``err`` is a collective timeout,
        a :class:`RunFault` naming the ranks behind ``step`` and those stuck inside it, if any;
        else None (the error stands as it is). Takes ``2 GRACE_S + STORE_S`` seconds at most."""
        if self.store is None or self.world == 1:
            return None
        timed_out = is_collective_failure(err)
        found = bounded(lambda: self._report(step, timed_out),
                        2 * GRACE_S + STORE_S if timed_out else STORE_S)
        if found is None:
            return None
        behind, stuck = found
        parts = []
        if behind:
            parts.append("stalled: " + ", ".join(
                f"rank {r} (last started step {s})" if s is not None else
                f"rank {r} (started no step)" for r, s in sorted(behind.items())))
        if stuck:
            # "within": a healthy rank that entered the collective more than GRACE_S later
            # than this one times out later too, and would be listed; say what was seen
            parts.append(f"stuck inside step {step} (no error reported within {GRACE_S:g} s): "
                         + ", ".join(f"rank {r}" for r in stuck))
        if not parts:
            return None
        return RunFault(f"step {step}: a collective timed out (train.collective_timeout_min); "
                        f"{'; '.join(parts)}: see that rank's log")
