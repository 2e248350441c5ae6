"""Start torch.distributed and megatron's parallel_state for a layout."""

from __future__ import annotations

import os
import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from tulu3 import patches
from tulu3.config import Config
from tulu3.parallel.groups import ProcessGroups
from tulu3.parallel.layout import ParallelLayout, check_backend_limits, make_layout


def free_port() -> int:
    """A TCP port that was free a moment ago on localhost."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(backend: str = "auto", timeout_min: float = 30) -> tuple[int, int]:
    """Initialise torch.distributed from torchrun's environment (or as a single process).

    ``timeout_min``: how long a collective waits for a stalled rank before the job fails
    (``train.collective_timeout_min``). Returns (rank, world_size). gloo on CPU, nccl with
    CUDA; installs the CPU compat layer when CUDA is absent.
    """
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "gloo" and not torch.cuda.is_available():
        patches.install()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(free_port())
        dist.init_process_group(backend, rank=int(os.environ.get("RANK", "0")),
                                world_size=int(os.environ.get("WORLD_SIZE", "1")),
                                timeout=timedelta(minutes=timeout_min))
    return dist.get_rank(), dist.get_world_size()


def init_model_parallel(layout: ParallelLayout, seed: int) -> None:
    """Create megatron's TP/PP/CP/DP groups and seed the tensor-parallel RNG tracker."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    patches.install()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        **layout.megatron_init_args(), create_gloo_process_groups=torch.cuda.is_available())
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_model_parallel() -> None:
    """Tear megatron's groups down, if megatron was imported at all (importing it costs ~3 s)."""
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None:
        parallel_state.destroy_model_parallel()


def setup_parallel(cfg: Config) -> tuple[ParallelLayout, ProcessGroups]:
    """init_distributed + validate the layout + megatron groups: the start of every run.

    Returns the layout and this rank's groups (the only handle the rest of tulu3 gets on
    megatron's process state)."""
    # Validate before starting anything: a bad layout fails in a second, not after start-up.
    layout = make_layout(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    backend = cfg.parallel.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    check_backend_limits(cfg, layout, backend)
    init_distributed(cfg.parallel.backend, cfg.train.collective_timeout_min)
    init_model_parallel(layout, cfg.train.seed)
    return layout, ProcessGroups.current()
