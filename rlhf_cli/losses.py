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
