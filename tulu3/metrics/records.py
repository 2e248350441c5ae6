"""Per-step metrics: ``metrics.jsonl``, a one-line progress display, TensorBoard / W&B."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

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


