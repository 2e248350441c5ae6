"""Vocab-parallel log-probs (sharded logits, and the fused path) at TP1 and TP2 against the
single-process full-vocabulary oracle. One 2-rank launch runs all TP checks (start-up is slow)."""

import pytest
import torch
import torch.distributed as dist

import kernels
from kernels.logprobs_chunked import linear_logprobs_chunked
from kernels.testing import (
    TOLERANCES,
    assert_results_close,
    forward_backward,
    make_problem,
    reference_results,
    shard_bounds,
)
from tulu3.testing import run_distributed_test

N, H, V = 23, 8, 101  # 101 = 51 + 50: uneven shards, neither a multiple of the vocab chunk


def _logits_path(p, group, start, end, with_entropy, dtype=torch.float32):
    """Gradients w.r.t. the logits shard, compared with the oracle's full-logits gradient."""
    tol = TOLERANCES[dtype]
    full = (p.hidden.float() @ p.weight.float().T).to(dtype).requires_grad_()
    ref_lp, ref_ent = kernels.reference_logprobs(full, p.labels, with_entropy)
    shard = full.detach()[:, start:end].clone().requires_grad_()
    lp, ent = kernels.vocab_parallel_logprobs(shard, p.labels, tp_group=group, vocab_start=start,
                                              with_entropy=with_entropy)
    for out, ref in ((lp, ref_lp), (ent, ref_ent)):
        if ref is not None:
            torch.testing.assert_close(out, ref.detach(), **tol)
    loss = lambda a, b: (a * p.grad_logprobs).sum() + (
        (b * p.grad_entropy).sum() if b is not None else 0)
    loss(ref_lp, ref_ent).backward()
    loss(lp, ent).backward()
    assert shard.grad.dtype == dtype
    torch.testing.assert_close(shard.grad.float(), full.grad[:, start:end].float(), **tol)


def _fused_path(p, group, start, end, dtype, with_entropy, **chunked_kwargs):
    fn = lambda h, w, y: linear_logprobs_chunked(
        h, w, y, tp_group=group, vocab_start=start, with_entropy=with_entropy, **chunked_kwargs)
    got = forward_backward(fn, p.hidden, p.weight[start:end], p)
    assert_results_close(got, reference_results(p, with_entropy), dtype, slice(start, end))


def _api_path(p, group, start, end, impl):
    fn = lambda h, w, y: kernels.linear_logprobs(
        h, w, y, tp_group=group, vocab_start=start, with_entropy=True, impl=impl)
    got = forward_backward(fn, p.hidden, p.weight[start:end], p)
    assert_results_close(got, reference_results(p, True), torch.float32, slice(start, end))


def _tp_checks():
    """Run on each of 2 ranks: TP2 over the world, then TP1 on a group of one rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    singles = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    start, end = shard_bounds(V, rank, world)
    for group, (lo, hi) in ((dist.group.WORLD, (start, end)), (singles[rank], (0, V))):
        for dtype in (torch.float32, torch.bfloat16):
            for with_entropy in (False, True):
                p = make_problem(N, H, V, dtype, seed=7)
                if dtype == torch.float32:
                    _logits_path(p, group, lo, hi, with_entropy)
                _fused_path(p, group, lo, hi, dtype, with_entropy, token_chunk=8, vocab_chunk=16)
        p = make_problem(N, H, V, torch.float32, seed=8)
        _fused_path(p, group, lo, hi, torch.float32, True)  # default chunk sizes
        for impl in ("reference", "chunked"):  # the public API, non-fused and fused
            _api_path(p, group, lo, hi, impl)
    # a rank whose shard is all padding (v_local = 0) contributes nothing
    lo, hi = (0, V) if rank == 0 else (V, V)
    p = make_problem(N, H, V, torch.float32, seed=9)
    _logits_path(p, dist.group.WORLD, lo, hi, True)
    _fused_path(p, dist.group.WORLD, lo, hi, torch.float32, True, token_chunk=8, vocab_chunk=16)
    return end - start


def test_tp1_logits_path_without_group():
    for dtype in (torch.float32, torch.bfloat16):
        for with_entropy in (False, True):
            p = make_problem(N, H, V, torch.float32, seed=3)
            _logits_path(p, None, 0, V, with_entropy, dtype)


@pytest.mark.distributed
def test_tp2_and_tp1_groups_match_full_vocab_reference():
    shard_sizes = run_distributed_test(_tp_checks, 2)
    assert shard_sizes == [51, 50]
