"""RLVR losses and advantage estimators as pure functions of per-token tensors.

Shapes: every per-token tensor is [b, T], aligned with the labels: position t holds the
quantities of the token predicted at t (the token at t + 1). ``mask`` [b, T] is 1 on response
tokens and 0 elsewhere (prompt, padding); rows are prompt, then response, then padding, so each
row's response is one contiguous run of the mask. Scores are [b] (one verifiable reward per
response). Nothing here communicates, except :func:`whiten` when given a process group.

PPO as in Tülu 3 (Lambert et al., 2024, §6; open-instruct's ``ppo_vllm_thread_ray_gtrl.py``):
per-token reward ``-kl_beta * (log pi - log pi_ref)`` plus the verifiable reward on the last
response token (:func:`ppo_rewards`), GAE (:func:`gae`), whitened advantages (:func:`whiten`),
the clipped surrogate (:func:`ppo_policy_loss`) and the clipped value loss (:func:`value_loss`).
GRPO (Shao et al., 2024, DeepSeekMath): group-normalized advantages (:func:`group_advantages`)
and the clipped surrogate plus ``kl_beta`` times the k3 KL estimator (:func:`grpo_token_loss`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """``log pi(y_t) - log pi_ref(y_t)``: the k1 estimator of KL(pi || pi_ref) per sampled token
    (Schulman, "Approximating KL divergence", 2020); unbiased, can be negative. PPO's penalty."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """``(log pi(y_t) - log pi_ref(y_t))^2 / 2``: the k2 estimator (biased, low variance,
    always >= 0)."""
    return (logprobs - ref_logprobs) ** 2 / 2


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """``pi_ref / pi - log(pi_ref / pi) - 1`` per sampled token: the k3 estimator (unbiased,
    always >= 0) that GRPO adds to its loss (DeepSeekMath eq. 4). With d = log pi - log pi_ref
    it is ``expm1(-d) + d`` (open-instruct's numerically stable form)."""
    d = logprobs - ref_logprobs
    return torch.expm1(-d) + d


KL_ESTIMATORS = {"kl1": kl_k1, "kl2": kl_k2, "kl3": kl_k3}
"""open-instruct's ``kl_estimator`` names (``ppo_vllm_thread_ray_gtrl.py``: kl1 = logprobs -
ref_logprobs, kl2 = kl1^2 / 2, kl3 = exp(-kl1) - 1 + kl1; ``grpo_fast.py`` the same, kl3 as
``expm1(-d) + d``)."""


def kl_estimate(estimator: str, logprobs: torch.Tensor, ref_logprobs: torch.Tensor
                ) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate [b, T] by ``estimator`` (kl1 | kl2 | kl3)."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"rlvr.kl_estimator: {estimator!r} is not one of "
                         f"{tuple(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](logprobs, ref_logprobs)


def ppo_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                mask: torch.Tensor, kl_beta: float, estimator: str = "kl1") -> torch.Tensor:
    """Per-token rewards r_t = -kl_beta * kl_t (``estimator``, default k1) on response tokens,
    plus ``scores`` on each row's last response token (Ziegler et al., 2019, eq. 2; Ouyang et
    al., 2022; Tülu 3 §6.1).

    Returns [b, T] (0 off the mask). A row with an empty response gets no reward at all.
    """
    rewards = -kl_beta * kl_estimate(estimator, logprobs, ref_logprobs) * mask
    last = last_index(mask)
    has = last >= 0
    rows = torch.nonzero(has).flatten()
    rewards[rows, last[rows]] += scores[rows].to(rewards.dtype)
    return rewards


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last masked position [b] (-1 for an empty row)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask > 0, positions, torch.full_like(positions, -1)).amax(dim=1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al., 2016, eq. 16) over response tokens:
    ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lam A_{t+1}``, with V and A
    zero past the last response token. Returns (advantages, returns = A + V), 0 off the mask."""
    mask = mask.to(values.dtype)
    values = values * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_adv) * mask[:, t]
        next_value, next_adv = values[:, t], advantages[:, t]
    return advantages, (advantages + values) * mask


def masked_moments(x: torch.Tensor, mask: torch.Tensor,
                   group: dist.ProcessGroup | None = None) -> tuple[float, float, float]:
    """(mean, population variance, count) of ``x`` over masked elements, summed over ``group``
    (the data-parallel ranks) when given, so every layout sees the same global batch."""
    mask = mask.to(torch.float64)
    xd = x.to(torch.float64)
    stats = torch.stack([(xd * mask).sum(), (xd * xd * mask).sum(), mask.sum()])
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(stats, group=group)
    total, total_sq, count = stats.tolist()
    mean = total / count if count else 0.0
    return mean, max(total_sq / count - mean * mean, 0.0) if count else 0.0, count


def whiten(x: torch.Tensor, mask: torch.Tensor, group: dist.ProcessGroup | None = None,
           shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked elements (open-instruct's ``masked_whiten``:
    unbiased variance) of the global batch (``group``: data-parallel ranks). ``shift_mean=False``
    keeps the mean. 0 off the mask."""
    mean, var, count = masked_moments(x, mask, group)
    if count < 2:
        raise ValueError(f"whiten: need at least 2 masked values, got {count:g}")
    var = var * count / (count - 1)
    out = (x.to(torch.float64) - mean) / (var + eps) ** 0.5
    if not shift_mean:
        out = out + mean
    return (out * mask.to(torch.float64)).to(x.dtype)


def group_advantages(scores: torch.Tensor, group_size: int, eps: float = 1e-8) -> torch.Tensor:
    """GRPO's outcome advantages (DeepSeekMath §4.1.2): ``(r_i - mean(r)) / (std(r) + eps)``
    within each group of ``group_size`` consecutive samples of one prompt. ``std`` is the
    population one (ddof 0), as open-instruct's grpo_fast; a group whose samples all score the
    same gets advantage 0. Returns [b] (broadcast over the response tokens by the caller)."""
    if scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size}")
    groups = scores.to(torch.float64).reshape(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True, correction=0)
    return ((groups - mean) / (std + eps)).reshape(-1).to(torch.float32)


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                    advantages: torch.Tensor, clip: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token (Schulman et al., 2017, eq. 7), as a loss:
    ``max(-A rho, -A clip(rho, 1 - eps, 1 + eps))`` with ``rho = exp(logp - logp_old)``.

    Returns (loss [b, T], clipped [b, T] bool: where the clipped term is the larger one).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def grpo_token_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                    ref_logprobs: torch.Tensor, advantages: torch.Tensor, clip: float,
                    kl_beta: float, estimator: str = "kl3") -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's per-token loss (DeepSeekMath eq. 3, negated): the clipped surrogate plus
    ``kl_beta * kl(pi || pi_ref)`` (``estimator``, default k3). Returns (loss [b, T], clipped
    [b, T])."""
    surrogate, was_clipped = ppo_policy_loss(logprobs, old_logprobs, advantages, clip)
    return (surrogate + kl_beta * kl_estimate(estimator, logprobs, ref_logprobs),
            was_clipped)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               value_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss per token (Schulman et al., 2017, PPO's baselines; Tülu 3's
    ``vf_loss``): ``0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)``.

    Returns (loss [b, T], clipped [b, T] bool: where the clipped term is the larger one).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
    plain = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(plain, clipped), clipped > plain


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       group: dist.ProcessGroup | None = None) -> float:
    """``1 - Var[R - V] / Var[R]`` over masked tokens of the global batch (``group``): 1 is a
    perfect value function, 0 no better than a constant, negative worse (NaN when the returns
    have no variance)."""
    _, var_r, _ = masked_moments(returns, mask, group)
    _, var_err, _ = masked_moments(returns - values, mask, group)
    return 1.0 - var_err / var_r if var_r > 0 else float("nan")
