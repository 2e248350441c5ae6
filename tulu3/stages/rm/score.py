"""Score conversations with a reward model, in process, at the current parallel layout.

For ``tulu3.eval`` (responses scored by a reward model as well as by verifiers) and anything
else that wants r(prompt, response)::

    chunks, shape = load_reward_model("runs/rm/checkpoints/step_100", model_cfg, layout)
    scores = score_conversations(chunks, tokenizer, conversations, layout)
    # or both at once: score_with_reward_model(path, tokenizer, conversations, layout)

``conversations[i]`` is a Tülu-format message list ending with the assistant turn to score (the
prompt turns first). It is rendered with the Tülu 3 chat template (the eos after the last
assistant turn included), exactly as the reward model saw chosen/rejected replies in training,
and scored at its last token. A conversation longer than ``max_len`` tokens is cut to its first
``max_len`` (as training truncates replies; open-instruct scores truncated text the same way).

Collective: every rank of the job calls these (megatron's parallel state initialised, e.g. by
``tulu3.parallel.init.setup_parallel``); each data-parallel replica scores its share and every
rank gets all the scores, in input order. The model path may be a tulu3 reward-model checkpoint,
a run directory (its latest checkpoint) or an HF ``LlamaForSequenceClassification`` directory
(``tulu3.stages.rm.export``'s output or a published RM such as allenai/Llama-3.1-Tulu-3-8B-RM).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tulu3.config import ModelConfig
from tulu3.model.presets import LlamaShape, with_shape
from tulu3.parallel.layout import ParallelLayout
from tulu3.stages.base import metric


class _ScoreStage:
    """Forward-only 'stage' that keeps each sequence's score (last pipeline stage only)."""

    name = "rm_score"
    metric_names = ("scored",)
    uses_hidden = False

    def __init__(self) -> None:
        self.scores: dict[int, float] = {}

    def loss(self, batch: dict, output: torch.Tensor, model: torch.nn.Module
             ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        from tulu3.model.scalar_head import sequence_scores

        ids = batch["example_ids"]
        scores = sequence_scores(output, batch["seq_ids"], int(ids.numel()))
        for index, score in zip(ids.tolist(), scores.float().cpu().tolist(), strict=True):
            if index >= 0:
                self.scores[index] = score
        count = int((ids >= 0).sum())
        return scores.sum() * 0, torch.tensor(max(count, 1)), {"scored": metric(count, 0)}


def load_reward_model(path: str | Path, model_cfg: ModelConfig, layout: ParallelLayout
                      ) -> tuple[list[torch.nn.Module], LlamaShape]:
    """Build ScalarHeadModel chunks shaped like the checkpoint and load it (eval mode)."""
    from tulu3.checkpoint.load import checkpoint_shape
    from tulu3.model.scalar_head import build_scalar_chunks, load_scalar_weights

    shape = checkpoint_shape(path)
    cfg = with_shape(dataclasses.replace(model_cfg, load=str(path)), shape)
    chunks = build_scalar_chunks(cfg, layout)
    load_scalar_weights(path, chunks, shape, layout)
    for chunk in chunks:
        chunk.eval()
    return chunks, shape


def score_conversations(chunks: list[torch.nn.Module], tokenizer: Any,
                        conversations: Sequence[Sequence[dict]], layout: ParallelLayout, *,
                        max_len: int = 4096, micro_batch: int = 8,
                        add_bos: bool = True) -> list[float]:
    """One float per conversation (input order), identical on every rank."""
    from megatron.core import parallel_state as ps

    from tulu3.data.chat_template import tokenize_conversation
    from tulu3.data.packing import collate_sequences
    from tulu3.step import pad_multiple, run_schedule

    if not conversations:
        return []
    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    mine = list(range(dp_rank, len(conversations), dp))
    # Every replica runs at least one micro-batch (-1: a filler row whose score is dropped).
    per_replica = -(-len(conversations) // dp)
    mine += [-1] * (per_replica - len(mine))
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    micro_batches = []
    for start in range(0, len(mine), micro_batch):
        indices = mine[start:start + micro_batch]
        seqs = []
        for index in indices:
            ids, _ = tokenize_conversation(conversations[max(index, 0)], tokenizer, add_bos)
            ids = ids[:max_len]
            seqs.append((ids, ids))
        micro_batches.append(collate_sequences(seqs, indices, max_len, False, pad_id,
                                               pad_multiple(layout)))
    stage = _ScoreStage()
    with torch.no_grad():
        run_schedule(chunks, micro_batches, stage, layout, forward_only=True)
    # Last-stage TP rank 0 of each replica holds its share; gather everyone's.
    holds = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 \
        and ps.get_context_parallel_rank() == 0
    gathered: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, stage.scores if holds else {})
    scores: dict[int, float] = {}
    for part in gathered:
        scores.update(part or {})
    missing = [i for i in range(len(conversations)) if i not in scores]
    if missing:
        raise RuntimeError(f"score_conversations: no score for conversations {missing[:10]}")
    return [scores[i] for i in range(len(conversations))]


def score_with_reward_model(path: str | Path, tokenizer: Any,
                            conversations: Sequence[Sequence[dict]], layout: ParallelLayout,
                            model_cfg: ModelConfig | None = None, **kwargs: Any) -> list[float]:
    """:func:`load_reward_model` + :func:`score_conversations`; ``kwargs``: max_len,
    micro_batch, add_bos. The model is built for this call only."""
    chunks, _ = load_reward_model(path, model_cfg or ModelConfig(), layout)
    return score_conversations(chunks, tokenizer, conversations, layout, **kwargs)
