"""Where a step's time goes: per-phase timers, a torch.profiler trace, peak GPU memory.

Phases (``time/<phase>_s`` in each metrics.jsonl record, seconds of this rank):
``data`` (reading + collating micro-batches), ``forward_backward`` (megatron's schedule),
``optimizer`` (clip + step + parameter gather), ``reference`` (DPO / RLVR reference and
pre-pass log-probs), ``generation``, ``verification`` (RLVR), ``save`` (the blocking part of a
checkpoint). Time is *exclusive*: a phase opened inside another (DPO's online reference pass
inside ``data``) is counted in the inner phase only. Code marks a phase with
``with phase("data"):``; the trainer drains the totals once per optimizer step.

The timers are process-global like Megatron-LM's ``get_timers()``: they are only read by the
trainer, never by the math, and a phase is a host-side wall-clock interval (with CUDA the
schedule's own syncs and ``.item()`` calls bound it; no extra synchronisation is added).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PHASES = ("data", "forward_backward", "optimizer", "reference", "generation", "verification",
          "save")
TRAINING_PHASES = ("forward_backward", "optimizer")
"""The phases whose time MFU divides by (the trained tokens' forward, backward and update)."""


class PhaseTimers:
    """Exclusive wall-clock seconds per phase since the last :meth:`drain`."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self._stack: list[list] = []  # [name, start, seconds spent in nested phases]
        self._muted = 0

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self._muted:
            yield
            return
        entry = [name, time.perf_counter(), 0.0]
        self._stack.append(entry)
        try:
            yield
        finally:
            self._stack.pop()
            elapsed = time.perf_counter() - entry[1]
            self.totals[name] = self.totals.get(name, 0.0) + elapsed - entry[2]
            if self._stack:
                self._stack[-1][2] += elapsed

    @contextlib.contextmanager
    def muted(self) -> Iterator[None]:
        """Phases opened inside are not counted (an extra model's update: RLVR's value model,
        whose time is not the policy's training time)."""
        self._muted += 1
        try:
            yield
        finally:
            self._muted -= 1

    def drain(self) -> dict[str, float]:
        """``{phase: seconds}`` since the last drain, and start over."""
        totals, self.totals = self.totals, {}
        return totals


TIMERS = PhaseTimers()


def phase(name: str) -> contextlib.AbstractContextManager[None]:
    """``with phase("data"): ...``: count the block's time under ``time/data_s``."""
    return TIMERS.phase(name)


def phase_metrics(totals: dict[str, float]) -> dict[str, float]:
    """``time/<phase>_s`` keys (rounded to microseconds) and, with CUDA, ``memory/peak_gib``
    (the allocator's peak since the previous call, this rank) and ``memory/reserved_gib``."""
    out = {f"time/{name}_s": round(seconds, 6) for name, seconds in totals.items()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        gib = float(1 << 30)
        out["memory/peak_gib"] = torch.cuda.max_memory_allocated() / gib
        out["memory/reserved_gib"] = torch.cuda.max_memory_reserved() / gib
        torch.cuda.reset_peak_memory_stats()
    return out


def parse_profile(spec: str | None) -> tuple[int, int] | None:
    """``train.profile`` "START:END" -> (START, END): steps START+1..END are traced."""
    if spec is None:
        return None
    try:
        start, end = (int(part) for part in str(spec).split(":"))
    except ValueError:
        raise ValueError(f"train.profile={spec!r}: expected START:END (optimizer steps, "
                         "e.g. 2:4 traces steps 3 and 4; in YAML quote it: \"2:4\")") from None
    if not 0 <= start < end:
        raise ValueError(f"train.profile={spec!r}: expected 0 <= START < END")
    return start, end


class StepProfiler:
    """A torch.profiler trace of steps START+1..END (CPU, and CUDA when present), written as
    ``RUN_DIR/profile/trace_rank{R}.json`` (Chrome trace format: Perfetto, chrome://tracing)."""

    def __init__(self, window: tuple[int, int] | None, run_dir: Path, rank: int) -> None:
        self.window, self.rank = window, rank
        self.path = Path(run_dir) / "profile" / f"trace_rank{rank}.json"
        self._prof: torch.profiler.profile | None = None

    def before_step(self, step: int) -> None:
        """Call before optimizer step ``step + 1`` runs (``step`` steps done)."""
        if self.window is None or self._prof is not None or step != self.window[0]:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(activities=activities, record_shapes=True,
                                            with_stack=False)
        self._prof.__enter__()

    def after_step(self, step: int) -> None:
        """Call after optimizer step ``step`` is done; writes the trace at the window's end."""
        if self._prof is not None and self.window is not None and step >= self.window[1]:
            self.close()

    def close(self) -> None:
        if self._prof is None:
            return
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.path))
        log.info(f"profiler trace written: {self.path}")


@contextlib.contextmanager
def memory_snapshot_on_oom(enabled: bool, run_dir: Path, rank: int) -> Iterator[None]:
    """With ``train.memory_snapshot`` and CUDA: record the allocator's history and dump it to
    ``RUN_DIR/memory_snapshot_rank{R}.pickle`` when the block raises CUDA out-of-memory."""
    if not (enabled and torch.cuda.is_available()):
        if enabled:
            log.warning("train.memory_snapshot: no CUDA device, nothing to record")
        yield
        return
    torch.cuda.memory._record_memory_history(max_entries=100_000)
    try:
        yield
    except torch.OutOfMemoryError:
        path = Path(run_dir) / f"memory_snapshot_rank{rank}.pickle"
        torch.cuda.memory._dump_snapshot(str(path))
        log.error(f"CUDA out of memory: allocator snapshot written to {path} "
                  "(open it at https://pytorch.org/memory_viz)")
        raise
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
