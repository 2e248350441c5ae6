"""Per-step metrics: ``metrics.jsonl``, a one-line progress display, TensorBoard / W&B, plots."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

# --- status messages: the "tulu3" logger -----------------------------------------------------
# Modules log with ``logging.getLogger(__name__)`` (children of "tulu3"); :func:`setup_logging`
# shows INFO and WARNING from rank 0 only and ERROR and above from every rank (prefixed with the
# rank), so no call site checks the rank itself.


class _RankFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        if self.rank == 0:
            return True
        if record.levelno >= logging.ERROR:  # warnings are about the run: rank 0 says them once
            record.msg = f"(rank {self.rank}) {record.msg}"
            return True
        return False


def setup_logging(rank: int | None = None, level: int = logging.INFO) -> logging.Logger:
    """Send the "tulu3" logger to stdout as ``[tulu3] message`` (once per process).

    ``rank``: this process's global rank; by default torch.distributed's when a process group
    exists, else torchrun's ``RANK`` (0 for a single process).
    """
    if rank is None:
        rank = _process_rank()
    logger = logging.getLogger("tulu3")
    for handler in list(logger.handlers):
        if getattr(handler, "_tulu3", False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout)
    handler._tulu3 = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("[tulu3] %(message)s"))
    handler.addFilter(_RankFilter(rank))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger


def _process_rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


log = logging.getLogger(__name__)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{sec:02d}"


class MetricsLogger:
    """Writes one JSON object per optimizer step (rank 0 only; other ranks get a no-op logger).

    On resume, lines after the resumed step (written by the interrupted run after its last
    checkpoint) are dropped, so the file reads as one uninterrupted run.
    """

    PROGRESS_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s")

    def __init__(self, run_dir: str | Path, total_steps: int, enabled: bool,
                 resume_step: int = 0, tensorboard: bool = False, wandb_project: str | None = None,
                 config: dict | None = None) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.path = Path(run_dir) / "metrics.jsonl"
        self.start = time.monotonic()
        self.start_step = resume_step
        self._tb = self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        if tensorboard:
            self._tb = _tensorboard(Path(run_dir) / "tensorboard")
        if wandb_project:
            self._wandb = _wandb(wandb_project, Path(run_dir).name, config)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        step = record["step"]
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)
        self._progress(record)

    def _progress(self, record: dict[str, Any]) -> None:
        step = record["step"]
        done = step - self.start_step
        elapsed = time.monotonic() - self.start
        eta = elapsed / done * (self.total_steps - step) if done > 0 else float("nan")
        shown = " | ".join(f"{k} {_fmt(record[k])}" for k in self.PROGRESS_KEYS if k in record)
        log.info(f"step {step}/{self.total_steps} | {shown} | ETA {_eta(eta)}")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _tensorboard(log_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("train.tensorboard=true but tensorboard is not installed; skipping")
        return None
    return SummaryWriter(str(log_dir))


def _wandb(project: str, name: str, config: dict | None) -> Any:
    try:
        import wandb
    except ImportError:
        log.warning("train.wandb is set but wandb is not installed; skipping")
        return None
    wandb.init(project=project, name=name, config=config)
    return wandb


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# --- PNG plots of a run's curves (matplotlib, headless) ----------------------------------------
# Figure name -> metric keys drawn on it (the ones present are drawn). Accuracies (0..1) and
# margins (unbounded) get separate figures: on one axis the accuracy curve would be a flat line.
FIGURES = {
    "loss": ("loss", "eval/loss"),
    "lr": ("lr",),
    "grad_norm": ("grad_norm",),
    "dpo_rewards": ("rewards/accuracy", "eval/rewards/accuracy"),
    "dpo_margin": ("rewards/margin", "eval/rewards/margin"),
    "dpo_logps": ("rewards/chosen", "rewards/rejected"),
    "rm": ("accuracy", "eval/accuracy"),
    "rm_margin": ("margin", "eval/margin"),
    "rlvr_reward": ("reward", "verified", "no_eos"),
    "rlvr_kl": ("kl", "entropy"),
}


def plot_run(run_dir: str | Path) -> list[Path]:
    """Draw every figure of FIGURES that has data; returns the PNG paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    written = []
    for figure, keys in FIGURES.items():
        series = {k: [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float))]
                  for k in keys}
        series = {k: v for k, v in series.items() if v}
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key, points in series.items():
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="o" if len(points) < 30 else None, ms=3, label=key)
        ax.set_xlabel("step")
        ax.set_title(f"{run_dir.name}: {figure}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = run_dir / f"{figure}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
