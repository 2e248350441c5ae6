"""One generation micro-batch: its padded token buffer, KV caches, stop state and results.

A micro-batch is a set of prompts decoded together: left-padded to its longest prompt, each
row's RoPE positions start at 0 at its first real token, padded keys are masked out (a pad query
attends to itself only, so no softmax row is empty). Step 0 is the prefill (the whole prompt),
step t > 0 feeds the token picked at step t - 1 (or, without a cache, the whole sequence again).

:func:`split_micro_batches` cuts the prompts, shortest first, into micro-batches whose
``rows x (longest prompt + max_new_tokens)`` (the KV-cache slots they hold) stays within a token
budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from tulu3.rollout.kv_cache import LayerKVCache, new_caches
from tulu3.rollout.sampling import SamplingParams, row_generators

StopCheck = Callable[[list[int]], bool]
"""Called with a row's response tokens so far; True ends the row (e.g. a stop string)."""


@dataclass
class GenerationResult:
    """One response: its token ids (the eos or the token completing a stop string included)."""

    tokens: list[int]
    has_eos: bool
    logprobs: list[float] = field(default_factory=list)
    """The model's log-prob of each generated token (full vocabulary, temperature 1)."""
    stopped: bool = False
    """True when it ended on eos or on ``stop`` (a stop string), False at max_new_tokens."""


def split_micro_batches(lengths: Sequence[int], new_tokens: int, max_tokens: int | None = None,
                        max_rows: int | None = None) -> list[list[int]]:
    """Prompt indices, shortest prompts first (less left padding), cut into micro-batches of at
    most ``max_rows`` rows with ``rows x (longest prompt + new_tokens) <= max_tokens``. A prompt
    alone over the budget gets a micro-batch of its own. None: no limit."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out: list[list[int]] = []
    for index in order:
        current = out[-1] if out else None
        if current is not None:
            rows, width = len(current) + 1, lengths[index] + new_tokens  # sorted: the longest
            fits_rows = max_rows is None or rows <= max_rows
            fits_tokens = max_tokens is None or rows * width <= max_tokens
            if fits_rows and fits_tokens:
                current.append(index)
                continue
        out.append([index])
    return out


class DecodeState:
    """The buffers of one micro-batch of ``prompts`` (token ids) and where its decoding is."""

    def __init__(self, prompts: list[list[int]], keys: list[int], params: SamplingParams,
                 eos_ids: Sequence[int], device: torch.device, stop: StopCheck | None = None
                 ) -> None:
        rows, longest, new = len(prompts), max(len(p) for p in prompts), params.max_new_tokens
        self.rows, self.longest, self.new, self.params = rows, longest, new, params
        self.tokens = torch.zeros(rows, longest + new, dtype=torch.long, device=device)
        self.valid = torch.zeros(rows, longest + new, dtype=torch.bool, device=device)
        for row, prompt in enumerate(prompts):
            self.tokens[row, longest - len(prompt):longest] = torch.tensor(prompt, device=device)
            self.valid[row, longest - len(prompt):] = True
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        # Position of every slot: 0 at the row's first real token (pads clamp to 0, unattended).
        self.positions = (torch.arange(longest + new, device=device)
                          - (longest - lengths)[:, None]).clamp(min=0)
        self.keys, self.stop = keys, stop
        self.eos = torch.tensor(sorted(set(eos_ids)), device=device)
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)
        self.stop_at = [0] * rows
        """Per row: how many tokens it had when ``stop`` ended it (0: it did not)."""
        self.step = 0
        self.caches: list[LayerKVCache] | None = None
        self.out_tokens: list[torch.Tensor] = []
        self.out_logprobs: list[torch.Tensor] = []

    def generators(self) -> list[torch.Generator] | None:
        """The rows' sampling generators (None when greedy); made on the picking rank only."""
        if self.params.greedy:
            return None
        if not hasattr(self, "_gens"):
            self._gens = row_generators(self.params.seed, self.keys)
        return self._gens

    def attach_cache(self, chunks: list[torch.nn.Module]) -> None:
        self.caches = new_caches(chunks, self.rows, self.longest + self.new)

    def inputs(self, use_cache: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens [b, s], positions [b, s], mask [b, 1, s, end]) of this step's forward."""
        end = self.longest + self.step
        start = 0 if self.step == 0 or not use_cache else end - 1
        return (self.tokens[:, start:end], self.positions[:, start:end],
                causal_mask(self.valid[:, :end], start))

    def apply(self, picked: torch.Tensor, logprob: torch.Tensor) -> None:
        """Record this step's tokens [b] and log-probs [b]; advance to the next step."""
        self.tokens[:, self.longest + self.step] = picked
        self.out_tokens.append(picked)
        self.out_logprobs.append(logprob)
        self.done |= torch.isin(picked, self.eos)
        self.step += 1
        if self.stop is not None:
            response = torch.stack(self.out_tokens, 1).cpu()
            for row in torch.nonzero(~self.done.cpu()).flatten().tolist():
                if self.stop(response[row].tolist()):
                    self.stop_at[row] = self.step
                    self.done[row] = True

    @property
    def finished(self) -> bool:
        return self.step >= self.new or bool(self.done.all())

    def results(self) -> list[GenerationResult]:
        """Each row cut after its first eos or stop (the rest of the batch ran on past it)."""
        tokens = torch.stack(self.out_tokens, 1).cpu()
        logprobs = torch.stack(self.out_logprobs, 1).cpu()
        is_eos = torch.isin(tokens, self.eos.cpu())
        out = []
        for row in range(self.rows):
            hits = torch.nonzero(is_eos[row]).flatten()
            end = int(hits[0]) + 1 if len(hits) else tokens.shape[1]
            if self.stop_at[row] and not len(hits):
                end = self.stop_at[row]
            out.append(GenerationResult(tokens[row, :end].tolist(), bool(len(hits)),
                                        logprobs[row, :end].tolist(),
                                        bool(len(hits)) or self.stop_at[row] > 0))
        return out


def causal_mask(valid: torch.Tensor, start: int) -> torch.Tensor:
    """Megatron's convention (True = masked out) [b, 1, s_new, s_total] for queries at slots
    ``start..s_total-1``: causal, padded keys hidden, every query sees at least itself."""
    total = valid.shape[1]
    query = torch.arange(start, total, device=valid.device)[:, None]
    key = torch.arange(total, device=valid.device)[None, :]
    allowed = (key <= query) & (valid[:, None, :] | (key == query))
    return ~allowed[:, None]
