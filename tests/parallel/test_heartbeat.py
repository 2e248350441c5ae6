"""tulu3.parallel.heartbeat against an in-process store (torch's HashStore, the same API as the
rendezvous TCPStore): who is behind, who is stuck inside the step, and that a store which is gone
or hangs gives no names (the bare timeout message) within a bounded time."""

from __future__ import annotations

import threading
import time

import pytest
import torch.distributed as dist

from tulu3.parallel import heartbeat as hb
from tulu3.parallel.heartbeat import FAILED, FAILED_COUNT, PREFIX, READ_COUNT, Heartbeat

TIMEOUT = RuntimeError("[Gloo] Timed out waiting 3000ms for recv operation to complete")
CLOSED = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed "
                      "by peer [127.0.0.1]:41311")
"""What a rank in the collective reads when a peer's own timeout fired first (gloo closes the
pair): the same failure, seen second-hand."""


@pytest.fixture(autouse=True)
def _short_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hb, "GRACE_S", 0.5)
    monkeypatch.setattr(hb, "STORE_S", 1.0)


def _beat(store: object, rank: int, world: int) -> Heartbeat:
    beat = Heartbeat()  # not initialized: no store, rank 0 of 1; then this rank of ``world``
    beat.store, beat.rank, beat.world = store, rank, world  # type: ignore[assignment]
    return beat


def _started(store: dist.Store, steps: dict[int, int]) -> None:
    for rank, step in steps.items():
        store.set(f"{PREFIX}{rank}", str(step))


def _failed(store: dist.Store, rank: int, step: int) -> None:
    store.set(f"{FAILED}{rank}", str(step))
    store.add(f"{FAILED_COUNT}{step}", 1)


@pytest.mark.parametrize("error", [TIMEOUT, CLOSED], ids=["timed-out", "peer-closed"])
def test_names_the_ranks_behind_and_stuck_inside(error: RuntimeError) -> None:
    store = dist.HashStore()
    _started(store, {0: 5, 1: 5, 2: 5, 3: 4, 4: 6})  # rank 4 is ahead: not stuck in step 5
    _failed(store, 1, 5)
    _failed(store, 2, 4)  # an older failure of rank 2 does not count for step 5
    fault = _beat(store, 0, 6).fault(5, error)
    assert str(fault) == ("step 5: a collective timed out (train.collective_timeout_min); "
                          "stalled: rank 3 (last started step 4), rank 5 (started no step); "
                          "stuck inside step 5 (no error reported within 0.5 s): rank 2: "
                          "see that rank's log")
    assert store.get(f"{FAILED}0") == b"5"  # this rank reported its own timeout


def test_all_ranks_reported_no_names_and_no_grace_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hb, "GRACE_S", 30.0)
    store = dist.HashStore()
    _started(store, {0: 2, 1: 2, 2: 2})
    _failed(store, 0, 2)
    _failed(store, 1, 2)
    started = time.monotonic()
    # rank 2 (rank 0 would linger for the others' reads, which these fake ranks never do)
    assert _beat(store, 2, 3).fault(2, TIMEOUT) is None  # the bare timeout stands
    assert time.monotonic() - started < 15  # did not wait the 30 s grace


def test_other_errors_are_recorded_but_not_rewritten() -> None:
    store = dist.HashStore()
    _started(store, {0: 7, 1: 7})
    assert _beat(store, 1, 2).fault(7, ValueError("bad row")) is None
    # rank 0 timing out in step 7 then does not call rank 1 stuck: it left with its own error
    _failed(store, 0, 7)
    assert store.get(f"{FAILED}1") == b"7"
    assert int(store.add(f"{FAILED_COUNT}7", 0)) == 2
    assert int(store.add(f"{READ_COUNT}7", 0)) == 1  # rank 0 does not wait for its reads


def test_rank_0_waits_for_the_others_reads_only_while_they_read(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # rank 0 hosts the store outside torchrun: it must outlive the other failed ranks' reads
    monkeypatch.setattr(hb, "GRACE_S", 30.0)
    store = dist.HashStore()
    _started(store, {0: 2, 1: 2})
    _failed(store, 1, 2)
    finished = threading.Timer(1.0, lambda: store.add(f"{READ_COUNT}2", 1))  # rank 1 has read
    finished.start()
    started = time.monotonic()
    assert _beat(store, 0, 2).fault(2, TIMEOUT) is None
    waited = time.monotonic() - started
    finished.join()
    assert int(store.add(f"{READ_COUNT}2", 0)) == 2
    assert 0.9 <= waited < 15, waited  # waited for rank 1's read, not the 30 s grace


class _GoneStore:
    """rank 0 (the store's host) died: every call fails at once."""

    def __getattr__(self, name: str) -> object:
        def call(*args: object) -> None:
            raise dist.DistNetworkError("Broken pipe")
        return call


class _HungStore:
    """The store's host hangs: every call blocks (a TCPStore client ignores its timeout then)."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def __getattr__(self, name: str) -> object:
        def call(*args: object) -> None:
            self.release.wait()
        return call


def test_store_gone_gives_the_bare_message() -> None:
    assert _beat(_GoneStore(), 0, 4).fault(3, TIMEOUT) is None


def test_store_hung_gives_the_bare_message_in_bounded_time() -> None:
    store = _HungStore()
    started = time.monotonic()
    try:
        assert _beat(store, 0, 4).fault(3, TIMEOUT) is None
        assert time.monotonic() - started < 15  # GRACE_S + STORE_S = 1.5 s: did not hang
    finally:
        store.release.set()


def test_single_process_touches_no_store() -> None:
    assert _beat(_GoneStore(), 0, 1).fault(0, TIMEOUT) is None
