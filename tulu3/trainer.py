"""The loop every stage shares: build, load, resume, step, log, save, stop cleanly.

A stage's *loop* (``build_loop`` of tulu3/stages/) supplies what differs: its data, its loss
module and how one optimizer step is fed. Everything else (parallel set-up, model, megatron
DDP + optimizer + LR schedule, checkpoints, signals, metrics, plots) is here, once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tulu3.checkpoint.errors import disk_full_error
from tulu3.checkpoint.training import (
    PendingSave,
    TrainedModel,
    clean_partial_saves,
    find_resume,
    load_checkpoint,
    start_checkpoint,
)
from tulu3.config import Config, ConfigError, RunFault, save_config
from tulu3.metrics import MetricsLogger, setup_logging
from tulu3.metrics.profiling import (
    TIMERS,
    TRAINING_PHASES,
    StepProfiler,
    memory_snapshot_on_oom,
    parse_profile,
    phase,
    phase_metrics,
)
from tulu3.model.build import build_model_chunks
from tulu3.model.presets import LlamaShape, flops_per_token, resolve_shape, with_shape
from tulu3.optim import build_optimizer, schedule_changes
from tulu3.parallel.ddp import CommOverlap, synced_params, unwrap, wrap_ddp
from tulu3.parallel.heartbeat import Heartbeat
from tulu3.parallel.init import setup_parallel
from tulu3.stages.base import Loop
from tulu3.step import any_rank

log = logging.getLogger(__name__)


class Trainer:
    """Owns the parallel model and optimizer; runs a Loop to ``total_steps``."""

    def __init__(self, cfg: Config, stage: str) -> None:
        self.cfg = cfg
        self.stage = stage
        self.layout, self.groups = setup_parallel(cfg)
        self.rank = dist.get_rank()
        setup_logging(self.rank)
        self.run_dir = Path(cfg.train.run_dir)
        self._stop_signal: int | None = None
        self._started = time.monotonic()  # train.exit_after_minutes counts from here
        self._pending: PendingSave | None = None  # an asynchronous save being written
        self._profile = check_run_control(cfg)

    # --- building -----------------------------------------------------------------------------

    def load_tokenizer(self) -> Any:
        from tulu3.data.tokenizer import load_tokenizer

        data = self.cfg.data
        if not data.tokenizer:
            raise ConfigError("data.tokenizer is not set (a tokenizer.model, a sentencepiece "
                              ".model or an HF model directory)")
        return load_tokenizer(data.tokenizer, bos=data.bos, eos=data.eos, pad=data.pad)

    def resolve_shape(self, tokenizer_vocab: int) -> LlamaShape:
        """The model shape: the preset and model.* keys, or the checkpoint of model.load.

        The vocabulary defaults to the tokenizer's (or the checkpoint's) and must cover it.
        """
        model = self.cfg.model
        if model.load:
            from tulu3.checkpoint.load import checkpoint_shape

            shape = checkpoint_shape(model.load)
            explicit = {f.name: getattr(model, f.name) for f in dataclasses.fields(LlamaShape)
                        if getattr(model, f.name) is not None}
            shape = dataclasses.replace(shape, **explicit)
        else:
            shape = resolve_shape(dataclasses.replace(model, vocab=model.vocab or tokenizer_vocab))
        if shape.vocab < tokenizer_vocab:
            source = f"model.vocab={shape.vocab}" if model.vocab is not None else \
                f"the vocabulary of model.load={model.load} ({shape.vocab})"
            raise ConfigError(f"{source} is smaller than the vocabulary of data.tokenizer="
                              f"{self.cfg.data.tokenizer} ({tokenizer_vocab} tokens): is it "
                              "this model's tokenizer?")
        self.cfg.model = with_shape(model, shape)
        return shape

    def build_model(self, shape: LlamaShape, head: str = "lm") -> list[torch.nn.Module]:
        """This rank's chunks, weights loaded from model.load when set, wrapped in DDP.

        ``head="scalar"``: a reward/value model (tulu3.model.scalar_head) instead of an LM.
        """
        if head == "scalar":
            from tulu3.model.scalar_head import build_scalar_chunks, load_scalar_weights

            chunks = build_scalar_chunks(self.cfg.model, self.layout, self.groups)
            if self.cfg.model.load:
                load_scalar_weights(self.cfg.model.load, chunks, shape, self.groups)
            return wrap_ddp(chunks, self.layout, self._overlap())
        chunks = build_model_chunks(self.cfg.model, self.layout, self.groups)
        if self.cfg.model.load:
            from tulu3.checkpoint.load import load_into_chunks

            load_into_chunks(self.cfg.model.load, chunks, shape, self.groups)
        return wrap_ddp(chunks, self.layout, self._overlap())

    def _overlap(self) -> CommOverlap:
        return CommOverlap.from_config(self.cfg.parallel, self.layout)

    def build_optimizer(self, chunks: list, total_steps: int) -> None:
        self.optimizer, self.scheduler = build_optimizer(self.cfg, chunks, total_steps)
        unwrap(chunks[0]).config.grad_scale_func = self.optimizer.scale_loss

    # --- running ------------------------------------------------------------------------------

    def fit(self, loop: Loop, chunks: list, shape: LlamaShape, tokenizer_path: str | None) -> dict:
        """Run ``loop`` from the resumed step to its end; returns the last step's record.

        Whether it returns or raises (a stop signal included), the loop is closed
        (:func:`close_loop`), the metrics logger too, and the signal handlers it installed are
        put back.
        """
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(close_loop, loop)
            total = loop.total_steps()
            start_step, counters = self._resume(loop, chunks, shape)
            if self.rank == 0:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                save_config(self.cfg, self.run_dir / "config.yaml")
            log.info(f"{self.stage}: {self.layout.describe()}, steps {start_step}->{total}")
            logger = MetricsLogger(self.run_dir, total, self.rank == 0, start_step,
                                   self.cfg.train.tensorboard, self.cfg.train.wandb,
                                   self.cfg.to_dict())
            cleanup.callback(logger.close)
            cleanup.enter_context(stop_signal_handlers(self._on_stop_signal))
            cleanup.enter_context(memory_snapshot_on_oom(self.cfg.train.memory_snapshot,
                                                         self.run_dir, self.rank))
            record = self._steps(loop, chunks, shape, tokenizer_path, start_step, total,
                                 counters, logger)
        if self.rank == 0 and self.cfg.train.plots and (self.run_dir / "metrics.jsonl").exists():
            from tulu3.metrics import plot_run

            plot_run(self.run_dir)
        return record

    def _steps(self, loop: Loop, chunks: list, shape: LlamaShape, tokenizer_path: str | None,
               start_step: int, total: int, counters: dict, logger: MetricsLogger
               ) -> dict[str, Any]:
        """The optimizer steps start_step -> total, saves and the final eval."""
        train = self.cfg.train
        record: dict[str, Any] = {}
        step = start_step
        skipped = 0  # consecutive steps skipped for a non-finite loss (train.skip_nan)
        end = min(total, train.stop_at_step or total)
        profiler = StepProfiler(self._profile, self.run_dir, self.rank)
        TIMERS.drain()
        heartbeat = Heartbeat()  # names a stalled rank when a collective times out
        while step < end:
            profiler.before_step(step)
            started = time.monotonic()
            metrics = guarded_step(loop, step, heartbeat)
            step += 1
            skipped = skipped + 1 if metrics.get("skipped") else 0
            check_skipped(skipped, step, train.max_skipped_nan)
            seconds = time.monotonic() - started
            counters["tokens"] += metrics.get("tokens", 0)
            counters["elapsed_s"] += seconds
            self._poll_save()
            if train.eval_every and step % train.eval_every == 0 and step < total:
                with synced_params(chunks):
                    metrics.update({f"eval/{k}": v for k, v in loop.evaluate().items()})
            stop = self._stop_reason(step, end, total)
            if stop or step == end or (train.save_every and step % train.save_every == 0):
                self._save(step, loop, chunks, shape, counters, tokenizer_path,
                           wait=bool(stop) or step == end)
            record = self._record(step, metrics, seconds, counters, shape, TIMERS.drain())
            logger.log(record)
            profiler.after_step(step)
            if stop:
                profiler.close()
                return self._stopped(stop, step, record)
        profiler.close()
        self._finish_save()
        if total > start_step and (train.eval_every or loop_has_eval(loop)):
            with synced_params(chunks):
                final_eval = loop.evaluate()
            if final_eval and self.rank == 0:
                record.update({f"eval/{k}": v for k, v in final_eval.items()})
                _rewrite_last(self.run_dir / "metrics.jsonl", record)
        return record

    def _record(self, step: int, metrics: dict, seconds: float, counters: dict,
                shape: LlamaShape, phases: dict[str, float]) -> dict[str, Any]:
        """The step's metrics.jsonl record: the loop's metrics, token counters, per-phase
        times (``time/*``, the loop's own keys win), peak GPU memory and MFU.

        MFU counts the tokens trained on (``trained_tokens`` when the loop reports it: RLVR
        trains on each rollout token once per PPO epoch) over the training phases' time only
        (forward-backward + optimizer; not data, reference passes, generation or saves).
        """
        tokens = metrics.get("tokens", 0)
        trained = metrics.pop("trained_tokens", tokens)
        record = {"step": step, **metrics, "tokens": int(counters["tokens"]),
                  "step_tokens": tokens, "tokens_per_s": tokens / max(seconds, 1e-9),
                  "elapsed_s": round(counters["elapsed_s"], 3)}
        for key, value in phase_metrics(phases).items():
            record.setdefault(key, value)
        peak = _peak_flops()
        train_s = sum(phases.get(name, 0.0) for name in TRAINING_PHASES) or seconds
        if peak:
            seq = self.cfg.data.max_len
            achieved = flops_per_token(shape, seq) * trained / max(train_s, 1e-9)
            record["mfu"] = achieved / (peak * self.layout.world_size)
        return record

    def _resume(self, loop: Loop, chunks: list, shape: LlamaShape) -> tuple[int, dict]:
        counters = {"tokens": 0, "elapsed_s": 0.0}
        clean_partial_saves(self.run_dir)
        path = find_resume(self.run_dir, self.cfg.train.resume)
        if path is None:
            return 0, counters
        state = load_checkpoint(path, self._policy(chunks, shape), self.layout,
                                extra_models(loop))
        loop.load_state_dict(state["loop"])
        counters.update(state.get("counters", {}))
        log.info(f"resumed from {path} at step {state['step']}")
        changes = schedule_changes(state["scheduler"], self.scheduler)
        if changes:
            log.info(f"the LR schedule follows this run's recipe, not the checkpoint's: "
                     f"{', '.join(changes)}")
        return int(state["step"]), counters

    def _save(self, step: int, loop: Loop, chunks: list, shape: LlamaShape, counters: dict,
              tokenizer_path: str | None, wait: bool = True) -> None:
        """Save step ``step``: blocking, or with train.async_save begun here and completed in
        a later step's :meth:`_poll_save` (or here when ``wait``: the last step, a stop)."""
        self._finish_save()  # one save in flight at a time
        started = time.monotonic()
        with self._disk_errors(), phase("save"), synced_params(chunks):
            self._pending = start_checkpoint(
                self.run_dir, step, self._policy(chunks, shape),
                {"loop": loop.state_dict(), "counters": counters, "stage": self.stage},
                self.layout, self.cfg.model.dtype, tokenizer_path, self.cfg.train.keep_last,
                extra_models(loop), background=self.cfg.train.async_save)
        if not self.cfg.train.async_save or wait:
            self._finish_save()
            log.info(f"saved step {step} ({time.monotonic() - started:.1f} s)")
        else:
            log.info(f"saving step {step} in the background ({time.monotonic() - started:.1f} s "
                     "blocked)")

    def _poll_save(self) -> None:
        """Complete an asynchronous save once every rank has written its files."""
        if self._pending is not None and not any_rank(not self._pending.written()):
            self._finish_save()

    def _finish_save(self) -> None:
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        with self._disk_errors(), phase("save"):
            path = pending.finish()
        if self.cfg.train.async_save:
            log.info(f"saved {path}")

    @contextlib.contextmanager
    def _disk_errors(self) -> Iterator[None]:
        try:
            yield
        except BaseException as err:  # torch reports a full disk as "unexpected pos"
            full = None if isinstance(err, (KeyboardInterrupt, SystemExit)) else \
                disk_full_error(self.run_dir / "checkpoints", err)
            if full is not None:
                raise full from err
            raise

    def _policy(self, chunks: list, shape: LlamaShape) -> TrainedModel:
        return TrainedModel(chunks, self.optimizer, self.scheduler, shape)

    def _on_stop_signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signum

    def _should_stop(self) -> bool:
        """Any rank got SIGTERM/SIGINT -> every rank saves and stops after this step."""
        stopping = any_rank(self._stop_signal is not None)
        if stopping and self._stop_signal is None:
            self._stop_signal = signal.SIGTERM
        return stopping

    def _stop_reason(self, step: int, end: int, total: int) -> str | None:
        """Why every rank stops after ``step`` before the run's end (None: go on)."""
        if self._should_stop():
            return "signal"
        minutes = self.cfg.train.exit_after_minutes
        if minutes is not None and step < total and any_rank(
                time.monotonic() - self._started >= minutes * 60):
            return "time"
        if step == end < total:
            return "stop_at_step"
        return None

    def _stopped(self, reason: str, step: int, record: dict) -> dict:
        """A signal raises SystemExit (non-zero); a time limit or stop_at_step returns."""
        resume = "resume with the same command (train.resume=auto)"
        if reason == "signal":
            raise SystemExit(f"[tulu3] stopped by signal {self._stop_signal} after step "
                             f"{step}; {resume}")
        why = (f"train.exit_after_minutes={self.cfg.train.exit_after_minutes} reached"
               if reason == "time" else f"train.stop_at_step={self.cfg.train.stop_at_step}")
        log.info(f"{why}: saved and stopped after step {step}; {resume}")
        return record


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
"""The signals after which every rank saves and stops (:meth:`Trainer._should_stop`)."""


@contextlib.contextmanager
def stop_signal_handlers(handler: Callable[[int, Any], None],
                         signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """``handler`` for ``signals`` while the block runs; the previous handlers are back after
    it, whether it returns or raises."""
    previous = {sig: signal.getsignal(sig) for sig in signals}
    try:
        for sig in signals:
            signal.signal(sig, handler)
        yield
    finally:
        for sig, old in previous.items():
            # None: a handler not installed from Python; the default is the closest we can do
            signal.signal(sig, signal.SIG_DFL if old is None else old)


def guarded_step(loop: Loop, step: int, heartbeat: Heartbeat) -> dict[str, Any]:
    """``loop.train_step(step)``; a collective timeout names the ranks that never started it and
    those that started it but never left it (stuck inside, e.g. in a data reader or verifier)."""
    heartbeat.beat(step)
    try:
        return loop.train_step(step)
    except Exception as err:
        fault = heartbeat.fault(step, err)
        if fault is not None:
            raise fault from err
        raise


def check_skipped(skipped: int, step: int, cap: int) -> None:
    """Stop (a :class:`RunFault`) after ``cap`` consecutive skipped steps (0: no cap): a run whose
    loss stays NaN is diverging, and skipping on would train nothing and exit 0."""
    if cap and skipped >= cap:
        raise RunFault(f"steps {step - skipped + 1}-{step}: {skipped} consecutive steps skipped "
                       f"for a non-finite loss (train.max_skipped_nan={cap}): the run diverges; "
                       "lower optim.lr, check the data, or resume from an earlier checkpoint")


def check_run_control(cfg: Config) -> tuple[int, int] | None:
    """The step window of train.profile (refused before anything is built when malformed;
    exit_after_minutes and stop_at_step have ranges in tulu3.config.RANGES)."""
    try:
        return parse_profile(cfg.train.profile)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def close_loop(loop: Loop) -> None:
    """Call the loop's ``close()`` if it has one (what it holds: RLVR's verifier pool)."""
    close = getattr(loop, "close", None)
    if close is not None:
        close()


def loop_has_eval(loop: Loop) -> bool:
    return bool(getattr(loop, "has_eval", False))


def extra_models(loop: Loop) -> dict[str, TrainedModel]:
    """The loop's trained models besides the policy (none unless it has ``extra_models``)."""
    method = getattr(loop, "extra_models", None)
    return method() if method is not None else {}


def _rewrite_last(path: Path, record: dict) -> None:
    import json

    lines = path.read_text().splitlines()
    lines[-1] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n")


def _peak_flops() -> float | None:
    """Dense bf16 peak of this GPU in FLOP/s (None on CPU or an unknown GPU)."""
    if not torch.cuda.is_available():
        return None
    from tulu3.planner.hardware import peak_bf16_flops  # the planner's table

    return peak_bf16_flops(torch.cuda.get_device_name())
