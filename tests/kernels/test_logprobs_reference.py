"""The oracle against hand-worked values (everything else is tested against the oracle)."""

import math

import torch

from kernels import reference_linear_logprobs, reference_logprobs


def test_uniform_logits_give_log_vocab():
    logits = torch.zeros(3, 7)
    logprobs, entropy = reference_logprobs(logits, torch.tensor([0, 6, -100]), with_entropy=True)
    assert torch.allclose(logprobs, torch.tensor([-math.log(7), -math.log(7), 0.0]))
    assert torch.allclose(entropy, torch.tensor([math.log(7), math.log(7), 0.0]))


def test_two_way_softmax_by_hand():
    # softmax([0, log 3]) = [1/4, 3/4]
    logits = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.bfloat16)
    logprobs, entropy = reference_logprobs(logits, torch.tensor([1]), with_entropy=True)
    assert logprobs.dtype == torch.float32
    assert abs(logprobs.item() - math.log(0.75)) < 5e-3  # bf16 rounding of log 3
    assert abs(entropy.item() - -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))) < 5e-3
    assert reference_logprobs(logits.float(), torch.tensor([0]))[1] is None


def test_linear_is_matmul_then_logprobs():
    hidden, weight = torch.randn(4, 3), torch.randn(5, 3)
    labels = torch.tensor([4, -100, 0, 2])
    got, _ = reference_linear_logprobs(hidden, weight, labels)
    want = torch.log_softmax(hidden @ weight.T, -1)[torch.arange(4), labels.clamp(min=0)]
    assert torch.allclose(got, want.masked_fill(labels == -100, 0.0))
