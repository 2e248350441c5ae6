"""Which rank stalled: each rank records the step it starts in torch.distributed's key-value
store (the rendezvous store every rank already talks to), so that when a collective times out
(``train.collective_timeout_min``) the ranks still alive can name the ones that never reached the
step. A few bytes per rank per step; nothing when the store is not available."""

from __future__ import annotations

import torch.distributed as dist

from tulu3.config import RunFault

PREFIX = "tulu3/step_started/"


def _store() -> dist.Store | None:
    try:  # private but stable since torch 1.x; naming a stalled rank is best effort
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store() if dist.is_initialized() else None
    except Exception:  # noqa: BLE001 - no store, no names: the timeout still ends the job
        return None


class Heartbeat:
    """``beat(step)`` at the start of each step; ``laggards(step)`` after a timeout."""

    def __init__(self) -> None:
        self.store = _store()
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1

    def beat(self, step: int) -> None:
        if self.store is not None and self.world > 1:
            self.store.set(f"{PREFIX}{self.rank}", str(step))

    def laggards(self, step: int) -> dict[int, int | None]:
        """Ranks that did not start ``step``: rank -> the last step it started (None: none)."""
        if self.store is None:
            return {}
        behind: dict[int, int | None] = {}
        for rank in range(self.world):
            key = f"{PREFIX}{rank}"
            try:
                last = int(self.store.get(key)) if self.store.check([key]) else None
            except Exception:  # noqa: BLE001 - the store itself is gone (rank 0 died)
                return {}
            if last is None or last < step:
                behind[rank] = last
        return behind

    def fault(self, step: int, err: BaseException) -> RunFault | None:
        """A :class:`RunFault` naming the ranks behind ``step`` when ``err`` is a collective
        timeout and some are; else None (the error stands as it is)."""
        text = str(err).lower()
        if "timed out" not in text and "timeout" not in text:
            return None
        behind = self.laggards(step)
        if not behind:
            return None
        where = ", ".join(f"rank {r} (last started step {s})" if s is not None else
                          f"rank {r} (started no step)" for r, s in sorted(behind.items()))
        return RunFault(f"step {step}: a collective timed out (train.collective_timeout_min); "
                        f"stalled: {where}: see that rank's log")
