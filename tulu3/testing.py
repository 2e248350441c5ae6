"""Run one test function on N gloo processes (like OLMo-core's ``run_distributed_test``).

Every parallel test in tulu3 goes through :func:`run_distributed_test`, so process start-up,
the rendezvous and error reporting live in one place.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from tulu3.parallel.init import free_port  # also tulu3.testing.free_port, for the tests


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, kwargs: dict,
            results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        value = fn(*args, **kwargs)
        # Plain pickle: torch's queue reductions share memory by file descriptor, which dies
        # with this process before the parent reads it.
        results.put((rank, "ok", pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        _teardown()


def _teardown() -> None:
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None:  # only when the test used megatron (importing it costs ~3 s)
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def run_distributed_test(fn: Callable, world_size: int, *args: Any, timeout_s: float = 300,
                         **kwargs: Any) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` forked gloo processes.

    Returns the per-rank return values (index = rank); raises ``AssertionError`` with the failing
    ranks' tracebacks when any rank raises, and ``TimeoutError`` when a rank hangs.
    """
    ctx = mp.get_context("fork")
    results = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, kwargs, results))
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


def _kill(procs: list) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.kill()


def hf_llama_config(shape: Any, **overrides: Any) -> Any:
    """A transformers LlamaConfig with the shape of a tulu3 LlamaShape (Llama 3.1 rope scaling)."""
    from transformers import LlamaConfig

    rope = ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
            if shape.rope_scaling else None)
    kwargs = dict(vocab_size=shape.vocab, hidden_size=shape.hidden,
                  intermediate_size=shape.ffn_hidden, num_hidden_layers=shape.layers,
                  num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                  rms_norm_eps=shape.norm_eps, rope_theta=shape.rope_theta, rope_scaling=rope,
                  tie_word_embeddings=shape.tied_embeddings,
                  max_position_embeddings=shape.max_seq_len, attention_bias=False,
                  mlp_bias=False, bos_token_id=0, eos_token_id=1)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_hf_llama(shape: Any, seed: int = 0) -> Any:
    """A randomly initialised transformers LlamaForCausalLM (fp32, eval mode) of ``shape``.

    Norm weights are randomised too, so a swapped norm cannot hide behind all-ones weights.
    """
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_llama_config(shape)).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model
