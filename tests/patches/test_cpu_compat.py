"""One test per symbol the CPU compat layer patches: each fails loudly if megatron-core moves
it (so the layer would silently stop applying), and checks the patched behaviour.

The checks run in a forked child (as every tulu3 process installs the layer itself): the layer
must never be installed in the pytest process, whose later forks would inherit it half-way.
"""

from __future__ import annotations

import pytest
import torch

from tulu3.patches import cpu

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the layer is CPU-only")


def _run_in_child(names: list[str]) -> dict[str, str | None]:
    """Every check in one child; returns check -> None (passed) or its error."""
    assert cpu.install() is True and cpu.is_installed()
    results: dict[str, str | None] = {}
    for name in names:
        try:
            globals()[name]()
            results[name] = None
        except Exception as err:  # noqa: BLE001 - reported per check by the parent
            results[name] = f"{type(err).__name__}: {err}"
    return results


def _checks() -> list[str]:
    return [name for name in globals() if name.startswith("check_")]


def check_current_device_is_cpu() -> None:
    assert torch.cuda.current_device() == "cpu"
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"


def check_synchronize_and_empty_cache_are_no_ops() -> None:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def check_factories_map_cuda_to_cpu() -> None:
    for name in cpu.FACTORIES:
        assert getattr(getattr(torch, name), "__tulu3_cpu_patch__", False), name
    assert torch.zeros(3, device="cuda").device.type == "cpu"
    assert torch.arange(4, device="cuda:0").device.type == "cpu"
    assert torch.tensor([1.0]).to("cuda").device.type == "cpu"
    assert torch.ones(2).cuda().device.type == "cpu"


def check_tensor_type_reports_cuda_names() -> None:
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.ones(1).type(torch.float64).dtype == torch.float64


def check_cuda_rng_state_is_the_cpu_generator() -> None:
    from megatron.core.tensor_parallel import random as mp_random

    torch.manual_seed(3)
    state = torch.cuda.get_rng_state()
    first = torch.rand(3)
    torch.cuda.set_rng_state(state)
    assert torch.equal(torch.rand(3), first)
    mp_random._set_cuda_rng_state(mp_random._get_cuda_rng_state())
    assert torch.equal(mp_random._get_cuda_rng_state(), torch.get_rng_state())


def check_megatron_rng_tracker_forks_reproducibly() -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("tulu3-test", 7)
    with tracker.fork("tulu3-test"):
        a = torch.rand(2)
    tracker.reset()
    tracker.add("tulu3-test", 7)
    with tracker.fork("tulu3-test"):
        b = torch.rand(2)
    assert torch.equal(a, b)


def check_async_writer_queue_is_patched() -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    queue = filesystem_async._get_write_results_queue()
    assert isinstance(queue, cpu._PatientQueue)
    queue.put({"ok": 1})
    assert queue.get_nowait() == {"ok": 1}


def check_p2p_shape_exchange_is_patched() -> None:
    from megatron.core.pipeline_parallel import p2p_communication

    method = p2p_communication.P2PCommunicator._communicate_shapes
    assert method is cpu._communicate_shapes


def check_patched_megatron_symbols_exist_upstream() -> None:
    """The names the layer replaces still exist in megatron-core (else it moved them)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron.core.optimizer import distrib_optimizer
    from megatron.core.pipeline_parallel import p2p_communication
    from megatron.core.tensor_parallel import random as mp_random

    assert hasattr(mp_random, "_get_cuda_rng_state") and hasattr(mp_random, "_set_cuda_rng_state")
    assert hasattr(filesystem_async, "_get_write_results_queue")
    assert hasattr(p2p_communication.P2PCommunicator, "_communicate_shapes")
    for name in ("state_dict", "load_state_dict", "_set_main_param_and_optimizer_states"):
        assert hasattr(distrib_optimizer.DistributedOptimizer, name), name


CHECKS = _checks()


@pytest.fixture(scope="module")
def results() -> dict[str, str | None]:
    from tulu3.testing import run_distributed_test

    return run_distributed_test(_run_in_child, 1, CHECKS)[0]


@pytest.mark.parametrize("check", CHECKS)
def test_patched_symbol(results: dict, check: str) -> None:
    assert results[check] is None, results[check]
