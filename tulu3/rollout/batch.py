"""One rollout batch of this DP rank: prompt + response rows as tensors, cut into micro-batches.

Row i is ``prompt_i + response_i``, right-padded to the batch's longest row. Per-token tensors are
aligned with ``labels`` (position t predicts token t + 1): ``mask`` is 1 exactly where the
predicted token is a response token, positions ``len(prompt) - 1 .. len(row) - 2``. Quantities
computed later (old/reference log-probs, values, advantages, returns) are added to ``per_token``
with the same [N, T] layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

IGNORE = -100


@dataclass
class RolloutBatch:
    tokens: torch.Tensor
    """[N, T] int64, right-padded with the pad id."""
    lengths: torch.Tensor
    """[N] tokens of each row (prompt + response)."""
    labels: torch.Tensor
    """[N, T] next token on response positions, -100 elsewhere."""
    mask: torch.Tensor
    """[N, T] fp32, 1 on response positions."""
    group: torch.Tensor
    """[N] the row's prompt position in this rank's share (its K samples share it)."""
    per_token: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def build(cls, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
              group: Sequence[int], pad_id: int) -> RolloutBatch:
        rows = len(prompts)
        lengths = torch.tensor([len(p) + len(r) for p, r in zip(prompts, responses, strict=True)])
        width = int(lengths.max())
        tokens = torch.full((rows, width), pad_id, dtype=torch.long)
        labels = torch.full((rows, width), IGNORE, dtype=torch.long)
        mask = torch.zeros(rows, width)
        for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
            ids = torch.tensor(list(prompt) + list(response), dtype=torch.long)
            tokens[row, :len(ids)] = ids
            start, end = len(prompt) - 1, len(ids) - 1
            labels[row, start:end] = ids[start + 1:]
            mask[row, start:end] = 1.0
        return cls(tokens, lengths, labels, mask, torch.tensor(list(group)))

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def response_lengths(self) -> torch.Tensor:
        return self.mask.sum(dim=1)

    def micro_batches(self, rows: Sequence[int], size: int,
                      keys: Sequence[str] = ()) -> list[dict]:
        """Micro-batches of ``size`` rows (in the given order), each cut to its longest row, in
        tulu3's batch format (tokens, labels, position_ids, seq_ids, example_ids, loss_mask)
        plus the ``per_token`` tensors named in ``keys``."""
        out = []
        for start in range(0, len(rows), size):
            index = torch.tensor(list(rows[start:start + size]), dtype=torch.long)
            width = int(self.lengths[index].max())
            real = torch.arange(width)[None, :] < self.lengths[index][:, None]
            batch = {
                "tokens": self.tokens[index, :width],
                "labels": self.labels[index, :width],
                "loss_mask": self.mask[index, :width],
                "position_ids": torch.arange(width).expand(len(index), width).contiguous(),
                "seq_ids": torch.where(real, torch.arange(len(index))[:, None],
                                       torch.full_like(real, -1, dtype=torch.long)),
                "example_ids": index,
            }
            for key in keys:
                batch[key] = self.per_token[key][index, :width]
            out.append(batch)
        return out

    def put(self, name: str, rows: dict[int, torch.Tensor]) -> None:
        """Store per-row captured tensors (each [s >= the row's length]) as ``per_token[name]``,
        zeroed off the response positions."""
        width = self.tokens.shape[1]
        out = torch.zeros(len(self), width)
        for row, values in rows.items():
            n = min(width, values.shape[0])
            out[row, :n] = values[:n].float()
        self.per_token[name] = out * self.mask
