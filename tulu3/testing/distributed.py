"""Run one test function on N gloo processes (like OLMo-core's ``run_distributed_test``).

Every parallel test in tulu3 goes through :func:`run_distributed_test`, so process start-up,
the rendezvous and error reporting live in one place.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from tulu3.parallel.init import (  # free_port: also tulu3.testing.free_port, for the tests
    destroy_model_parallel,
    free_port,
)


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, kwargs: dict,
            results: Any, backend: str | None = "gloo") -> None:
    if backend is not None:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                          LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        if backend is not None:
            dist.init_process_group(backend, rank=rank, world_size=world_size)
        value = fn(*args, **kwargs)
        # Plain pickle: torch's queue reductions share memory by file descriptor, which dies
        # with this process before the parent reads it.
        results.put((rank, "ok", pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        _teardown()


def _teardown() -> None:
    destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def run_distributed_test(fn: Callable, world_size: int, *args: Any, timeout_s: float = 300,
                         backend: str | None = "gloo", **kwargs: Any) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` forked gloo processes.

    Returns the per-rank return values (index = rank); raises ``AssertionError`` with the failing
    ranks' tracebacks when any rank raises, and ``TimeoutError`` when a rank hangs.
    """
    ctx = mp.get_context("fork")
    results = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_worker,
                         args=(r, world_size, port, fn, args, kwargs, results, backend))
             for r in range(world_size)]
    for proc in procs:
        proc.start()
    outputs: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout_s
    while len(outputs) + len(errors) < world_size:
        if errors:  # the other ranks are likely blocked in a collective: give them a moment
            deadline = min(deadline, time.monotonic() + 10)
        if time.monotonic() > deadline and errors:
            break
        if time.monotonic() > deadline:
            _kill(procs)
            raise TimeoutError(f"distributed test timed out after {timeout_s} s")
        if results.empty():
            if any(p.exitcode not in (None, 0) for p in procs) and results.empty():
                time.sleep(0.5)
                if results.empty():
                    _kill(procs)
                    codes = [p.exitcode for p in procs]
                    raise AssertionError(f"a rank died without reporting; exit codes {codes}")
            time.sleep(0.05)
            continue
        rank, status, value = results.get()
        if status == "ok":
            outputs[rank] = pickle.loads(value)
        else:
            errors.append(f"--- rank {rank} ---\n{value}")
    for proc in procs:
        proc.join(timeout=30)
    _kill(procs)
    if errors:
        raise AssertionError("distributed test failed:\n" + "\n".join(errors))
    return [outputs[r] for r in range(world_size)]


def run_in_child(fn: Callable, *args: Any, timeout_s: float = 300, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in one forked process without a process group (a dry run that
    makes its own fake world, anything that installs megatron's CPU patches); its return value,
    or AssertionError with its traceback. The pytest process itself stays unpatched."""
    return run_distributed_test(fn, 1, *args, timeout_s=timeout_s, backend=None, **kwargs)[0]


def _kill(procs: list) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.kill()
