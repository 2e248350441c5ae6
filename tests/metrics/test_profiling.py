"""Per-phase timers (exclusive time, muted blocks), train.profile parsing, the trace writer."""

from __future__ import annotations

import json
import time

import pytest
import torch

from tulu3.metrics.profiling import PhaseTimers, StepProfiler, parse_profile, phase_metrics


def test_nested_phases_count_exclusive_time() -> None:
    timers = PhaseTimers()
    with timers.phase("data"):
        time.sleep(0.02)
        with timers.phase("reference"):
            time.sleep(0.05)
    with timers.phase("value_update"), timers.muted():
        with timers.phase("forward_backward"):  # muted: not the policy's training time
            time.sleep(0.01)
    totals = timers.drain()
    assert set(totals) == {"data", "reference", "value_update"}, totals
    # data holds its own 20 ms, not the 50 ms of the reference pass inside it (sleep only
    # oversleeps, so the lower bounds are exact; the upper ones allow a busy machine 40 ms).
    assert 0.02 <= totals["data"] < 0.06 and 0.05 <= totals["reference"] < 0.09, totals
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
