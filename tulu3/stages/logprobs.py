"""Per-token log-probs (and entropy) from the model's output, never gathering the vocabulary.

Every stage calls :func:`token_logprobs`; whether the fused kernel (hidden states + output weight,
no [tokens, vocab] logits) or the vocab-parallel log-softmax over logits runs is the model's
``fused_logprobs`` switch, decided once here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from kernels import linear_logprobs, vocab_parallel_logprobs


@dataclass(frozen=True)
class VocabShard:
    """This TP rank's slice of the output layer: rows [start, start + valid) are real tokens.

    The embedding/output layer is padded to a multiple of 128 x TP; padded rows are not tokens
    and are excluded from the softmax, so log-probs equal an unpadded (HF) model's.
    """

    tp_group: dist.ProcessGroup | None
    tp_rank: int
    vocab: int
    """Real vocabulary size (the tokenizer's)."""
    cp_group: dist.ProcessGroup | None = None
    """Context-parallel group when cp > 1: fused hidden states then hold this CP rank's slice
    of each row (tulu3.parallel.context), and the log-probs are gathered over it."""

    def bounds(self, rows_per_rank: int) -> tuple[int, int]:
        start = self.tp_rank * rows_per_rank
        return start, max(0, min(rows_per_rank, self.vocab - start))


def token_logprobs(model: torch.nn.Module, output: torch.Tensor, labels: torch.Tensor,
                   shard: VocabShard, fused: bool, with_entropy: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of each label token and (optionally) the entropy of each position.

    Args:
        model: the last-stage TuluGPTModel (unwrapped), for its output weight.
        output: hidden states [s, b, h] when ``fused`` else this rank's logits [b, s, v_local].
        labels: [b, s] next-token ids; -100 where nothing is predicted.
    Returns:
        logprobs [b, s] fp32 (0 where labels == -100) and entropy [b, s] fp32 or None.
    """
    if fused and shard.cp_group is not None and shard.cp_group.size() > 1:
        return _context_parallel_logprobs(model, output, labels, shard, with_entropy)
    batch, seq = labels.shape
    if fused:
        weight = model.output_weight()
        start, valid = shard.bounds(weight.shape[0])
        hidden = output.transpose(0, 1).reshape(batch * seq, -1)
        logprobs, entropy = linear_logprobs(hidden, weight[:valid], labels.reshape(-1),
                                            tp_group=shard.tp_group, vocab_start=start,
                                            with_entropy=with_entropy)
    else:
        start, valid = shard.bounds(output.shape[-1])
        logprobs, entropy = vocab_parallel_logprobs(output[..., :valid].float(), labels,
                                                    tp_group=shard.tp_group, vocab_start=start,
                                                    with_entropy=with_entropy)
    logprobs = logprobs.reshape(batch, seq)
    return logprobs, None if entropy is None else entropy.reshape(batch, seq)


def _context_parallel_logprobs(model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                               shard: VocabShard, with_entropy: bool
                               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fused log-probs of this CP rank's hidden states [s / cp, b, h] against its slice of the
    whole rows' ``labels`` [b, s], gathered back to [b, s] (each CP rank then computes the same
    loss; the backward keeps this rank's slice, so the output weight sees each token once)."""
    from tulu3.parallel.context import cp_positions, gather_sequence

    group = shard.cp_group
    index = cp_positions(labels.shape[1], group.size(), group.rank(), labels.device)
    local = replace(shard, cp_group=None)
    logprobs, entropy = token_logprobs(model, hidden, labels.index_select(1, index), local,
                                       True, with_entropy)
    logprobs = gather_sequence(logprobs, 1, group)
    return logprobs, None if entropy is None else gather_sequence(entropy, 1, group)
