"""Global-batch sampling: a seeded shuffle per epoch, sharded over data-parallel ranks only.

Step k of the run takes the global batch ``perm_e[j * G:(j + 1) * G]`` (epoch e, step j within
it) of the epoch's permutation; DP rank r gets the r-th contiguous slice of it, cut into
micro-batches. TP, PP and CP ranks of one DP rank construct the sampler with the same ``dp_rank``
and so see the same data. The only state is the number of steps consumed, so a resumed run
continues at the very next global batch, even with a different ``dp_size`` (the global batch is
the same set of examples).
A last partial global batch of each epoch is dropped (every step has exactly ``global_batch``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class GlobalBatchSampler:
    """Yields, for each optimizer step, this DP rank's micro-batches: list[list[int]] of
    ``global_batch / (micro_batch * dp_size)`` micro-batches of ``micro_batch`` dataset indices."""

    def __init__(self, num_examples: int, global_batch: int, micro_batch: int, dp_rank: int,
                 dp_size: int, seed: int, epochs: int = 1, shuffle: bool = True):
        if global_batch % (micro_batch * dp_size):
            raise ValueError(f"global_batch {global_batch} is not divisible by micro_batch "
                             f"{micro_batch} x data-parallel size {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside 0..{dp_size - 1}")
        if num_examples < global_batch:
            raise ValueError(f"the dataset has {num_examples} examples, fewer than one global "
                             f"batch ({global_batch}): lower train.global_batch or add data")
        self.num_examples = num_examples
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.epochs = epochs
        self.shuffle = shuffle
        self.consumed_steps = 0
        self._perm_epoch = -1
        self._perm = np.arange(num_examples)

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.global_batch

    def __len__(self) -> int:
        """Total optimizer steps over all epochs."""
        return self.steps_per_epoch * self.epochs

    def permutation(self, epoch: int) -> np.ndarray:
        """The epoch's order of dataset indices (the same on every rank)."""
        if epoch != self._perm_epoch:
            self._perm = (np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
                          if self.shuffle else np.arange(self.num_examples))
            self._perm_epoch = epoch
        return self._perm

    def global_batch_indices(self, step: int) -> np.ndarray:
        """All ``global_batch`` dataset indices of optimizer step ``step`` (0-based, whole run)."""
        epoch, j = divmod(step, self.steps_per_epoch)
        return self.permutation(epoch)[j * self.global_batch:(j + 1) * self.global_batch]

    def rank_indices(self, step: int) -> np.ndarray:
        """This DP rank's contiguous share of step ``step``'s global batch."""
        share = self.global_batch // self.dp_size
        return self.global_batch_indices(step)[self.dp_rank * share:(self.dp_rank + 1) * share]

    def micro_batches(self, step: int) -> list[list[int]]:
        mine = self.rank_indices(step).tolist()
        return [mine[i:i + self.micro_batch] for i in range(0, len(mine), self.micro_batch)]

    def __iter__(self) -> Iterator[list[list[int]]]:
        while self.consumed_steps < len(self):
            batches = self.micro_batches(self.consumed_steps)
            self.consumed_steps += 1
            yield batches

    def state_dict(self) -> dict:
        return {"consumed_steps": self.consumed_steps, "seed": self.seed,
                "num_examples": self.num_examples, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        """Resume after ``state["consumed_steps"]`` steps; the data order must be the same one."""
        for key in ("seed", "num_examples", "global_batch"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume: the checkpoint's sampler had {key}="
                                 f"{state[key]}, this run has {getattr(self, key)}")
        self.consumed_steps = int(state["consumed_steps"])
