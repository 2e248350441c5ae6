"""Per-phase timers (exclusive time, muted blocks), train.profile parsing, the trace writer."""

from __future__ import annotations

import json

import pytest
import torch

from tulu3.metrics import profiling
from tulu3.metrics.profiling import PhaseTimers, StepProfiler, parse_profile, phase_metrics


class FakeClock:
    """``time.perf_counter`` that moves only when the test sleeps: exact, whatever the load."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_nested_phases_count_exclusive_time(monkeypatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(profiling.time, "perf_counter", clock)
    timers = PhaseTimers()
    with timers.phase("data"):
        clock.sleep(0.25)
        with timers.phase("reference"):
            clock.sleep(0.5)
    with timers.phase("value_update"), timers.muted():
        with timers.phase("forward_backward"):  # muted: not the policy's training time
            clock.sleep(0.125)
    totals = timers.drain()
    # data holds its own 0.25 s, not the 0.5 s of the reference pass inside it; value_update
    # holds all of its 0.125 s, the muted forward_backward nothing (binary fractions: exact)
    assert totals == {"data": 0.25, "reference": 0.5, "value_update": 0.125}, totals
    assert timers.drain() == {}
    assert phase_metrics({"data": 0.25})["time/data_s"] == 0.25


def test_profile_window() -> None:
    assert parse_profile(None) is None and parse_profile("2:4") == (2, 4)
    for bad in ("4:2", "3", "a:b", "-1:2"):
        with pytest.raises(ValueError, match="train.profile"):
            parse_profile(bad)


def test_trace_covers_the_window(tmp_path) -> None:
    profiler = StepProfiler((1, 2), tmp_path, rank=0)
    for step in range(3):
        profiler.before_step(step)
        torch.mm(torch.ones(8, 8), torch.ones(8, 8))
        profiler.after_step(step + 1)
    profiler.close()
    trace = json.loads((tmp_path / "profile" / "trace_rank0.json").read_text())
    names = [e.get("name", "") for e in trace["traceEvents"]]
    assert names.count("aten::mm") == 1, names  # step 2 only
