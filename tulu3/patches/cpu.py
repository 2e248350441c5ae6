"""Make megatron-core run on CPU with the gloo backend when CUDA is absent.

Megatron-Core assumes CUDA in many places (``torch.cuda.current_device()`` as a device, CUDA RNG
state for its tensor-parallel RNG tracker, ``.cuda()`` calls, ``Tensor.type()`` string checks in the
optimizer). Like Ascend's ``transfer_to_npu``, this module retargets those calls, here to the CPU.
It is installed only when ``torch.cuda.is_available()`` is false, and every patched symbol has a
test (tests/patches/test_cpu_compat.py) that fails loudly when a megatron-core release moves it.

Patched (see DESIGN.md for how each was found):
- ``torch.cuda.current_device`` -> ``"cpu"``; ``torch.cuda.synchronize`` / ``empty_cache`` -> no-op
- ``torch.cuda.get_rng_state`` / ``set_rng_state`` / ``manual_seed`` and megatron's
  ``tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state`` -> the CPU generator
- ``device="cuda"`` (or ``cuda:N``) passed to torch tensor factories -> CPU
- ``Tensor.cuda()`` -> identity
- ``Tensor.type()`` without arguments reports ``torch.cuda.*Tensor`` (megatron compares the string
  in clip_grad_by_total_norm_fp32, the FP16 optimizer and the DistributedOptimizer)
- megatron's ``dist_checkpointing`` async writer: a fork-context results queue instead of a
  spawn-context Manager that re-imports ``__main__`` (15 s a save, or a hang without a main guard)
- ``P2PCommunicator._communicate_shapes`` (variable sequence lengths): distinct tags per
  direction. With PP=2 the previous and next stage are one rank; gloo matches same-tag messages
  to one peer in arrival order and swaps activation and gradient shapes. The tensors themselves
  go unbatched (tulu3.model.build sets batch_p2p_comm=False without CUDA) for the same reason:
  batched, they train WRONG silently (DESIGN.md).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch

_INSTALLED = False

# Tensor factories that accept ``device=``; "cuda" is rewritten to "cpu" for them.
FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "arange", "rand", "randn", "randint", "randperm",
    "empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like", "as_tensor",
    "empty_strided", "linspace", "eye",
)

_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


def _cpu_device(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        # No accelerator, no pinned memory (megatron's CP RoPE slicing asks for it).
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    wrapper.__tulu3_cpu_patch__ = True  # type: ignore[attr-defined]
    return wrapper


def _tensor_type(original: Callable) -> Callable:
    @functools.wraps(original)
    def type_(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kw: Any) -> Any:
        if dtype is None and not kw:
            return _TYPE_NAMES.get(self.dtype, original(self))
        if isinstance(dtype, str) and dtype.startswith("torch.cuda."):
            dtype = dtype.replace("torch.cuda.", "torch.")
        return original(self, dtype, non_blocking, **kw)

    return type_


def _tensor_to(original: Callable) -> Callable:
    @functools.wraps(original)
    def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        args = tuple("cpu" if _is_cuda_device(a) and not isinstance(a, int) else a for a in args)
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return original(self, *args, **kwargs)

    return to


def _patch_torch() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.set_device = lambda *a, **k: None
    cuda.get_rng_state = lambda device=None: torch.get_rng_state()
    cuda.set_rng_state = lambda state, device=None: torch.set_rng_state(state)
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    cuda.manual_seed = lambda seed: None  # the CPU generator is seeded by torch.manual_seed
    cuda.manual_seed_all = lambda seed: None
    cuda.nvtx.range_push = lambda *a, **k: None
    cuda.nvtx.range_pop = lambda *a, **k: None
    for name in FACTORIES:
        setattr(torch, name, _cpu_device(getattr(torch, name)))
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.Tensor.type = _tensor_type(torch.Tensor.type)
    torch.Tensor.to = _tensor_to(torch.Tensor.to)


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as mp_random

    def get_state(*args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.get_rng_state()

    def set_state(new_state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        torch.set_rng_state(new_state)

    mp_random._get_cuda_rng_state = get_state
    mp_random._set_cuda_rng_state = set_state
    _patch_async_writer()
    _patch_p2p()


class _PatientQueue:
    """A fork-context queue whose ``get_nowait`` waits a little.

    megatron reads the writer's results with ``get_nowait`` right after the write; a
    multiprocessing.Queue hands items over through a feeder thread, so an item put a moment ago
    (by this very process when there is one writer) may not be readable yet.
    """

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def put(self, item: Any) -> None:
        self._inner.put(item)

    def get(self, *args: Any, **kwargs: Any) -> Any:
        return self._inner.get(*args, **kwargs)

    def get_nowait(self) -> Any:
        return self._inner.get(timeout=60)

    def empty(self) -> bool:
        return self._inner.empty()


def _patch_async_writer() -> None:
    """Give dist_checkpointing's writer a fork-context queue (spawn re-imports ``__main__``)."""
    import multiprocessing as mp

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    manager_attr = "_get_write_results_queue"
    if not hasattr(filesystem_async, manager_attr):
        raise RuntimeError(f"megatron moved {filesystem_async.__name__}.{manager_attr}")
    queues: dict[int, _PatientQueue] = {}

    def get_queue() -> Any:
        # One queue per process: a forked rank must not share its parent's (or a sibling's).
        pid = os.getpid()
        if pid not in queues:
            queues[pid] = _PatientQueue(mp.get_context("fork").Queue())
        return queues[pid]

    setattr(filesystem_async, manager_attr, get_queue)


_FORWARD_TAG, _BACKWARD_TAG = 1, 2


def _communicate_shapes(self: Any, tensor_send_next: Any, tensor_send_prev: Any,
                        recv_prev: bool, recv_next: bool) -> tuple[list[int], list[int]]:
    """megatron's shape exchange with one tag per direction (see the module docstring)."""
    import torch.distributed as dist

    def shape_of(tensor: torch.Tensor) -> torch.Tensor:
        return torch.tensor(tensor.size(), dtype=torch.int64)

    recv_prev_shape = torch.empty(3, dtype=torch.int64) if recv_prev else None
    recv_next_shape = torch.empty(3, dtype=torch.int64) if recv_next else None
    requests = []
    # Activations flow prev -> next (forward tag); gradients next -> prev (backward tag).
    if tensor_send_prev is not None:
        requests.append(dist.isend(shape_of(tensor_send_prev), self.prev_rank, self.pp_group,
                                   tag=_BACKWARD_TAG))
    if recv_prev_shape is not None:
        requests.append(dist.irecv(recv_prev_shape, self.prev_rank, self.pp_group,
                                   tag=_FORWARD_TAG))
    if tensor_send_next is not None:
        requests.append(dist.isend(shape_of(tensor_send_next), self.next_rank, self.pp_group,
                                   tag=_FORWARD_TAG))
    if recv_next_shape is not None:
        requests.append(dist.irecv(recv_next_shape, self.next_rank, self.pp_group,
                                   tag=_BACKWARD_TAG))
    for request in requests:
        request.wait()
    return ([0, 0, 0] if recv_prev_shape is None else recv_prev_shape.tolist(),
            [0, 0, 0] if recv_next_shape is None else recv_next_shape.tolist())


def _patch_p2p() -> None:
    from megatron.core.pipeline_parallel import p2p_communication

    communicator = p2p_communication.P2PCommunicator
    if not hasattr(communicator, "_communicate_shapes"):
        raise RuntimeError("megatron moved P2PCommunicator._communicate_shapes")
    communicator._communicate_shapes = _communicate_shapes


def install(force: bool = False) -> bool:
    """Install the compat layer once; returns True when it is active. No-op when CUDA exists."""
    global _INSTALLED
    if _INSTALLED:
        return True
    if torch.cuda.is_available() and not force:
        return False
    _patch_torch()
    _patch_megatron()
    _INSTALLED = True
    return True


def is_installed() -> bool:
    return _INSTALLED

