"""The reward-model loss on a hand-worked example, and the pieces it is built from."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from tulu3.model.scalar_head import sequence_scores
from tulu3.stages.rm.stage import RMStage, bradley_terry_loss
from tulu3.step import reduce_metrics

# Pair 1: r_c = 2.0, r_r = 0.5; pair 2: r_c = -1.0, r_r = 0.0; margin 0.5, centering 0.1.
#   pair 1: -log sigmoid(2.0 - 0.5 - 0.5) = log(1 + e^-1)  = 0.31326169
#           0.1 * (2.0 + 0.5)^2                            = 0.625
#   pair 2: -log sigmoid(-1.0 - 0.0 - 0.5) = log(1 + e^1.5) = 1.70141328
#           0.1 * (-1.0 + 0.0)^2                           = 0.1
#   loss = (0.31326169 + 0.625 + 1.70141328 + 0.1) / 2 pairs = 1.36983749
#   accuracy 1/2 (pair 2 prefers the rejected), margin (1.5 + -1.0) / 2 = 0.25,
#   rewards {2, 0.5, -1, 0}: mean 0.375, std sqrt(4.6875 / 4) = 1.08253175 (population)
#   d loss_sum / d r_c(pair 1) = -(1 - sigmoid(1)) + 2 * 0.1 * 2.5 = -0.26894142 + 0.5
WORKED = {"loss": 1.36983749, "accuracy": 0.5, "margin": 0.25, "chosen": 0.5,
          "rejected": 0.25, "reward_mean": 0.375, "reward_std": 1.08253175, "pairs": 2.0}


def _packed_batch() -> tuple[dict, torch.Tensor, list[tuple[int, int]]]:
    """Two packed rows: [seq0 (3 tokens), seq1 (2)], [seq2 (4), seq3 (1), pad]; scores [2, 5]
    hold noise except at each sequence's last token, where the worked rewards sit."""
    seq_ids = torch.tensor([[0, 0, 0, 1, 1], [2, 2, 2, 2, 3]])
    seq_ids = torch.cat([seq_ids, torch.tensor([[-1], [-1]])], dim=1)
    scores = torch.randn(2, 6, generator=torch.Generator().manual_seed(0)) * 5
    last = [(0, 2), (0, 4), (1, 3), (1, 4)]
    for (row, col), value in zip(last, (2.0, 0.5, -1.0, 0.0), strict=True):
        scores[row, col] = value
    batch = {"seq_ids": seq_ids, "example_ids": torch.tensor([7, 7, 9, 9])}
    return batch, scores.requires_grad_(), last


def test_worked_example() -> None:
    batch, scores, last = _packed_batch()
    stage = RMStage(margin=0.5, center_coef=0.1)
    loss_sum, normalizer, metrics = stage.loss(batch, scores, torch.nn.Identity())
    assert int(normalizer) == 2
    assert abs(float(loss_sum) - 2 * WORKED["loss"]) < 1e-6
    layout = SimpleNamespace(tp=1, cp=1, pp=1)
    reduced = stage.finish_metrics(reduce_metrics([metrics], stage.metric_names, layout))
    for name, want in WORKED.items():
        assert abs(reduced[name] - want) < 1e-6, (name, reduced[name], want)
    assert "reward_sq" not in reduced
    loss_sum.backward()
    grad = scores.grad
    want = -(1 - 1 / (1 + math.exp(-1.0))) + 0.5
    assert abs(float(grad[0, 2]) - want) < 1e-6
    mask = torch.zeros_like(grad, dtype=torch.bool)
    for row, col in last:
        mask[row, col] = True
    assert float(grad[~mask].abs().max()) == 0.0  # only last tokens carry the reward


def test_loss_terms() -> None:
    chosen, rejected = torch.tensor([1.0, -2.0]), torch.tensor([0.0, 3.0])
    plain = bradley_terry_loss(chosen, rejected)
    assert torch.allclose(plain, torch.log1p(torch.exp(-(chosen - rejected))))
    # The margin shifts the gap; centering adds coef * (r_c + r_r)^2 per pair.
    assert torch.allclose(bradley_terry_loss(chosen, rejected, margin=1.0),
                          torch.log1p(torch.exp(-(chosen - rejected - 1.0))))
    centered = bradley_terry_loss(chosen, rejected, center_coef=0.01)
    assert torch.allclose(centered - plain, 0.01 * torch.tensor([1.0, 1.0]), atol=1e-6)
    # Symmetry check: swapping the pair gives log(1 + e^d) instead of log(1 + e^-d).
    assert torch.allclose(bradley_terry_loss(rejected, chosen) - plain, chosen - rejected,
                          atol=1e-6)


def test_sequence_scores_picks_last_tokens() -> None:
    scores = torch.arange(12, dtype=torch.float32).reshape(2, 6)
    seq_ids = torch.tensor([[0, 0, 1, 1, 1, -1], [2, 3, 3, 3, -1, -1]])
    assert sequence_scores(scores, seq_ids).tolist() == [1.0, 4.0, 6.0, 9.0]
    with pytest.raises(ValueError, match="no token"):
        sequence_scores(scores, seq_ids, num_seqs=5)


def test_odd_sequence_count_is_refused() -> None:
    batch = {"seq_ids": torch.tensor([[0, 1, 2]]), "example_ids": torch.tensor([0, 0, 1])}
    with pytest.raises(ValueError, match="pairs"):
        RMStage().loss(batch, torch.zeros(1, 3), torch.nn.Identity())
    with pytest.raises(ValueError, match="center_coef"):
        RMStage(center_coef=-1.0)
