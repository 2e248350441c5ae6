"""The chunked PyTorch fused log-prob and the public dispatcher against the oracle (one process)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
from kernels.logprobs import resolve_impl
from kernels.logprobs_chunked import chunk_sizes, linear_logprobs_chunked
from kernels.testing import (
    assert_results_close,
    forward_backward,
    make_problem,
    reference_results,
)

# n not a multiple of the token chunk, v not a multiple of the vocab chunk
N, H, V = 37, 16, 101


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_chunked_matches_reference(dtype, with_entropy):
    p = make_problem(N, H, V, dtype, seed=1)
    fn = lambda h, w, y: linear_logprobs_chunked(
        h, w, y, with_entropy=with_entropy, token_chunk=16, vocab_chunk=24)
    got = forward_backward(fn, p.hidden, p.weight, p)
    assert_results_close(got, reference_results(p, with_entropy), dtype)
    assert got["logprobs"][1::4].eq(0).all()  # ignored labels


@pytest.mark.parametrize("impl", ["auto", "chunked", "reference"])
def test_public_api_matches_reference_with_leading_dims(impl):
    p = make_problem(2 * 9, H, V, torch.float32, seed=2)
    hidden, labels = p.hidden.view(2, 9, H), p.labels.view(2, 9)
    logprobs, entropy = kernels.linear_logprobs(hidden, p.weight, labels, with_entropy=True,
                                                impl=impl)
    want_lp, want_ent = kernels.reference_linear_logprobs(p.hidden, p.weight, p.labels, True)
    assert logprobs.shape == entropy.shape == (2, 9) and logprobs.dtype == torch.float32
    torch.testing.assert_close(logprobs.view(-1), want_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy.view(-1), want_ent, rtol=1e-5, atol=1e-5)
    ce = kernels.cross_entropy(hidden, p.weight, labels, impl=impl)
    torch.testing.assert_close(ce.view(-1), -want_lp, rtol=1e-5, atol=1e-5)


def test_auto_is_chunked_on_cpu_and_bad_impl_raises():
    assert resolve_impl("auto", torch.zeros(1)) == "chunked"
    with pytest.raises(ValueError):
        resolve_impl("cuda", torch.zeros(1))


def test_entropy_only_loss_and_frozen_weight():
    p = make_problem(N, H, V, torch.float32, seed=3)
    hidden = p.hidden.clone().requires_grad_()
    _, entropy = linear_logprobs_chunked(hidden, p.weight, p.labels, with_entropy=True,
                                         token_chunk=8, vocab_chunk=32)
    (entropy * p.grad_entropy).sum().backward()
    ref_hidden = p.hidden.clone().requires_grad_()
    _, ref_entropy = kernels.reference_linear_logprobs(ref_hidden, p.weight, p.labels, True)
    (ref_entropy * p.grad_entropy).sum().backward()
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, rtol=1e-5, atol=1e-5)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_materializes_full_logits():
    n, h, v = 64, 8, 1000
    p = make_problem(n, h, v, torch.float32)
    hidden = p.hidden.clone().requires_grad_()
    weight = p.weight.clone().requires_grad_()
    with _LargestTensor() as mode:
        logprobs, entropy = linear_logprobs_chunked(hidden, weight, p.labels, with_entropy=True,
                                                    token_chunk=32, vocab_chunk=128)
        (logprobs.sum() + entropy.sum()).backward()
    assert mode.largest <= max(32 * 128, v * h)  # one tile, or the weight gradient
    with _LargestTensor() as naive:
        kernels.reference_linear_logprobs(hidden, weight, p.labels, True)[0].sum().backward()
    assert naive.largest >= n * v  # the check can see a materialized [n, v]


def test_empty_batch_gives_empty_outputs_and_zero_weight_grad():
    weight = torch.randn(V, H, requires_grad=True)
    hidden = torch.randn(0, H, requires_grad=True)
    logprobs, entropy = kernels.linear_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long),
                                                with_entropy=True, impl="chunked")
    assert logprobs.shape == entropy.shape == (0,)
    (logprobs.sum() + entropy.sum()).backward()
    assert weight.grad is not None and weight.grad.eq(0).all()


def test_chunk_sizes_fit_the_budget():
    assert chunk_sizes(16384, 128256, 1 << 27, 1024) == (16384, 8192)
    assert chunk_sizes(10, 100, 1 << 27, 1024) == (10, 100)
    token_chunk, vocab_chunk = chunk_sizes(2048, 32000, 1 << 22, 1024)
    assert token_chunk * vocab_chunk <= 1 << 22 and vocab_chunk >= 1024
