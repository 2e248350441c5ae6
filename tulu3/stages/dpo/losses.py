"""Preference losses on per-pair tensors: dpo, dpo_norm, simpo, wpo, ipo.

Every function takes sequence-level log-probs of the response tokens of P pairs (fp32 ``[P]``:
``policy_*`` with gradients, ``reference_*`` without) and returns a :class:`PairLosses` of
``[P]`` tensors: the per-pair loss and the implicit rewards the metrics report. Nothing here
knows about models, batches or process groups (tulu3/stages/dpo.py feeds these).

Notation: ``h = (log pi(y_w) - log pi(y_l)) - (log ref(y_w) - log ref(y_l))`` (the policy's
log-ratio margin over the reference's), ``sigma`` the logistic function, ``beta`` the inverse
temperature. Chosen = y_w, rejected = y_l.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

LOSSES = ("dpo", "dpo_norm", "simpo", "wpo", "ipo")
NEEDS_REFERENCE = ("dpo", "dpo_norm", "wpo", "ipo")
LENGTH_NORMALIZED = ("dpo_norm", "simpo")
"""Losses whose log-probs are per-token means over the response (the others use sums)."""


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
