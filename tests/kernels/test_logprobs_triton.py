"""The Triton tile kernels and the fused log-prob with them.

Without CUDA they run in Triton's CPU interpreter: TRITON_INTERPRET must be set before the kernels
are defined (``@triton.jit`` reads it), so it is set here at import, before
``kernels.logprobs_triton`` is imported, and shapes stay tiny (each program runs in Python).
With CUDA (and TRITON_INTERPRET unset) the same tests run compiled on the GPU, plus one at a
realistic vocabulary size.
"""

import json
import os
import subprocess
import sys

import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"
DEVICE = "cuda" if ON_GPU else "cpu"

import pytest
import torch.distributed as dist
import triton

import kernels
from kernels.logprobs_chunked import linear_logprobs_chunked
from kernels.logprobs_triton import TritonTileOps, interpreted
from kernels.softmax_stats import TORCH_OPS
from kernels.testing import (
    TOLERANCES,
    assert_results_close,
    forward_backward,
    make_problem,
    reference_results,
    shard_bounds,
)
from tulu3.testing import run_distributed_test

N, H, V = 13, 8, 101
OPS = TritonTileOps(block_v=32)  # 101 columns = 3 full blocks + a partial one


def test_triton_imports_and_runs_where_expected():
    assert tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 0)
    assert interpreted() != ON_GPU, "kernels were defined before TRITON_INTERPRET was set"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tile_kernels_match_torch_tile_ops(dtype):
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(N, V, generator=gen)).to(dtype).to(DEVICE)
    labels = torch.randint(-1, V + 5, (N,), generator=gen)  # some outside the tile
    labels[0] = V - 1
    labels = labels.to(DEVICE)
    want = TORCH_OPS.stats(logits, labels, with_entropy=True)
    got = OPS.stats(logits, labels, with_entropy=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert OPS.stats(logits, labels, with_entropy=False).mean_logit is None
    g, e = torch.randn(N, generator=gen).to(DEVICE), torch.randn(N, generator=gen).to(DEVICE)
    for ge in (None, e):
        want_grad = TORCH_OPS.grad(logits, labels, want.lse, want.mean_logit, g, ge)
        tile = logits.clone()
        got_grad = OPS.grad(tile, labels, want.lse, want.mean_logit, g, ge)
        assert got_grad.data_ptr() == tile.data_ptr() and got_grad.dtype == dtype  # in place
        # both round the same fp32 gradient to the tile's dtype: one ulp apart at most in bf16
        torch.testing.assert_close(got_grad.float(), want_grad.float(), **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_triton_matches_reference(dtype):
    p = make_problem(N, H, V, dtype, seed=4).to(DEVICE)
    fn = lambda h, w, y: linear_logprobs_chunked(
        h, w, y, with_entropy=True, ops=OPS, token_chunk=8, vocab_chunk=64)
    assert_results_close(forward_backward(fn, p.hidden, p.weight, p),
                         reference_results(p, True), dtype)


def test_public_api_forces_triton():
    p = make_problem(5, H, 40, torch.float32, seed=5).to(DEVICE)
    got = kernels.linear_logprobs(p.hidden, p.weight, p.labels, impl="triton")[0]
    want = kernels.reference_linear_logprobs(p.hidden, p.weight, p.labels)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not ON_GPU, reason="a realistic vocabulary is too slow for the interpreter")
def test_gpu_auto_is_triton_and_matches_reference_at_a_real_vocab():
    p = make_problem(1000, 256, 32003, torch.bfloat16, seed=6).to(DEVICE)
    fn = lambda h, w, y: kernels.linear_logprobs(h, w, y, with_entropy=True)
    assert kernels.logprobs.resolve_impl("auto", p.hidden) == "triton"
    assert_results_close(forward_backward(fn, p.hidden, p.weight, p),
                         reference_results(p, True), torch.bfloat16)


def _tp2_triton():
    rank, world = dist.get_rank(), dist.get_world_size()
    start, end = shard_bounds(V, rank, world)
    p = make_problem(N, H, V, torch.float32, seed=6)
    fn = lambda h, w, y: linear_logprobs_chunked(
        h, w, y, tp_group=dist.group.WORLD, vocab_start=start, with_entropy=True, ops=OPS,
        token_chunk=8, vocab_chunk=32)
    assert_results_close(forward_backward(fn, p.hidden, p.weight[start:end], p),
                         reference_results(p, True), torch.float32, slice(start, end))
    return interpreted()


@pytest.mark.distributed
@pytest.mark.skipif(ON_GPU, reason="gloo ranks hold CPU tensors: interpreter only")
def test_tp2_triton_matches_full_vocab_reference():
    assert run_distributed_test(_tp2_triton, 2) == [True, True]


def test_kernels_compile_for_h100_h200_without_a_gpu():
    """The interpreter accepts code that the GPU compiler rejects: compile to sm_90 cubin too."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    code = "import json; from kernels.logprobs_triton import compile_for_gpu as c; " \
           "print(json.dumps(c(90, 'bf16')))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    stages = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(stages) == 4 and all("cubin" in s for s in stages.values()), stages
