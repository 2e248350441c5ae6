"""RLVR stages: the policy loss (PPO or GRPO), the value loss, and the pre-pass measures.

A micro-batch (:meth:`tulu3.rollout.batch.RolloutBatch.micro_batches`) holds prompt + response
rows, right-padded, with per-token tensors aligned to ``labels``: ``loss_mask`` (1 on response
tokens), ``old_logprobs``, ``ref_logprobs``, ``advantages``, and for the value model
``old_values`` and ``returns``. The math is in :mod:`tulu3.stages.rlvr.losses`; these classes
only reduce it.

Log-probs (old, reference, current) are those of the sampling distribution: the model's output
divided by ``rlvr.temperature`` (hidden states for the fused kernel, logits otherwise: the same
thing, as logits are linear in them), as open-instruct does; temperature 0 (greedy) counts as 1.

Reductions (what ``normalizer`` divides the summed loss by over the global mini-batch):
- PPO: per token (open-instruct's ``masked_mean`` over the mini-batch).
- GRPO: per sequence: each response's token mean, averaged over responses (DeepSeekMath eq. 3).
- Value loss: per token, times ``vf_coef``.
"""

from __future__ import annotations

import torch

from tulu3.stages.base import metric
from tulu3.stages.logprobs import VocabShard, token_logprobs
from tulu3.stages.rlvr.losses import grpo_token_loss, kl_k1, ppo_policy_loss, value_loss


def tempered(output: torch.Tensor, temperature: float) -> torch.Tensor:
    """Model output (hidden states or logits) of the distribution sampled at ``temperature``."""
    return output if temperature in (0.0, 1.0) else output / temperature


class RLVRPolicyStage:
    name = "rlvr"
    metric_names = ("loss", "clip_fraction", "entropy", "ratio", "approx_kl", "policy_kl",
                    "response_tokens")

    def __init__(self, shard: VocabShard, algo: str, clip: float, kl_beta: float,
                 fused: bool = True, temperature: float = 1.0, kl_estimator: str = "kl3"
                 ) -> None:
        if algo not in ("ppo", "grpo"):
            raise ValueError(f"rlvr.algo: {algo!r} is not ppo or grpo")
        self.shard, self.algo, self.clip, self.kl_beta = shard, algo, clip, kl_beta
        self.kl_estimator = kl_estimator
        """GRPO's KL term in the loss (PPO's is in the rewards, tulu3/stages/rlvr/losses.py)."""
        self.uses_hidden = fused
        self.temperature = temperature

    def loss(self, batch: dict, output: torch.Tensor, model: torch.nn.Module
             ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        mask = batch["loss_mask"].float()
        logprobs, entropy = token_logprobs(model, tempered(output, self.temperature),
                                           batch["labels"], self.shard, self.uses_hidden,
                                           with_entropy=True)
        old = batch["old_logprobs"]
        if self.algo == "grpo":
            per_token, clipped = grpo_token_loss(logprobs, old, batch["ref_logprobs"],
                                                 batch["advantages"], self.clip, self.kl_beta,
                                                 self.kl_estimator)
            lengths = mask.sum(dim=1)
            per_seq = (per_token * mask).sum(dim=1) / lengths.clamp(min=1)
            loss_sum = per_seq[lengths > 0].sum()
            normalizer = (lengths > 0).sum()
        else:
            per_token, clipped = ppo_policy_loss(logprobs, old, batch["advantages"], self.clip)
            loss_sum = (per_token * mask).sum()
            normalizer = mask.sum()
        tokens = mask.sum()
        log_ratio = (logprobs - old).detach()
        metrics = {
            "loss": metric(loss_sum, normalizer),
            "clip_fraction": metric((clipped * mask).sum(), tokens),
            "entropy": metric((entropy.detach() * mask).sum(), tokens),
            "ratio": metric((torch.exp(log_ratio) * mask).sum(), tokens),
            # k3 of the old policy against the current one: how far this update moved
            "approx_kl": metric(((torch.exp(log_ratio) - 1 - log_ratio) * mask).sum(), tokens),
            "policy_kl": metric((kl_k1(logprobs.detach(), batch["ref_logprobs"]) * mask).sum(),
                                tokens),
            "response_tokens": metric(tokens, 0),
        }
        return loss_sum, normalizer.to(torch.int), metrics


class ValueStage:
    """PPO's value model (tulu3.model.scalar_head): clipped value loss x ``vf_coef``."""

    name = "rlvr_value"
    metric_names = ("value_loss", "value_clip_fraction")
    uses_hidden = False

    def __init__(self, vf_coef: float, value_clip: float) -> None:
        self.vf_coef, self.value_clip = vf_coef, value_clip

    def loss(self, batch: dict, output: torch.Tensor, model: torch.nn.Module
             ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        mask = batch["loss_mask"].float()
        per_token, clipped = value_loss(output, batch["old_values"], batch["returns"],
                                        self.value_clip)
        unscaled = (per_token * mask).sum()
        tokens = mask.sum()
        metrics = {"value_loss": metric(unscaled, tokens),
                   "value_clip_fraction": metric((clipped * mask).sum(), tokens)}
        return self.vf_coef * unscaled, tokens.to(torch.int), metrics


class TokenLogprobs:
    """Forward-only measure (:func:`tulu3.stages.forward.forward_pass`) of an LM: each row's
    label log-probs ``logprobs`` [n, s] at the sampling ``temperature`` (and ``entropy`` [n, s]
    when ``with_entropy``), keyed by ``example_ids``."""

    def __init__(self, shard: VocabShard, fused: bool = True, with_entropy: bool = False,
                 temperature: float = 1.0) -> None:
        self.shard, self.with_entropy, self.temperature = shard, with_entropy, temperature
        self.uses_hidden = fused

    def __call__(self, batch: dict, output: torch.Tensor, model: torch.nn.Module
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logprobs, entropy = token_logprobs(model, tempered(output, self.temperature),
                                           batch["labels"], self.shard, self.uses_hidden,
                                           self.with_entropy)
        outputs = {"logprobs": logprobs}
        if entropy is not None:
            outputs["entropy"] = entropy
        return batch["example_ids"], outputs


class TokenValues:
    """Forward-only measure of a value model (tulu3.model.scalar_head): each row's
    per-position scores ``values`` [n, s] (fp32), keyed by ``example_ids``."""

    uses_hidden = False

    def __call__(self, batch: dict, output: torch.Tensor, model: torch.nn.Module
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return batch["example_ids"], {"values": output.float()}
