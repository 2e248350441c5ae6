"""Preference optimization (``dpo.loss``, a name of :data:`.losses.LOSSES`) on one micro-batch.

Sequences ``2i`` (chosen) and ``2i + 1`` (rejected) of a micro-batch are pair ``i``
(tulu3/data/packing.py): both went through the model in the same forward, padded or packed.
Per-token log-probs come from :func:`token_logprobs` (never the whole vocabulary) and are summed
per sequence with ``seq_ids``; the pure losses and their registry are in :mod:`.losses`.
Reference log-probs (summed, fp32) arrive in the batch as ``ref_chosen_logps`` /
``ref_rejected_logps`` ``[P]``, put there by :mod:`.loop` from its cache or its frozen reference
model; :class:`ReferenceLogps` is what computes them (a :mod:`tulu3.stages.forward` measure).

The normalizer is the number of pairs, so the step's loss is the mean over the global batch's
pairs. Metrics (means over pairs): ``loss``, ``rewards/{chosen,rejected,accuracy,margin}``
(the loss's implicit rewards; accuracy counts chosen > rejected) and ``logps/{chosen,rejected}``
(the policy log-probs the loss uses: per-token means for length-normalized losses such as
dpo_norm / simpo, sums otherwise); ``wpo/weight`` for weighted losses.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from tulu3.stages.base import metric
from tulu3.stages.dpo import losses as dpo_losses
from tulu3.stages.logprobs import VocabShard, token_logprobs

REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")
PAIR_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy",
                "rewards/margin", "logps/chosen", "logps/rejected", "pairs")


class PairLogps(NamedTuple):
    """Per-pair sums over the response tokens, fp32 [P] each."""

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor


def per_sequence(values: Tensor, seq_ids: Tensor, num_seqs: int) -> Tensor:
    """Sum ``values`` [b, s] per sequence id -> [num_seqs] (padding, id -1, is dropped)."""
    index = seq_ids.reshape(-1)
    keep = index >= 0
    flat = torch.where(keep, values.reshape(-1), torch.zeros_like(values.reshape(-1)))
    out = values.new_zeros(num_seqs)
    return out.scatter_add(0, torch.where(keep, index, torch.zeros_like(index)), flat)


def pair_sums(batch: dict, values: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token ``values`` [b, s] -> (chosen [P], rejected [P]) sums."""
    sums = per_sequence(values, batch["seq_ids"], int(batch["example_ids"].numel()))
    return sums[0::2], sums[1::2]


def pair_logps(batch: dict, logprobs: Tensor) -> PairLogps:
    """Summed response log-probs and response lengths of every pair of the micro-batch.

    Raises ValueError when the micro-batch is not a list of pairs (odd number of sequences, or
    sequences 2i and 2i + 1 from different examples) or a response has no trained token.
    """
    ids = batch["example_ids"]
    if ids.numel() % 2 or not torch.equal(ids[0::2], ids[1::2]):
        raise ValueError(f"a DPO micro-batch holds (chosen, rejected) sequence pairs with the "
                         f"same example id; got example_ids {ids.tolist()}")
    trained = (batch["labels"] != -100).to(logprobs.dtype)
    chosen_tokens, rejected_tokens = pair_sums(batch, trained)
    empty = (chosen_tokens == 0) | (rejected_tokens == 0)
    if bool(empty.any()):
        bad = ids[0::2][empty].tolist()
        raise ValueError(f"DPO pairs {bad} have a response with no trained token (an empty "
                         "response): nothing to compare")
    chosen, rejected = pair_sums(batch, logprobs)
    return PairLogps(chosen, rejected, chosen_tokens, rejected_tokens)


class DPOStage:
    """The preference loss of one micro-batch, on the last pipeline stage."""

    name = "dpo"

    def __init__(self, shard: VocabShard, loss: str = "dpo_norm", beta: float = 5.0,
                 gamma_beta_ratio: float = 0.3, label_smoothing: float = 0.0,
                 fused: bool = True) -> None:
        self.spec = dpo_losses.get_loss(loss)
        if beta <= 0:
            raise ValueError(f"dpo.beta must be > 0, got {beta}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"dpo.label_smoothing must be in [0, 0.5), got {label_smoothing}")
        if label_smoothing and not self.spec.label_smoothing:
            raise ValueError(f"dpo.label_smoothing does not apply to dpo.loss={loss}")
        self.shard, self.loss_name, self.beta = shard, loss, beta
        self.gamma_beta_ratio, self.label_smoothing = gamma_beta_ratio, label_smoothing
        self.settings = dpo_losses.LossSettings(beta, gamma_beta_ratio, label_smoothing)
        self.uses_hidden = fused
        self.needs_reference = self.spec.needs_reference
        self.metric_names = PAIR_METRICS + (("wpo/weight",) if self.spec.weighted else ())

    def loss(self, batch: dict, output: Tensor, model: torch.nn.Module
             ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        logprobs, _ = token_logprobs(model, output, batch["labels"], self.shard, self.uses_hidden)
        policy = pair_logps(batch, logprobs)
        weights = None
        if self.spec.weighted:
            weights = self._wpo_weights(batch, output, model, logprobs, policy)
        ref_chosen, ref_rejected = self._reference(batch)
        inputs = dpo_losses.PairInputs(policy.chosen, policy.rejected, policy.chosen_tokens,
                                       policy.rejected_tokens, ref_chosen, ref_rejected, weights)
        out = self.spec.compute(inputs, self.settings)
        pairs = policy.chosen.numel()
        loss_sum = out.losses.sum()
        used_chosen, used_rejected = policy.chosen.detach(), policy.rejected.detach()
        if self.spec.length_normalized:
            used_chosen = used_chosen / policy.chosen_tokens
            used_rejected = used_rejected / policy.rejected_tokens
        margin = out.chosen_rewards - out.rejected_rewards
        metrics = {
            "loss": metric(loss_sum, pairs),
            "rewards/chosen": metric(out.chosen_rewards.sum(), pairs),
            "rewards/rejected": metric(out.rejected_rewards.sum(), pairs),
            "rewards/accuracy": metric((margin > 0).sum(), pairs),
            "rewards/margin": metric(margin.sum(), pairs),
            "logps/chosen": metric(used_chosen.sum(), pairs),
            "logps/rejected": metric(used_rejected.sum(), pairs),
            "pairs": metric(pairs, 0),
        }
        if weights is not None:
            metrics["wpo/weight"] = metric(weights.sum(), pairs)
        return loss_sum, torch.tensor(pairs, dtype=torch.int, device=loss_sum.device), metrics

    def _reference(self, batch: dict) -> tuple[Tensor | None, Tensor | None]:
        """(chosen, rejected) reference sums, or (None, None) for reference-free losses."""
        if not self.needs_reference:
            return None, None
        missing = [k for k in REF_KEYS if k not in batch]
        if missing:
            raise ValueError(f"dpo.loss={self.loss_name} needs reference log-probs, and the "
                             f"micro-batch has no {missing} (tulu3/stages/dpo/loop.py adds "
                             "them)")
        return batch[REF_KEYS[0]].float(), batch[REF_KEYS[1]].float()

    def _wpo_weights(self, batch: dict, output: Tensor, model: torch.nn.Module,
                     logprobs: Tensor, policy: PairLogps) -> Tensor:
        """WPO's sampled-alignment weights without the vocabulary: ``log sum_v p_v^2`` equals
        ``2 log p_y - log softmax(2 z)_y``, and doubling the output (logits, or the hidden
        states the fused kernel multiplies by the output weight) doubles ``z``. So the per-token
        exponent ``log p_y - log sum_v p_v^2`` is ``log softmax(2 z)_y - log p_y``: one more
        forward-only log-prob pass."""
        with torch.no_grad():
            sharp, _ = token_logprobs(model, 2.0 * output.detach(), batch["labels"], self.shard,
                                      self.uses_hidden)
            chosen, rejected = pair_sums(batch, sharp - logprobs.detach())
            return dpo_losses.wpo_weights(chosen / policy.chosen_tokens,
                                          rejected / policy.rejected_tokens)


class ReferenceLogps:
    """Forward-only measure (:func:`tulu3.stages.forward.forward_pass`): the summed response
    log-probs of each pair under the (reference) model, keyed by the pair's example id:
    ``REF_KEYS[0]`` (chosen) and ``REF_KEYS[1]`` (rejected), fp32 ``[P]`` each."""

    def __init__(self, shard: VocabShard, fused: bool = True) -> None:
        self.shard = shard
        self.uses_hidden = fused

    def __call__(self, batch: dict, output: Tensor, model: torch.nn.Module
                 ) -> tuple[Tensor, dict[str, Tensor]]:
        logprobs, _ = token_logprobs(model, output, batch["labels"], self.shard, self.uses_hidden)
        sums = pair_logps(batch, logprobs.detach())
        return batch["example_ids"][0::2], {REF_KEYS[0]: sums.chosen, REF_KEYS[1]: sums.rejected}
