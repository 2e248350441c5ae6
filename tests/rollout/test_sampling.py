"""Token choice from full-vocabulary logits: greedy, inverse-CDF sampling, top-p, seeding."""

from __future__ import annotations

import math

import pytest
import torch

from tulu3.rollout.sampling import SamplingParams, pick_tokens, row_generators, uniforms

PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05]])


def logits(rows: int = 1) -> torch.Tensor:
    return torch.log(PROBS).expand(rows, 4).clone()


def test_greedy_first_index_on_ties() -> None:
    tied = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    assert pick_tokens(tied, SamplingParams(4), None).tolist() == [1]


def test_inverse_cdf() -> None:
    params = SamplingParams(4, temperature=1.0)
    # cumulative mass [0.5, 0.8, 0.95, 1.0]: u picks the first token whose mass exceeds it
    u = torch.tensor([0.0, 0.49, 0.51, 0.79, 0.81, 0.96, 0.999], dtype=torch.float64)
    assert pick_tokens(logits(7), params, u).tolist() == [0, 0, 1, 1, 2, 3, 3]


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    params = SamplingParams(4, temperature=1.0, top_p=0.7)
    # kept {0, 1} (mass 0.8 >= 0.7), renormalised: [0.625, 0.375]
    u = torch.linspace(0, 0.999, 50, dtype=torch.float64)
    picked = pick_tokens(logits(50), params, u)
    assert set(picked.tolist()) == {0, 1}
    assert int((picked == 0).sum()) == int((u < 0.625).sum())


def test_temperature_sharpens() -> None:
    u = torch.full((1,), 0.7, dtype=torch.float64)
    assert pick_tokens(logits(), SamplingParams(4, temperature=1.0), u).tolist() == [1]
    # T = 0.1: p0 = 0.5^10 / sum = 0.99: the same u now picks token 0
    assert pick_tokens(logits(), SamplingParams(4, temperature=0.1), u).tolist() == [0]


def test_row_generators_depend_on_seed_and_key_only() -> None:
    a = uniforms(row_generators(7, [3, 5]), torch.device("cpu"))
    b = uniforms(row_generators(7, [5, 3]), torch.device("cpu"))
    c = uniforms(row_generators(8, [3, 5]), torch.device("cpu"))
    assert a.tolist() == b.tolist()[::-1] and a.tolist() != c.tolist()
    assert all(0 <= x < 1 and not math.isnan(x) for x in a.tolist())


def test_params_validated() -> None:
    with pytest.raises(ValueError):
        SamplingParams(0)
    with pytest.raises(ValueError):
        SamplingParams(4, top_p=0.0)
