"""Preference losses on per-pair tensors, and :data:`LOSSES`, the registry ``dpo.loss`` names.

Every function takes sequence-level log-probs of the response tokens of P pairs (fp32 ``[P]``:
``policy_*`` with gradients, ``reference_*`` without) and returns a :class:`PairLosses` of
``[P]`` tensors: the per-pair loss and the implicit rewards the metrics report. Nothing here
knows about models, batches or process groups (tulu3/stages/dpo/stage.py feeds these).

Notation: ``h = (log pi(y_w) - log pi(y_l)) - (log ref(y_w) - log ref(y_l))`` (the policy's
log-ratio margin over the reference's), ``sigma`` the logistic function, ``beta`` the inverse
temperature. Chosen = y_w, rejected = y_l.

A new loss is one function (the paper's math), one :data:`LOSSES` entry (a
:class:`PreferenceLoss`: how :class:`PairInputs` + :class:`LossSettings` call it, and what it
needs) and one hand-worked test; the stage, config validation and the stage tests read the
registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class PairLosses(NamedTuple):
    losses: Tensor
    """[P] loss of each pair (differentiable)."""
    chosen_rewards: Tensor
    """[P] implicit reward of the chosen response (detached)."""
    rejected_rewards: Tensor
    """[P] implicit reward of the rejected response (detached)."""


def sigmoid_loss(logits: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """``-(1 - eps) log sigma(z) - eps log sigma(-z)``: the Bradley-Terry log-loss of ``z``,
    with conservative label smoothing ``eps`` (cDPO: Mitchell 2023, "A note on DPO with noisy
    preferences and relationship to IPO": the label is flipped with probability eps)."""
    loss = -F.logsigmoid(logits) * (1.0 - label_smoothing)
    if label_smoothing:
        loss = loss - F.logsigmoid(-logits) * label_smoothing
    return loss


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor,
             reference_rejected: Tensor, beta: float, label_smoothing: float = 0.0
             ) -> PairLosses:
    """DPO, Rafailov et al. 2023 ("Direct Preference Optimization", Eq. 7):
    ``L = -log sigma(beta * h)``, with cDPO label smoothing (see :func:`sigmoid_loss`).

    Args are summed response log-probs, each ``[P]``. Rewards: ``beta * (log pi - log ref)``
    (the implicit reward of Eq. 5 without its log Z(x) term, which cancels in a pair). Policy
    equal to reference gives ``h = 0``: loss log 2.
    """
    h = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    return PairLosses(sigmoid_loss(beta * h, label_smoothing),
                      (beta * (policy_chosen - reference_chosen)).detach(),
                      (beta * (policy_rejected - reference_rejected)).detach())


def dpo_norm_loss(policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor,
                  reference_rejected: Tensor, chosen_tokens: Tensor, rejected_tokens: Tensor,
                  beta: float, label_smoothing: float = 0.0) -> PairLosses:
    """Length-normalized DPO, Tülu 3's choice (Lambert et al. 2024, "Tülu 3: Pushing Frontiers
    in Open Language Model Post-Training", Section 5, the length-normalized DPO objective;
    open-instruct ``dpo_norm``, beta 5): :func:`dpo_loss` on per-token mean log-probs
    ``log pi(y) / |y|``, for policy and reference alike.

    ``*_tokens`` [P] are the numbers of response tokens |y_w| and |y_l| (each >= 1).
    """
    return dpo_loss(policy_chosen / chosen_tokens, policy_rejected / rejected_tokens,
                    reference_chosen / chosen_tokens, reference_rejected / rejected_tokens,
                    beta, label_smoothing)


def simpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, chosen_tokens: Tensor,
               rejected_tokens: Tensor, beta: float, gamma_beta_ratio: float,
               label_smoothing: float = 0.0) -> PairLosses:
    """SimPO, Meng et al. 2024 ("SimPO: Simple Preference Optimization with a Reference-Free
    Reward", Eq. 6): reference-free and length-normalized,
    ``L = -log sigma(beta / |y_w| log pi(y_w) - beta / |y_l| log pi(y_l) - gamma)``
    with the target margin ``gamma = gamma_beta_ratio * beta`` (Tülu 3 / open-instruct: 0.3),
    written as ``beta * (mean_w - mean_l - gamma_beta_ratio)``. Label smoothing as in the
    SimPO reference code. Rewards: ``beta * log pi(y) / |y|`` (Eq. 4).
    """
    chosen = policy_chosen / chosen_tokens
    rejected = policy_rejected / rejected_tokens
    logits = beta * (chosen - rejected - gamma_beta_ratio)
    return PairLosses(sigmoid_loss(logits, label_smoothing), (beta * chosen).detach(),
                      (beta * rejected).detach())


def wpo_weights(chosen_aligned: Tensor, rejected_aligned: Tensor) -> Tensor:
    """WPO's pair weight, Zhou et al. 2024 ("WPO: Enhancing RLHF with Weighted Preference
    Optimization", Eq. 2, with the paper's default "sampled alignment" of the weights):

    ``w(x, y) = exp( 1/|y| sum_t log[ pi(y_t | x, y_<t) / sum_v pi(v | x, y_<t)^2 ] )``

    and the pair weight ``w(x, y_w) * w(x, y_l)``, clamped to at most 1 and never
    differentiated (as TRL's ``use_weighting``). Args are the exponents, [P]: the per-token
    means of ``log pi(y_t) - log sum_v pi(v)^2`` over each response.
    """
    return torch.clamp(torch.exp(chosen_aligned + rejected_aligned), max=1.0).detach()


def wpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor,
             reference_rejected: Tensor, weights: Tensor, beta: float,
             label_smoothing: float = 0.0) -> PairLosses:
    """WPO, Zhou et al. 2024 (Section 3, the weighted objective instantiated with DPO):
    ``L = -w(x, y_w) w(x, y_l) log sigma(beta * h)``, ``weights`` [P] from
    :func:`wpo_weights` (summed log-probs, as DPO). Rewards as DPO's."""
    dpo = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta,
                   label_smoothing)
    return dpo._replace(losses=dpo.losses * weights)


def ipo_loss(policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor,
             reference_rejected: Tensor, beta: float) -> PairLosses:
    """IPO, Azar et al. 2023 ("A General Theoretical Paradigm to Understand Learning from Human
    Preferences", Eq. 17): ``L = (h - 1 / (2 tau))^2`` with ``tau = beta``, on summed
    (sequence-level) log-probs as the paper defines ``h``. (TRL divides the log-probs by the
    length first; use a larger beta for long responses.) Rewards as DPO's."""
    h = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    return PairLosses((h - 1.0 / (2.0 * beta)) ** 2,
                      (beta * (policy_chosen - reference_chosen)).detach(),
                      (beta * (policy_rejected - reference_rejected)).detach())


# --- the registry ---------------------------------------------------------------------------


class PairInputs(NamedTuple):
    """What the stage measured for the P pairs of a micro-batch, fp32 ``[P]`` each."""

    chosen: Tensor
    """Summed policy log-probs of the chosen responses (differentiable)."""
    rejected: Tensor
    """Summed policy log-probs of the rejected responses (differentiable)."""
    chosen_tokens: Tensor
    """|y_w|: response tokens of each chosen response (>= 1)."""
    rejected_tokens: Tensor
    """|y_l|: response tokens of each rejected response (>= 1)."""
    reference_chosen: Tensor | None = None
    """Summed reference log-probs (None for reference-free losses)."""
    reference_rejected: Tensor | None = None
    weights: Tensor | None = None
    """WPO's pair weights (:func:`wpo_weights`), for losses with ``weighted``."""


@dataclass(frozen=True)
class LossSettings:
    """The ``dpo.*`` hyper-parameters a loss may read."""

    beta: float
    gamma_beta_ratio: float = 0.3
    label_smoothing: float = 0.0


@dataclass(frozen=True)
class PreferenceLoss:
    """One ``dpo.loss`` choice: how to compute it and what the stage must provide."""

    compute: Callable[[PairInputs, LossSettings], PairLosses]
    needs_reference: bool
    """Whether ``reference_*`` log-probs must be in the batch (cached or online reference)."""
    length_normalized: bool
    """Whether it compares per-token means ``log pi(y) / |y|`` (the ``logps/*`` metrics too)."""
    label_smoothing: bool = True
    """Whether ``dpo.label_smoothing`` applies (refused otherwise)."""
    weighted: bool = False
    """Whether it needs WPO's pair weights (one more forward-only log-prob pass, and the
    ``wpo/weight`` metric)."""


LOSSES: dict[str, PreferenceLoss] = {
    "dpo": PreferenceLoss(
        lambda p, s: dpo_loss(p.chosen, p.rejected, p.reference_chosen, p.reference_rejected,
                              s.beta, s.label_smoothing),
        needs_reference=True, length_normalized=False),
    "dpo_norm": PreferenceLoss(
        lambda p, s: dpo_norm_loss(p.chosen, p.rejected, p.reference_chosen,
                                   p.reference_rejected, p.chosen_tokens, p.rejected_tokens,
                                   s.beta, s.label_smoothing),
        needs_reference=True, length_normalized=True),
    "simpo": PreferenceLoss(
        lambda p, s: simpo_loss(p.chosen, p.rejected, p.chosen_tokens, p.rejected_tokens, s.beta,
                                s.gamma_beta_ratio, s.label_smoothing),
        needs_reference=False, length_normalized=True),
    "wpo": PreferenceLoss(
        lambda p, s: wpo_loss(p.chosen, p.rejected, p.reference_chosen, p.reference_rejected,
                              p.weights, s.beta, s.label_smoothing),
        needs_reference=True, length_normalized=False, weighted=True),
    "ipo": PreferenceLoss(
        lambda p, s: ipo_loss(p.chosen, p.rejected, p.reference_chosen, p.reference_rejected,
                              s.beta),
        needs_reference=True, length_normalized=False, label_smoothing=False),
}
"""``dpo.loss`` name -> its :class:`PreferenceLoss` (config validation lists these names)."""


def loss_names() -> tuple[str, ...]:
    """The valid ``dpo.loss`` values, in registry order."""
    return tuple(LOSSES)


def get_loss(name: str) -> PreferenceLoss:
    """The registry entry of ``name``; ValueError naming the valid ones for anything else."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"dpo.loss: {name!r} is not one of {loss_names()}") from None
