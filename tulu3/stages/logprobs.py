"""Per-token log-probs (and entropy) from the model's output, never gathering the vocabulary.

Every stage calls :func:`token_logprobs`; whether the fused kernel (hidden states + output weight,
no [tokens, vocab] logits) or the vocab-parallel log-softmax over logits runs is the model's
``fused_logprobs`` switch, decided once here.
"""

from __future__ import annotations

from dataclasses import dataclass

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
