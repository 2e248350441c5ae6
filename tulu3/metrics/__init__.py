"""What a run reports: ``metrics.jsonl`` and the progress line (:mod:`.records`), status
messages (:mod:`.logs`), PNG curves (:mod:`.plots`), per-phase timers and the profiler
(:mod:`.profiling`)."""

from tulu3.metrics.logs import setup_logging
from tulu3.metrics.plots import FIGURES, plot_run
from tulu3.metrics.records import MetricsLogger, read_metrics

__all__ = ["FIGURES", "MetricsLogger", "plot_run", "read_metrics", "setup_logging"]
