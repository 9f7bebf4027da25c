"""Preference losses, with TRL's metric names so dashboards line up.

Conventions (the callers compute the log-probs; see mint/optim/module.py):
- ORPO takes the *mean* token log-prob of each answer (log P in the ORPO paper
  is length-normalised) and an NLL term computed by the caller. By default that
  NLL covers the chosen answer's tokens only; `optim.sft_on_prompt=true` makes it
  cover prompt + chosen, which is what TRL's ORPOTrainer does for decoder-only
  models.
- DPO takes *summed* token log-probs of each answer for the policy and the
  reference (Rafailov et al. 2023, as TRL's sigmoid loss).
Both return `(loss, metrics)`; metrics are detached batch means.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_LN2 = math.log(2.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate across the whole range.

    Mächler (2012): log1p(-exp(x)) loses nothing for x < -ln2, log(-expm1(x))
    loses nothing for -ln2 <= x < 0. The naive form rounds 1 - e^x to 0 (-> -inf)
    when x is near 0, i.e. exactly when the model is confident in an answer.
    """
    far = x < -_LN2
    # Each branch gets a harmless input where it is not used: torch.where still
    # back-propagates through both, and an inf there would turn the gradient NaN.
    far_branch = torch.log1p(-torch.exp(torch.where(far, x, -1.0)))
    near_branch = torch.log(-torch.expm1(torch.where(far, -1.0, x)))
    return torch.where(far, far_branch, near_branch)


def _clamp_below_zero(logps: torch.Tensor) -> torch.Tensor:
    # A mean log-prob of exactly 0 (every token certain to machine precision)
    # would make the odds infinite; the smallest normal number keeps the
    # log-odds and its gradient finite and changes no representable log-prob.
    return logps.clamp(max=-torch.finfo(logps.dtype).tiny)


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    nll_loss: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO (Hong, Lee, Thorne 2024): L = NLL + beta * -log σ(log odds_w - log odds_l).

    `beta` is the paper's lambda (TRL's name). Log-probs are per-example means
    over answer tokens, shape [B]; `nll_loss` is a scalar.
    """
    chosen = _clamp_below_zero(policy_chosen_logps.float())
    rejected = _clamp_below_zero(policy_rejected_logps.float())
    # log odds(y) = log P - log(1 - P); their difference between chosen and rejected:
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    log_sigmoid_odds = F.logsigmoid(log_odds)
    loss = nll_loss - beta * log_sigmoid_odds.mean()

    rewards_chosen = beta * chosen.detach()
    rewards_rejected = beta * rejected.detach()
    metrics = {
        "rewards/chosen": rewards_chosen.mean(),
        "rewards/rejected": rewards_rejected.mean(),
        "rewards/accuracies": (rewards_chosen > rewards_rejected).float().mean(),
        "rewards/margins": (rewards_chosen - rewards_rejected).mean(),
        "logps/chosen": chosen.detach().mean(),
        "logps/rejected": rejected.detach().mean(),
        "nll_loss": nll_loss.detach(),
        "log_odds_ratio": log_sigmoid_odds.detach().mean(),
        "log_odds_chosen": log_odds.detach().mean(),
    }
    return loss, metrics


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO with the sigmoid loss: -log σ(β[(π_w - ref_w) - (π_l - ref_l)]).

    All log-probs are per-example sums over answer tokens, shape [B].
    An NLL term on the chosen answer (TRL's `rpo_alpha`) is added by the caller.
    """
    chosen_logratio = policy_chosen_logps.float() - ref_chosen_logps.float()
    rejected_logratio = policy_rejected_logps.float() - ref_rejected_logps.float()
    losses = -F.logsigmoid(beta * (chosen_logratio - rejected_logratio))

    rewards_chosen = beta * chosen_logratio.detach()
    rewards_rejected = beta * rejected_logratio.detach()
    metrics = {
        "rewards/chosen": rewards_chosen.mean(),
        "rewards/rejected": rewards_rejected.mean(),
        "rewards/accuracies": (rewards_chosen > rewards_rejected).float().mean(),
        "rewards/margins": (rewards_chosen - rewards_rejected).mean(),
        "logps/chosen": policy_chosen_logps.detach().float().mean(),
        "logps/rejected": policy_rejected_logps.detach().float().mean(),
    }
    return losses.mean(), metrics
