"""Score conversations with a reward model, in process, at the current parallel layout.

For ``tulu3.eval`` (responses scored by a reward model as well as by verifiers) and anything
else that wants r(prompt, response)::

    chunks, shape = load_reward_model("runs/rm/checkpoints/step_100", model_cfg, layout, groups)
    scores = score_conversations(chunks, tokenizer, conversations, layout, groups)
    # or both at once: score_with_reward_model(path, tokenizer, conversations, layout, groups)

``conversations[i]`` is a Tülu-format message list ending with the assistant turn to score (the
prompt turns first). It is rendered with the Tülu 3 chat template (the eos after the last
assistant turn included), exactly as the reward model saw chosen/rejected replies in training,
and scored at its last token. A conversation longer than ``max_len`` tokens is cut to its first
``max_len`` (as training truncates replies; open-instruct scores truncated text the same way).

Collective: every rank of the job calls these (megatron's parallel state initialised, e.g. by
``tulu3.parallel.init.setup_parallel``, whose ``groups`` they take); each data-parallel replica
scores its share and every rank gets all the scores, in input order. The model path may be a
tulu3 reward-model checkpoint, a run directory (its latest checkpoint) or an HF
``LlamaForSequenceClassification`` directory (``tulu3.stages.rm.export``'s output or a published
RM such as allenai/Llama-3.1-Tulu-3-8B-RM).
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
from tulu3.parallel.groups import ProcessGroups
from tulu3.parallel.layout import ParallelLayout
from tulu3.stages.forward import forward_pass, freeze


class SequenceScores:
    """Forward-only measure (:func:`tulu3.stages.forward.forward_pass`): each sequence's score
    ``score`` [n] (fp32, at its last token), keyed by ``example_ids`` (-1: filler rows)."""

    uses_hidden = False

    def __call__(self, batch: dict, output: torch.Tensor, model: torch.nn.Module
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from tulu3.model.scalar_head import sequence_scores

        ids = batch["example_ids"]
        return ids, {"score": sequence_scores(output, batch["seq_ids"], int(ids.numel())).float()}


def check_reward_head(path: str | Path, option: str = "--rm") -> None:
    """Refuse a checkpoint without a trained reward head (a policy / LM checkpoint would be
    scored by a randomly initialised head): tulu3 ``head: scalar`` or an HF
    ``*ForSequenceClassification``."""
    from tulu3.checkpoint.format import read_meta
    from tulu3.checkpoint.hf_config import read_hf_config
    from tulu3.checkpoint.load import detect_format, resolve_checkpoint_dir
    from tulu3.config import UserError

    resolved = resolve_checkpoint_dir(path)
    if detect_format(resolved) == "tulu3":
        found = read_meta(resolved).head
        ok = found == "scalar"
    else:
        found = ",".join(read_hf_config(resolved).get("architectures") or ["unknown"])
        ok = "ForSequenceClassification" in found
    if not ok:
        raise UserError(f"{option} {path}: not a reward model (head {found}): it has no trained "
                        "reward head; train one with --stage rm or pass an RM checkpoint")


def load_reward_model(path: str | Path, model_cfg: ModelConfig, layout: ParallelLayout,
                      groups: ProcessGroups) -> tuple[list[torch.nn.Module], LlamaShape]:
    """Build ScalarHeadModel chunks shaped like the checkpoint and load it (frozen: eval mode,
    no gradients)."""
    from tulu3.checkpoint.load import checkpoint_shape
    from tulu3.model.scalar_head import build_scalar_chunks, load_scalar_weights

    shape = checkpoint_shape(path)
    cfg = with_shape(dataclasses.replace(model_cfg, load=str(path)), shape)
    chunks = build_scalar_chunks(cfg, layout, groups)
    load_scalar_weights(path, chunks, shape, groups)
    return freeze(chunks), shape


def score_conversations(chunks: list[torch.nn.Module], tokenizer: Any,
                        conversations: Sequence[Sequence[dict]], layout: ParallelLayout,
                        groups: ProcessGroups, *, max_len: int = 4096, micro_batch: int = 8,
                        add_bos: bool = True) -> list[float]:
    """One float per conversation (input order), identical on every rank."""
    from tulu3.data.chat_template import tokenize_conversation
    from tulu3.data.packing import collate_sequences

    if not conversations:
        return []
    dp_rank, dp = groups.dp_rank, groups.dp_size
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
                                               layout.pad_multiple))
    measured = forward_pass(chunks, micro_batches, SequenceScores(), layout)
    mine_scores = {i: float(score) for i, score in measured.get("score", {}).items()}
    # Last-stage TP rank 0 of each replica holds its share; gather everyone's.
    gathered: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine_scores if groups.holds_outputs else {})
    scores: dict[int, float] = {}
    for part in gathered:
        scores.update(part or {})
    missing = [i for i in range(len(conversations)) if i not in scores]
    if missing:
        raise RuntimeError(f"score_conversations: no score for conversations {missing[:10]}")
    return [scores[i] for i in range(len(conversations))]


def score_with_reward_model(path: str | Path, tokenizer: Any,
                            conversations: Sequence[Sequence[dict]], layout: ParallelLayout,
                            groups: ProcessGroups, model_cfg: ModelConfig | None = None,
                            **kwargs: Any) -> list[float]:
    """:func:`load_reward_model` + :func:`score_conversations`; ``kwargs``: max_len,
    micro_batch, add_bos. The model is built for this call only."""
    chunks, _ = load_reward_model(path, model_cfg or ModelConfig(), layout, groups)
    return score_conversations(chunks, tokenizer, conversations, layout, groups, **kwargs)
