"""This rank's process groups and ranks: megatron's ``parallel_state`` read once, here.

Everything outside ``tulu3/parallel`` receives a :class:`ProcessGroups` (from
:func:`tulu3.parallel.init.setup_parallel`, or :meth:`ProcessGroups.current` after megatron's
groups exist) instead of reaching for megatron's globals deep inside math or loops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


@dataclass(frozen=True)
class ProcessGroups:
    """Groups (``torch.distributed`` handles) and this rank's position in each dimension.

    ``dp`` is megatron's data-parallel group without the context-parallel ranks (the ranks that
    read different data); ``dp_cp`` includes them (the ranks gradients are averaged over).
    ``mp`` is the model-parallel group (tp x pp x cp: the ranks that hold one model replica).
    """

    tp: Any
    tp_rank: int
    tp_size: int
    pp: Any
    pp_rank: int
    pp_size: int
    pp_prev: int
    """Global rank of the previous pipeline stage (wraps around, as megatron's)."""
    pp_next: int
    pp_last: int
    """Global rank of the last pipeline stage of this rank's pipeline."""
    cp: Any
    cp_rank: int
    cp_size: int
    dp: Any
    dp_rank: int
    dp_size: int
    dp_cp_rank: int
    mp: Any

    @classmethod
    def current(cls) -> ProcessGroups:
        """Read megatron's parallel_state (after ``initialize_model_parallel``)."""
        from megatron.core import parallel_state as ps

        return cls(
            tp=ps.get_tensor_model_parallel_group(),
            tp_rank=ps.get_tensor_model_parallel_rank(),
            tp_size=ps.get_tensor_model_parallel_world_size(),
            pp=ps.get_pipeline_model_parallel_group(),
            pp_rank=ps.get_pipeline_model_parallel_rank(),
            pp_size=ps.get_pipeline_model_parallel_world_size(),
            pp_prev=ps.get_pipeline_model_parallel_prev_rank(),
            pp_next=ps.get_pipeline_model_parallel_next_rank(),
            pp_last=ps.get_pipeline_model_parallel_last_rank(),
            cp=ps.get_context_parallel_group(),
            cp_rank=ps.get_context_parallel_rank(),
            cp_size=ps.get_context_parallel_world_size(),
            dp=ps.get_data_parallel_group(),
            dp_rank=ps.get_data_parallel_rank(),
            dp_size=ps.get_data_parallel_world_size(),
            dp_cp_rank=ps.get_data_parallel_rank(with_context_parallel=True),
            mp=ps.get_model_parallel_group(),
        )

    @property
    def first_stage(self) -> bool:
        """The first pipeline stage (the one that embeds tokens), ignoring virtual stages."""
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        """The last pipeline stage (the one that computes losses), ignoring virtual stages."""
        return self.pp_rank == self.pp_size - 1

    @property
    def first_replica(self) -> bool:
        """Data- and context-parallel rank 0: the copy of the weights that is exported."""
        return self.dp_cp_rank == 0

    @property
    def holds_outputs(self) -> bool:
        """The one rank of each replica (last stage, TP and CP rank 0) whose per-sequence
        outputs (scores, cached log-probs) are gathered from."""
        return self.last_stage and self.tp_rank == 0 and self.cp_rank == 0

    @property
    def mp_first(self) -> int:
        """Global rank of the first rank of this model replica (scores, prints for it)."""
        return dist.get_global_rank(self.mp, 0) if self.mp is not None else 0

    def vocab_shard(self, vocab: int) -> Any:
        """This rank's output-layer shard, with its TP group (passed into the log-prob math) and
        its CP group when cp > 1."""
        from tulu3.stages.logprobs import VocabShard

        return VocabShard(self.tp, self.tp_rank, vocab, self.cp if self.cp_size > 1 else None)
