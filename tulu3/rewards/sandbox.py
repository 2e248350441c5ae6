"""A pool of verifier worker processes with a time limit per item.

Verifying model text is running untrusted input through sympy and regexes: a response can make a
verifier run for minutes, eat memory, or (in a user's verifier) crash the interpreter. None of that
may stall or kill the trainer, so every item runs in a worker process:

- each worker is a fresh interpreter (``subprocess`` + a socket pair, not ``fork``): nothing of the
  trainer's threads, gloo sockets or CUDA state is copied, and, unlike multiprocessing's spawn, the
  trainer's ``__main__`` (torch, megatron) is not re-imported in the child;
- an item gets ``timeout_s``: the worker's own timer (SIGALRM) interrupts Python code then and
  answers ``"timeout"``, keeping the worker; if the worker does not answer ``kill_grace_s`` later
  (stuck in C code, signals blocked), the parent kills it and starts a replacement;
- a worker that dies (segfault, ``os._exit``, OOM) fails only the item it was running, with
  ``"error: worker died ..."``; other items are re-sent; exceptions give ``"error: Type: msg"``;
- a worker's address space is capped (``memory_mb``) so a runaway expansion raises MemoryError
  in the worker instead of waking the kernel's OOM killer next to the trainer.

Verifiers are found in the worker by ``(module, qualname)``: built-ins are there already, a user's
verifier must live in an importable module (see :func:`tulu3.rewards.register_verifier`).
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

from tulu3.rewards.base import VerifyResult, as_result, get_verifier

if TYPE_CHECKING:  # typing.Self is Python 3.11+; annotations are not evaluated at runtime
    from typing import Self

__all__ = ["PoolStats", "VerifierPool"]

_BOOT = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[2]); "
    "from tulu3.rewards.sandbox import _worker_main; "
    "_worker_main(int(sys.argv[1]), float(sys.argv[3]), int(sys.argv[4]))"
)
_BATCH = 16  # items per message to a worker
_BATCH_CHARS = 32_768  # text per message, except a lone item sent to an idle worker
_MAX_INFLIGHT = 2 * _BATCH  # queued per worker: 2 x 32 KB stays under a socket buffer (~200 KB)
_MAX_FIELD = 1000  # extracted/reason strings sent back are cut to this many characters
_START_FAILURES = 3  # consecutive workers dying before ready: give up with an error


@dataclasses.dataclass
class PoolStats:
    """Counters over the pool's life: items scored, timeouts and errors among them (both also
    scored as incorrect), and workers replaced after a kill or a death."""

    scored: int = 0
    timeouts: int = 0
    errors: int = 0
    restarts: int = 0


# --- worker side ---------------------------------------------------------------------------------

class _SoftTimeout(BaseException):
    """Raised by SIGALRM inside a verifier. A BaseException, so a verifier's ``except Exception``
    (sympy wrappers have them) cannot swallow it and report a wrong answer instead."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise _SoftTimeout()


def _limit_memory(memory_mb: int) -> None:
    if memory_mb > 0:
        import resource

        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _warm_up() -> None:
    """Load sympy's LaTeX parser and langdetect's profiles before saying ready, so the first item
    does not spend its time limit on imports."""
    from tulu3.rewards import ifeval_constraints, math_sympy

    math_sympy.symbolic_equal("x^2+2x+1", "(x+1)^2")  # the first simplify sets up sympy's polys
    ifeval_constraints.check_response_language("This is a short English sentence.", "en")


def _resolve(ref: tuple[str, str], cache: dict) -> Any:
    fn = cache.get(ref)
    if fn is None:
        module, qualname = ref
        fn = importlib.import_module(module)
        for part in qualname.split("."):
            fn = getattr(fn, part)
        cache[ref] = fn
    return fn


def _clip(s: str | None) -> str | None:
    return s if s is None or len(s) <= _MAX_FIELD else s[:_MAX_FIELD] + "..."


def _run_task(task: tuple, cache: dict, timeout_s: float) -> VerifyResult:
    ref, response, ground_truth = task
    # A previous verifier may have blocked SIGALRM or replaced its handler: undo that first, or
    # every later item could only end by a kill.
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            result = as_result(_resolve(ref, cache)(response, ground_truth))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _SoftTimeout:
        return VerifyResult(False, None, "timeout")
    except BaseException as e:  # noqa: BLE001 - a verifier's failure is an item's result
        return VerifyResult(False, None, _clip(f"error: {type(e).__name__}: {e}"))
    return VerifyResult(result.correct, _clip(result.extracted), _clip(result.reason))


def _worker_main(fd: int, timeout_s: float, memory_mb: int) -> None:
    """Worker loop: receive a list of ``(ref, response, ground_truth)``, send a VerifyResult per
    item; None or EOF (the parent is gone) ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _limit_memory(memory_mb)
    conn = Connection(fd)
    _warm_up()
    cache: dict = {}
    try:
        conn.send(("ready", os.getpid()))
        while (batch := conn.recv()) is not None:
            for task in batch:  # one message per result: the parent restarts its clock on each
                conn.send(("result", _run_task(task, cache, timeout_s)))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the parent is gone


# --- parent side ---------------------------------------------------------------------------------

@dataclasses.dataclass
class _Worker:
    proc: subprocess.Popen
    conn: Connection
    started: float
    ready: bool = False
    inflight: collections.deque = dataclasses.field(default_factory=collections.deque)
    deadline: float = float("inf")


def _shutdown(workers: list[_Worker], owner_pid: int) -> None:
    """Stop workers: ask politely, then kill (also run by a finalizer at interpreter exit). A
    process forked from the owner (a data-loader worker) inherits the finalizer but must not stop
    the owner's workers."""
    if os.getpid() != owner_pid:
        return
    for w in workers:
        try:
            w.conn.send(None)
        except OSError:
            pass
    end = time.monotonic() + 1.0
    for w in workers:
        try:
            w.proc.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()
        w.conn.close()
    workers.clear()


class VerifierPool:
    """Score ``(dataset, response, ground_truth)`` items in ``workers`` processes, each item under
    ``timeout_s`` (see the module docstring). Use as a context manager or call :meth:`close`.

    Args:
        workers: number of worker processes.
        timeout_s: time limit per item; a timeout scores ``correct=False, reason="timeout"``.
        kill_grace_s: how long after ``timeout_s`` an unresponsive worker is killed.
        memory_mb: address-space cap per worker (0 for none).
        start_timeout_s: how long a new worker may take to import and warm up.
    """

    def __init__(self, workers: int = 2, timeout_s: float = 5.0, *, kill_grace_s: float = 0.5,
                 memory_mb: int = 4096, start_timeout_s: float = 120.0) -> None:
        if workers < 1 or timeout_s <= 0:
            raise ValueError("workers must be >= 1 and timeout_s > 0")
        self.num_workers, self.timeout_s, self.kill_grace_s = workers, timeout_s, kill_grace_s
        self.memory_mb, self.start_timeout_s = memory_mb, start_timeout_s
        self._stats = PoolStats()
        self._lock = threading.Lock()
        self._start_failures = 0
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _shutdown, self._workers, os.getpid())
        for _ in range(workers):
            self._workers.append(self._spawn())

    @property
    def stats(self) -> PoolStats:
        """A copy of the counters (scored, timeouts, errors, restarts)."""
        return dataclasses.replace(self._stats)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop all workers. The pool cannot be used afterwards."""
        self._finalizer()

    def _spawn(self) -> _Worker:
        parent_sock, child_sock = socket.socketpair()
        paths = [p or os.getcwd() for p in sys.path]
        cmd = [sys.executable, "-c", _BOOT, str(child_sock.fileno()), json.dumps(paths),
               str(self.timeout_s), str(self.memory_mb)]
        proc = subprocess.Popen(cmd, pass_fds=[child_sock.fileno()], stdin=subprocess.DEVNULL)
        child_sock.close()
        return _Worker(proc, Connection(parent_sock.detach()), time.monotonic())

    def _replace(self, w: _Worker, pending: collections.deque, kill: bool) -> None:
        """Retire ``w`` (killing it if asked), re-queue what it had not started, start another."""
        if kill:
            w.proc.kill()
        try:
            w.proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()
        w.conn.close()
        pending.extendleft(reversed(w.inflight))
        w.inflight.clear()
        self._workers[self._workers.index(w)] = self._spawn()
        self._stats.restarts += 1

    def score(self, items: list[tuple[str, str, str]]) -> list[VerifyResult]:
        """One VerifyResult per ``(dataset, response, ground_truth)``, in order. Raises ValueError
        for an unknown dataset before anything runs; never raises for an item's content."""
        if not self._workers:
            raise RuntimeError("VerifierPool is closed")
        tasks = [(self._ref(d), r, g) for d, r, g in items]
        results: list[VerifyResult | None] = [None] * len(tasks)
        pending = collections.deque(range(len(tasks)))
        with self._lock:
            try:
                while pending or any(w.inflight for w in self._workers):
                    self._dispatch(pending, tasks)
                    self._collect(pending, results)
            except BaseException:
                # Interrupted (Ctrl-C, a start-up failure): results of this call must not reach
                # the next one, so retire every worker that still holds items of it.
                for w in [w for w in self._workers if w.inflight]:
                    self._replace(w, collections.deque(), kill=True)
                raise
        return results  # type: ignore[return-value]

    @staticmethod
    def _ref(dataset: str) -> tuple[str, str]:
        fn = get_verifier(dataset)
        module, qualname = fn.__module__, fn.__qualname__
        if module == "__main__" or "<locals>" in qualname:
            raise ValueError(f"verifier {module}.{qualname} for {dataset!r} cannot be imported by "
                             "pool workers: define it at module level in an importable module")
        return module, qualname

    def _dispatch(self, pending: collections.deque, tasks: list) -> None:
        """Send ready workers batches of items (one message, fewer round trips for cheap items).

        Batches are small (``_BATCH_CHARS``) except the first to an idle worker, and at most
        ``_MAX_INFLIGHT`` items wait per worker: a send blocks once the socket buffer is full, and
        a worker stuck on an item does not read, so only what fits the buffer is queued behind it.
        """
        now = time.monotonic()
        ready = sum(w.ready for w in self._workers)
        # Spread a short queue over all workers rather than batching it into the first one.
        size = max(1, min(_BATCH, -(-len(pending) // max(1, ready))))
        for w in self._workers:
            while pending and w.ready and len(w.inflight) + size <= _MAX_INFLIGHT:
                batch = self._take_batch(pending, tasks, size, idle=not w.inflight)
                if not batch:
                    break
                try:
                    w.conn.send([tasks[i] for i in batch])
                except OSError:  # died between items: _collect sees its EOF and replaces it
                    pending.extendleft(reversed(batch))
                    break
                if not w.inflight:
                    w.deadline = now + self.timeout_s + self.kill_grace_s
                w.inflight.extend(batch)

    @staticmethod
    def _take_batch(pending: collections.deque, tasks: list, size: int, idle: bool) -> list[int]:
        batch: list[int] = []
        chars = 0
        while pending and len(batch) < size:
            _, response, gt = tasks[pending[0]]
            chars += len(response) + len(gt)
            if chars > _BATCH_CHARS and (batch or not idle):
                break
            batch.append(pending.popleft())
        return batch

    def _collect(self, pending: collections.deque, results: list) -> None:
        """Wait for results, readiness or deaths until the nearest deadline, then enforce it."""
        now = time.monotonic()
        horizon = min([w.deadline for w in self._workers if w.inflight]
                      + [w.started + self.start_timeout_s for w in self._workers if not w.ready]
                      + [now + 1.0])
        # Idle workers are watched too: their socket turns readable only if they die.
        by_conn = {w.conn: w for w in self._workers}
        for conn in wait(list(by_conn), timeout=max(0.0, horizon - now)):
            self._drain(by_conn[conn], pending, results)
        now = time.monotonic()
        for w in list(self._workers):
            if w.inflight and now >= w.deadline:
                self._record(results, w.inflight.popleft(), VerifyResult(False, None, "timeout"))
                self._replace(w, pending, kill=True)
            elif not w.ready and now >= w.started + self.start_timeout_s:
                raise RuntimeError(f"a verifier worker did not start in {self.start_timeout_s}s")

    def _drain(self, w: _Worker, pending: collections.deque, results: list) -> None:
        """Read every message ``w`` has sent; on EOF the worker died: fail its current item."""
        try:
            while w.conn.poll():
                kind, payload = w.conn.recv()
                if kind == "ready":
                    w.ready, self._start_failures = True, 0
                    continue
                self._record(results, w.inflight.popleft(), payload)
                # The next queued item starts now in the worker: its clock starts now too.
                w.deadline = time.monotonic() + self.timeout_s + self.kill_grace_s
        except (EOFError, OSError):
            self._on_death(w, pending, results)

    def _on_death(self, w: _Worker, pending: collections.deque, results: list) -> None:
        try:
            code = w.proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            code = None
        if not w.ready:
            self._start_failures += 1
            if self._start_failures >= _START_FAILURES:
                raise RuntimeError(f"verifier workers keep dying at start (exit code {code}); "
                                   "see their stderr above")
        if w.inflight:
            died = VerifyResult(False, None, f"error: worker died (exit code {code})")
            self._record(results, w.inflight.popleft(), died)
        self._replace(w, pending, kill=False)

    def _record(self, results: list, idx: int, result: VerifyResult) -> None:
        results[idx] = result
        self._stats.scored += 1
        self._stats.timeouts += result.timed_out
        self._stats.errors += result.errored
