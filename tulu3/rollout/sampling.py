"""Choosing the next token from full-vocabulary logits: greedy, temperature, nucleus (top-p).

Sampling is by inverse CDF with one uniform number per row drawn from that row's own seeded CPU
``torch.Generator``: a sample's tokens depend only on (seed, its key) and its logits, not on the
batch it was generated in, its DP rank or the TP/PP layout, so a run is reproducible and every
layout samples the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature`` 0 is greedy (argmax; the first index on ties)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got "
                             f"{self.temperature}, {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def row_generators(seed: int, keys: list[int]) -> list[torch.Generator]:
    """One CPU generator per row, seeded from (seed, key) (numpy's SeedSequence mixing)."""
    gens = []
    for key in keys:
        state = np.random.SeedSequence([seed & 0xFFFFFFFF, key & 0xFFFFFFFF, key >> 32])
        gens.append(torch.Generator().manual_seed(int(state.generate_state(1, np.uint64)[0]
                                                      >> np.uint64(1))))
    return gens


def uniforms(gens: list[torch.Generator], device: torch.device) -> torch.Tensor:
    """One U[0, 1) number per row [b] fp64, each from its row's generator."""
    draws = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in gens])
    return draws.to(device)


def pick_tokens(logits: torch.Tensor, params: SamplingParams, u: torch.Tensor | None
                ) -> torch.Tensor:
    """Next token per row from ``logits`` [b, vocab] (real vocabulary only) -> [b] int64.

    Sampling: p = softmax(logits / T); with top_p < 1 only the smallest set of most likely tokens
    whose mass reaches top_p is kept (Holtzman et al., 2020), renormalised; the token is the
    first whose cumulative mass exceeds ``u`` x total (``u`` [b] in [0, 1)).
    """
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.double() / params.temperature, dim=-1)
    order = None
    if params.top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True, stable=True)
        mass_before = probs.cumsum(-1) - probs
        probs = probs * (mass_before < params.top_p)
    cum = probs.cumsum(-1)
    target = (u * cum[:, -1]).unsqueeze(-1)
    index = torch.searchsorted(cum, target, right=True).clamp_(max=probs.shape[-1] - 1)
    if order is not None:
        index = order.gather(-1, index)
    return index.squeeze(-1)
