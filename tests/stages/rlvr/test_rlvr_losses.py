"""RLVR losses and estimators against numbers worked by hand (comments show the arithmetic)."""

from __future__ import annotations

import math

import pytest
import torch

from tulu3.stages.base import metric
from tulu3.stages.logprobs import VocabShard
from tulu3.stages.rlvr.losses import (
    explained_variance,
    gae,
    group_advantages,
    grpo_token_loss,
    kl_estimate,
    kl_k1,
    kl_k2,
    kl_k3,
    last_index,
    ppo_policy_loss,
    ppo_rewards,
    value_loss,
    whiten,
)
from tulu3.stages.rlvr.stage import RLVRPolicyStage, ValueStage

# One row: a prompt position (masked), three response tokens, one padding position.
MASK = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]])


def close(a: torch.Tensor, b: list, tol: float = 1e-4) -> None:
    assert torch.allclose(a.double(), torch.tensor(b, dtype=torch.float64), atol=tol), (a, b)


def test_kl_estimators() -> None:
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -2.0])
    close(kl_k1(logp, ref), [1.0, 0.0])
    # k3: r = exp(ref - logp) = e^-1; r - log r - 1 = 0.36788 + 1 - 1
    close(kl_k3(logp, ref), [math.exp(-1.0), 0.0])


def test_kl_estimators_by_name() -> None:
    """open-instruct's kl1 / kl2 / kl3 with d = log pi - log pi_ref, worked by hand:
    d = ln 2 (pi = 2 pi_ref): kl1 = 0.693147, kl2 = 0.693147^2 / 2 = 0.240227,
    kl3 = e^-d - 1 + d = 0.5 - 1 + 0.693147 = 0.193147;
    d = -1: kl1 = -1, kl2 = 0.5, kl3 = e - 1 - 1 = 0.718282."""
    logp = torch.tensor([math.log(0.5), -2.0], dtype=torch.float64)
    ref = torch.tensor([math.log(0.25), -1.0], dtype=torch.float64)
    close(kl_estimate("kl1", logp, ref), [0.693147, -1.0], 1e-6)
    close(kl_estimate("kl2", logp, ref), [0.240227, 0.5], 1e-6)
    close(kl_estimate("kl3", logp, ref), [0.193147, 0.718282], 1e-6)
    assert torch.equal(kl_k2(logp, ref), kl_estimate("kl2", logp, ref))
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_estimate("k4", logp, ref)


def test_ppo_rewards_kl_penalty_and_score_on_last_token() -> None:
    logp = torch.tensor([[0.0, -1.0, -2.0, -0.5, 0.0]])
    ref = torch.tensor([[0.0, -1.5, -2.0, -1.0, 0.0]])
    # k1 = [0.5, 0, 0.5] on the response; -0.1 * k1 = [-0.05, 0, -0.05]; + 10 on the last
    close(ppo_rewards(torch.tensor([10.0]), logp, ref, MASK, kl_beta=0.1),
          [[0.0, -0.05, 0.0, 9.95, 0.0]])
    # kl2 = k1^2 / 2 = [0.125, 0, 0.125]; -0.1 * kl2 = [-0.0125, 0, -0.0125]
    close(ppo_rewards(torch.tensor([10.0]), logp, ref, MASK, 0.1, "kl2"),
          [[0.0, -0.0125, 0.0, 9.9875, 0.0]])
    empty = torch.zeros(1, 5)
    close(ppo_rewards(torch.tensor([10.0]), logp, ref, empty, 0.1), [[0.0] * 5])
    assert last_index(torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0]])).tolist() == [2, -1]


def test_gae_worked_example() -> None:
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[9.0, 0.5, 0.6, 0.7, 9.0]])  # off-mask values must not matter
    # gamma 1, lambda 0.5:
    #   delta_3 = 1 + 0 - 0.7 = 0.3                A_3 = 0.3
    #   delta_2 = 0 + 0.7 - 0.6 = 0.1              A_2 = 0.1 + 0.5 * 0.3 = 0.25
    #   delta_1 = 0 + 0.6 - 0.5 = 0.1              A_1 = 0.1 + 0.5 * 0.25 = 0.225
    advantages, returns = gae(rewards, values, MASK, gamma=1.0, lam=0.5)
    close(advantages, [[0.0, 0.225, 0.25, 0.3, 0.0]])
    close(returns, [[0.0, 0.725, 0.85, 1.0, 0.0]])
    # gamma 0.9, lambda 1: A_t = discounted return - V_t = [0.81 - 0.5, 0.9 - 0.6, 1 - 0.7]
    advantages, _ = gae(rewards, values, MASK, gamma=0.9, lam=1.0)
    close(advantages, [[0.0, 0.31, 0.3, 0.3, 0.0]])


def test_whiten_unbiased_and_masked() -> None:
    x = torch.tensor([[7.0, 1.0, 2.0, 3.0, 4.0, 7.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
    # mean 2.5, unbiased variance 5/3: (x - 2.5) / sqrt(5/3)
    s = math.sqrt(5.0 / 3.0)
    close(whiten(x, mask), [[0.0, -1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s, 0.0]])
    close(whiten(x, mask, shift_mean=False),
          [[0.0, -1.5 / s + 2.5, -0.5 / s + 2.5, 0.5 / s + 2.5, 1.5 / s + 2.5, 0.0]])


def test_group_advantages() -> None:
    # group [10, 0, 0, 0]: mean 2.5, population std sqrt(18.75) = 4.3301
    # group [10, 10]: std 0 -> advantages 0 (nothing to learn from an all-equal group)
    close(group_advantages(torch.tensor([10.0, 0.0, 0.0, 0.0]), 4),
          [7.5 / math.sqrt(18.75)] + [-2.5 / math.sqrt(18.75)] * 3)
    close(group_advantages(torch.tensor([10.0, 10.0, 0.0, 10.0]), 2),
          [0.0, 0.0, -1.0, 1.0])
    with pytest.raises(ValueError):
        group_advantages(torch.tensor([1.0, 2.0, 3.0]), 2)


def test_ppo_policy_loss_clipping() -> None:
    ratio = torch.tensor([1.5, 0.5, 1.1, 0.7])
    old = torch.zeros(4)
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0])
    # rho 1.5, A +1: max(-1.5, -1.2) = -1.2 (clipped)   rho 0.5, A +1: max(-0.5, -0.8) = -0.5
    # rho 1.1, A -1: max(1.1, 1.1) = 1.1                rho 0.7, A -1: max(0.7, 0.8) = 0.8 (clipped)
    loss, clipped = ppo_policy_loss(torch.log(ratio), old, advantages, clip=0.2)
    close(loss, [-1.2, -0.5, 1.1, 0.8])
    assert clipped.tolist() == [True, False, False, True]


def test_grpo_token_loss_adds_k3() -> None:
    logp, old, ref = torch.tensor([-1.0]), torch.tensor([-1.0]), torch.tensor([-2.0])
    loss, _ = grpo_token_loss(logp, old, ref, torch.tensor([2.0]), clip=0.2, kl_beta=0.5)
    # ratio 1: -2 * 1 = -2; + 0.5 * k3(e^-1) = 0.5 * 0.367879
    close(loss, [-2.0 + 0.5 * math.exp(-1.0)])
    # kl1 instead: d = -1 - (-2) = 1 -> -2 + 0.5 * 1
    loss, _ = grpo_token_loss(logp, old, ref, torch.tensor([2.0]), 0.2, 0.5, "kl1")
    close(loss, [-1.5])


def test_value_loss_clipping() -> None:
    values, old, returns = torch.tensor([1.5, 0.9]), torch.tensor([1.0, 1.0]), \
        torch.tensor([2.0, 0.0])
    # 1: clipped value 1.2; (1.5 - 2)^2 = 0.25 < (1.2 - 2)^2 = 0.64 -> 0.32, clipped
    # 2: inside the clip range: 0.5 * 0.9^2 = 0.405
    loss, clipped = value_loss(values, old, returns, value_clip=0.2)
    close(loss, [0.32, 0.405])
    assert clipped.tolist() == [True, False]


def test_explained_variance() -> None:
    returns = torch.tensor([[1.0, 2.0, 3.0, 5.0]])
    mask = torch.ones(1, 4)
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full((1, 4), 2.75), returns, mask) == pytest.approx(0.0)
    assert math.isnan(explained_variance(returns, torch.ones(1, 4), mask))


def _batch() -> tuple[dict, torch.Tensor]:
    """Two rows (vocab 4): row 0 has a 2-token response, row 1 a 1-token response."""
    labels = torch.tensor([[-100, 1, 2, -100], [-100, 3, -100, -100]])
    mask = (labels != -100).float()
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]])).expand(2, 4, 4).clone()
    # log p(label): p(1) = 0.2, p(2) = 0.3, p(3) = 0.4
    old = torch.log(torch.tensor([[1.0, 0.1, 0.3, 1.0], [1.0, 0.4, 1.0, 1.0]])) * mask
    current = torch.log(torch.tensor([[1.0, 0.2, 0.3, 1.0], [1.0, 0.4, 1.0, 1.0]])) * mask
    batch = {"labels": labels, "loss_mask": mask, "old_logprobs": old,
             "ref_logprobs": current,  # reference = current policy: GRPO's KL term is 0
             "advantages": torch.tensor([[0, 1.0, 1.0, 0], [0, -1.0, 0, 0]]),
             "example_ids": torch.tensor([0, 1])}
    return batch, logits


def test_policy_stage_reductions() -> None:
    batch, logits = _batch()
    shard = VocabShard(None, 0, 4)
    # token ratios: 0.2/0.1 = 2 (A +1 -> -1.2 clipped), 0.3/0.3 = 1 (-> -1), 0.4/0.4 = 1 (A -1 -> 1)
    ppo = RLVRPolicyStage(shard, "ppo", clip=0.2, kl_beta=0.0, fused=False)
    loss_sum, normalizer, metrics = ppo.loss(batch, logits, torch.nn.Identity())
    assert float(loss_sum) == pytest.approx(-1.2 - 1.0 + 1.0) and int(normalizer) == 3
    assert metrics["clip_fraction"].tolist() == pytest.approx([1.0, 3.0])
    # GRPO: per-sequence means: row 0 (-1.2 - 1) / 2 = -1.1, row 1: 1; two sequences
    grpo = RLVRPolicyStage(shard, "grpo", clip=0.2, kl_beta=0.1, fused=False)
    loss_sum, normalizer, metrics = grpo.loss(batch, logits, torch.nn.Identity())
    assert float(loss_sum) == pytest.approx(-1.1 + 1.0) and int(normalizer) == 2
    assert torch.equal(metrics["response_tokens"], metric(3, 0))


def test_value_stage() -> None:
    batch = {"loss_mask": torch.tensor([[0.0, 1.0, 1.0]]),
             "old_values": torch.tensor([[0.0, 1.0, 1.0]]),
             "returns": torch.tensor([[5.0, 2.0, 0.0]])}
    scores = torch.tensor([[7.0, 1.5, 0.9]])
    loss, normalizer, metrics = ValueStage(vf_coef=0.1, value_clip=0.2).loss(
        batch, scores, torch.nn.Identity())
    # per token (see test_value_loss_clipping): 0.32 + 0.405; x vf_coef 0.1; 2 tokens
    assert float(loss) == pytest.approx(0.1 * 0.725) and int(normalizer) == 2
    assert metrics["value_loss"].tolist() == pytest.approx([0.725, 2.0])


def test_capture_at_the_sampling_temperature() -> None:
    from tulu3.stages.forward import CollectStage
    from tulu3.stages.rlvr.stage import TokenLogprobs

    logits = torch.tensor([[[0.0, 2.0, 4.0]]])  # one position, vocab 3
    batch = {"labels": torch.tensor([[2]]), "example_ids": torch.tensor([7])}
    stage = CollectStage(TokenLogprobs(VocabShard(None, 0, 3), fused=False, temperature=2.0))
    loss, count, _ = stage.loss(batch, logits, torch.nn.Identity())
    # softmax([0, 1, 2]) at the label: e^2 / (1 + e + e^2)
    want = 2.0 - math.log(1.0 + math.e + math.e ** 2)
    assert float(stage.outputs["logprobs"][7][0]) == pytest.approx(want, abs=1e-6)
    assert float(loss) == 0.0 and int(count) == 1 and "entropy" not in stage.outputs
