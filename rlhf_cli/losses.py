"""Losses as pure functions of tensors: no models, no config objects, unit-testable with plain tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy summed over target tokens, and the number of target tokens.

    logits: (B, T, V); labels: (B, T) with IGNORE_INDEX where no loss is taken. The token at t is
    predicted from position t-1. Returning the sum (not the mean) lets the caller normalise by the
    target count of the whole accumulated batch, so every target token weighs the same whatever
    micro-batch it falls in.
    """
    shifted_logits = logits[:, :-1, :].float()  # (B, T-1, V), fp32 for a stable log-softmax
    targets = labels[:, 1:]  # (B, T-1)
    loss_sum = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.size(-1)),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss_sum, (targets != IGNORE_INDEX).sum()


def count_targets(labels: torch.Tensor) -> torch.Tensor:
    """Target tokens `sft_loss` will count for these labels (B, T)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def bradley_terry(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coefficient: float = 0.0,
) -> torch.Tensor:
    """Per-pair reward-model loss: -log sigmoid(r_c - r_r - margin) + c * (r_c + r_r)^2.

    Bradley-Terry preference likelihood (Ouyang et al. 2022, https://arxiv.org/abs/2203.02155); the
    margin term as in Llama 2 (https://arxiv.org/abs/2307.09288); the centring term keeps scores near
    0 (Eisenstein et al. 2023, https://arxiv.org/abs/2312.09244). The mean over pairs equals TRL's
    RewardTrainer loss. Inputs (B,); returns (B,).
    """
    difference = chosen_scores - rejected_scores
    if margin is not None:
        difference = difference - margin
    losses = -F.logsigmoid(difference)
    if center_coefficient:
        losses = losses + center_coefficient * (chosen_scores + rejected_scores) ** 2
    return losses


DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "simpo")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,  # (B,) summed log-probs of the chosen completion tokens
    policy_rejected_logps: torch.Tensor,  # (B,)
    reference_chosen_logps: torch.Tensor,  # (B,) same under the reference (ignored by simpo)
    reference_rejected_logps: torch.Tensor,  # (B,)
    chosen_lengths: torch.Tensor,  # (B,) number of completion tokens (used by ipo and simpo)
    rejected_lengths: torch.Tensor,  # (B,)
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference loss and implicit rewards: (losses, chosen_rewards, rejected_rewards).

    All inputs are (B,). Log-probs are SUMS over the completion tokens; lengths are the numbers of
    completion tokens (used by "ipo" and "simpo"). With h = (pc - rc) - (pr - rr) and eps the label
    smoothing:

    - "sigmoid": DPO (https://arxiv.org/abs/2305.18290); eps > 0 gives conservative DPO
      (https://ericmitchell.ai/cdpo.pdf): -(1-eps) logsigmoid(beta h) - eps logsigmoid(-beta h).
    - "hinge": RSO / SLiC (https://arxiv.org/abs/2309.06657): relu(1 - beta h).
    - "ipo": IPO (https://arxiv.org/abs/2310.12036) on length-normalised log-ratios:
      (h_norm - 1/(2 beta))^2 with h_norm = (pc - rc)/len_c - (pr - rr)/len_r.
    - "robust": robust DPO (https://arxiv.org/abs/2403.00409):
      (-(1-eps) logsigmoid(beta h) + eps logsigmoid(-beta h)) / (1 - 2 eps).
    - "simpo": SimPO, reference-free (https://arxiv.org/abs/2405.14734):
      -logsigmoid(beta (pc/len_c - pr/len_r) - gamma), cDPO-smoothed when eps > 0 (as TRL's CPO).

    Rewards (detached, (B,)) are beta * (pc - rc) and beta * (pr - rr); for "simpo" beta * pc/len_c
    and beta * pr/len_r. The reference log-probs are ignored by "simpo".
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {DPO_LOSSES}")
    eps = label_smoothing

    if loss_type == "simpo":
        chosen_scores = policy_chosen_logps / chosen_lengths  # (B,) mean log-prob per token
        rejected_scores = policy_rejected_logps / rejected_lengths  # (B,)
        logits = beta * (chosen_scores - rejected_scores) - simpo_gamma  # (B,)
        losses = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
        return losses, beta * chosen_scores.detach(), beta * rejected_scores.detach()

    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,)
    logits = beta * (chosen_logratios - rejected_logratios)  # (B,) beta * h

    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
    elif loss_type == "hinge":
        losses = torch.relu(1 - logits)
    elif loss_type == "ipo":
        h_norm = chosen_logratios / chosen_lengths - rejected_logratios / rejected_lengths  # (B,)
        losses = (h_norm - 1 / (2 * beta)) ** 2
    else:  # robust
        losses = (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def completion_logps(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each row's target tokens, and their count.

    logits: (B, T, V); labels: (B, T) with IGNORE_INDEX off the completion. Token t is scored by the
    logits at t-1; log-softmax in float32. Returns (B,) sums and (B,) counts."""
    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != IGNORE_INDEX
    logprobs = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)  # (B, T-1, V)
    picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return (picked * mask).sum(dim=-1), mask.sum(dim=-1)
