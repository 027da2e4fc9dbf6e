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
