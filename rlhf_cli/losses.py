"""Losses as pure functions of tensors: no models, no config objects, unit-testable with plain tensors."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from rlhf_cli.schema import ADVANTAGES, KTO_LOSSES, LOSS_AGGREGATIONS, NATURAL_SCALE

IGNORE_INDEX = -100


def wide(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32 for a stable log-softmax, or float64 as it is (what exactness tests run in)."""
    return x if x.dtype == torch.float64 else x.float()


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy summed over target tokens, and the number of target tokens.

    logits: (B, T, V); labels: (B, T) with IGNORE_INDEX where no loss is taken. The token at t is
    predicted from position t-1. Returning the sum (not the mean) lets the caller normalise by the
    target count of the whole accumulated batch, so every target token weighs the same whatever
    micro-batch it falls in.
    """
    shifted_logits = wide(logits[:, :-1, :])  # (B, T-1, V), fp32 for a stable log-softmax
    targets = labels[:, 1:]  # (B, T-1)
    loss_sum = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.size(-1)),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss_sum, (targets != IGNORE_INDEX).sum()


def target_token_loss(logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sft_loss from the (N,) log-probs of the target tokens alone (modeling.target_logprobs):
    (summed cross-entropy in float32, N)."""
    return -logprobs.sum(), torch.tensor(logprobs.numel(), device=logprobs.device)


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


ORPO = "orpo"  # dpo.loss=orpo: reference-free, with the SFT term (`orpo_loss`)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012: log1p(-exp(x)) below -ln 2,
    log(-expm1(x)) above it)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    chosen_logps: torch.Tensor,  # (B,) summed log-probs of the chosen completion tokens
    rejected_logps: torch.Tensor,  # (B,)
    chosen_lengths: torch.Tensor,  # (B,) completion tokens
    rejected_lengths: torch.Tensor,  # (B,)
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO (Hong et al. 2024, https://arxiv.org/abs/2403.07691), reference-free: per pair
    NLL(chosen) - beta * logsigmoid(log odds(chosen) - log odds(rejected)).

    With the per-token mean log-probs p = logps / lengths, odds(y) = P(y) / (1 - P(y)) taken on
    P(y) = exp(p), so log odds = p - log(1 - exp(p)). The NLL term is the chosen completion's mean
    per-token negative log-likelihood (the paper's L_SFT, eq. 2); beta is the paper's lambda.
    Returns (losses (B,), chosen_rewards, rejected_rewards, parts) with rewards beta * p (as TRL
    logs them) and parts {"nll": (B,), "log_odds": (B,)} detached, for metrics."""
    chosen_mean = chosen_logps / chosen_lengths  # (B,) mean log-prob per token
    rejected_mean = rejected_logps / rejected_lengths
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    nll = -chosen_mean
    losses = nll - beta * F.logsigmoid(log_odds)
    parts = {"nll": nll.detach(), "log_odds": log_odds.detach()}
    return losses, beta * chosen_mean.detach(), beta * rejected_mean.detach(), parts


def kto_kl_estimate(
    policy_kl_logps: torch.Tensor, reference_kl_logps: torch.Tensor
) -> torch.Tensor:
    """KTO's reference point z0: the batch mean of log pi(y'|x) - log pi_ref(y'|x) over mismatched
    (x, y') pairs (each prompt with another row's completion), clamped at 0 and detached: an
    estimate of KL(pi || pi_ref) that carries no gradient (Ethayarajh et al. 2024, sec. 3.2)."""
    return (policy_kl_logps - reference_kl_logps).mean().clamp(min=0).detach()


def kto_loss(
    policy_logps: torch.Tensor,  # (B,) summed completion log-probs under the policy
    reference_logps: torch.Tensor,  # (B,) same under the reference
    desirable: torch.Tensor,  # (B,) bool: the row's label
    kl: torch.Tensor,  # () the reference point z0 (`kto_kl_estimate`); ignored by apo_zero_unpaired
    loss_type: str = "kto",
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row KTO loss and implied rewards: (losses (B,), rewards (B,) detached).

    With r = log pi(y|x) - log pi_ref(y|x):
    - "kto" (Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306, eq. 7): a desirable row
      costs w_D (1 - sigmoid(beta (r - z0))), an undesirable one w_U (1 - sigmoid(beta (z0 - r))).
    - "apo_zero_unpaired" (D'Oosterlinck et al. 2024, https://arxiv.org/abs/2408.06266, unpaired):
      w_D (1 - sigmoid(beta r)) and w_U sigmoid(beta r), no reference point.
    Rewards are beta * r. The mean of the losses over a batch equals TRL's KTOTrainer loss."""
    if loss_type not in KTO_LOSSES:
        raise ValueError(f"unknown KTO loss_type {loss_type!r}; expected one of {KTO_LOSSES}")
    logratios = policy_logps - reference_logps  # (B,)
    if loss_type == "kto":
        good = 1 - torch.sigmoid(beta * (logratios - kl))
        bad = 1 - torch.sigmoid(beta * (kl - logratios))
    else:
        good = 1 - torch.sigmoid(beta * logratios)
        bad = torch.sigmoid(beta * logratios)
    losses = torch.where(desirable, desirable_weight * good, undesirable_weight * bad)
    return losses, beta * logratios.detach()


def completion_logps(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each row's target tokens, and their count.

    logits: (B, T, V); labels: (B, T) with IGNORE_INDEX off the completion. Token t is scored by the
    logits at t-1; log-softmax in float32. Returns (B,) sums and (B,) counts."""
    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != IGNORE_INDEX
    logprobs = torch.log_softmax(wide(logits[:, :-1, :]), dim=-1)  # (B, T-1, V)
    picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return (picked * mask).sum(dim=-1), mask.sum(dim=-1)


def completion_logps_at_targets(
    logprobs: torch.Tensor, rows: torch.Tensor, num_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """completion_logps from the (N,) log-probs of the target tokens alone and the (N,) rows they
    belong to (modeling.target_logprobs) -> (num_rows,) summed log-probs and (num_rows,) counts."""
    sums = torch.zeros(num_rows, dtype=logprobs.dtype, device=logprobs.device)
    return sums.index_add(0, rows, logprobs), torch.bincount(rows, minlength=num_rows)


# ---------------------------------------------------------------- PPO
# Shapes: (B, R) over the response tokens of B episodes; `mask` is 1 on response tokens (up to and
# including the first EOS) and 0 on the padding after them. Padding contributes exactly 0.


def masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`values` where mask is 1, exactly 0 elsewhere (even where values are inf or nan, which a
    multiplication by the mask would turn into nan)."""
    return torch.where(
        mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device)
    )


def same(total: torch.Tensor) -> torch.Tensor:
    """The `reduce` of a single process: its own sums are the totals."""
    return total


def masked_mean(
    values: torch.Tensor, mask: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor] = same
) -> torch.Tensor:
    """Mean over the positions where mask is 1 (0 when there are none). `reduce` turns this
    process's (sum, count) into the totals over all processes (`distributed.all_sum`), so the mean
    is the one over every process's positions."""
    totals = reduce(torch.stack([masked(values, mask).sum(), mask.sum().to(values.dtype)]))
    return totals[0] / totals[1].clamp(min=1)


def masked_whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    reduce: Callable[[torch.Tensor], torch.Tensor] = same,
) -> torch.Tensor:
    """(values - mean) / std over the masked positions (mean kept when shift_mean is False), with
    the mean and variance taken over every process's positions (see `masked_mean`); masked-out
    positions come back as 0."""
    mean = masked_mean(values, mask, reduce)
    var = masked_mean((values - mean) ** 2, mask, reduce)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return masked(whitened, mask)


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1"
) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) on tokens sampled from the policy (Schulman,
    http://joschu.net/blog/kl-approx.html). With logr = ref - logp: k1 = -logr (unbiased, can be
    negative per token), k3 = (exp(logr) - 1) - logr (unbiased and always >= 0)."""
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected k1 or k3")


def missing_eos_penalty(scores: torch.Tensor, ended: torch.Tensor, penalty: float) -> torch.Tensor:
    """Scores (B,) with `penalty` subtracted where the response never emitted EOS (ended False):
    without it the policy can learn to ramble up to the token limit."""
    return scores - penalty * (~ended.bool()).to(scores.dtype)


def shaped_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards (B, R): -kl_coef * kl on every response token, plus each episode's score
    (B,) on its last response token (Ziegler et al. 2019, https://arxiv.org/abs/1909.08593)."""
    rewards = masked(-kl_coef * kl, mask)
    last = (mask.sum(dim=1) - 1).clamp(min=0).long()  # (B,) index of the last response token
    rows = torch.arange(rewards.size(0), device=rewards.device)
    rewards[rows, last] += scores * (mask.sum(dim=1) > 0)
    return rewards


def pack(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, R) -> (B, R): each row's masked entries moved to its front, in order (the rest after
    them). A multi-turn episode's policy tokens, with the environment's tokens between its turns
    taken out, form one sequence for GAE: the environment's messages are transitions of the MDP,
    not actions. A mask that is already a prefix (one turn) leaves the row as it is."""
    return values.gather(1, _packing_order(mask))


def unpack(packed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack` on the masked entries; 0 elsewhere."""
    out = torch.zeros_like(packed).scatter(1, _packing_order(mask), packed)
    return out * mask.to(out.dtype)


def _packing_order(mask: torch.Tensor) -> torch.Tensor:
    """(B, R) column indices: the masked columns in order, then the others in order."""
    width = mask.size(1)
    columns = torch.arange(width, device=mask.device).expand_as(mask)
    key = torch.where(mask.bool(), columns, columns + width)  # masked first, order kept
    return key.argsort(dim=1, stable=True)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2015, https://arxiv.org/abs/1506.02438)
    over right-padded responses; the episode ends after its last masked token (V = 0 beyond it).

    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1};
    returns = A + V. Returns (advantages, returns), both 0 on padding."""
    values, rewards = masked(values, mask), masked(rewards, mask)
    mask = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    next_advantage = torch.zeros_like(values[:, 0])
    length = values.size(1)
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
    return advantages, masked(advantages + values, mask)


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate (Schulman et al. 2017, https://arxiv.org/abs/1707.06347), token mean:
    mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))). Returns (loss, detached stats:
    clipfrac, approxkl = 0.5 * mean((logp - old)^2), ratio mean)."""
    log_ratio = masked(logprobs - old_logprobs, mask)  # 0 on padding: no overflow there
    ratio = torch.exp(log_ratio)
    advantages = masked(advantages, mask)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approxkl": 0.5 * masked_mean(log_ratio**2, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * mean(max((V - R)^2, (clip(V, V_old +- c) - R)^2)) over tokens.
    Returns (loss, detached stats: clipfrac)."""
    values, old_values, returns = (masked(t, mask) for t in (values, old_values, returns))
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_loss, clipped_loss), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped_loss > unclipped_loss).float(), mask)}
    return loss, stats


def explained_variance(
    predicted: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    reduce: Callable[[torch.Tensor], torch.Tensor] = same,
) -> float:
    """1 - Var(target - predicted) / Var(target) over masked positions (1 = perfect, 0 = no better
    than the mean, negative = worse); over every process's positions with `reduce`."""
    target_var = masked_mean((target - masked_mean(target, mask, reduce)) ** 2, mask, reduce)
    residual = target - predicted
    residual_var = masked_mean((residual - masked_mean(residual, mask, reduce)) ** 2, mask, reduce)
    return float("nan") if target_var.item() == 0 else (1 - residual_var / target_var).item()


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of softmax(logits) in float32: logsumexp(z) - sum(p * z)."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log softmax(logits / T) at `tokens`, in float32: logits (B, R, V) already aligned so that
    logits[:, t] predicts tokens[:, t]. Returns (B, R)."""
    logprobs = torch.log_softmax(wide(logits) / temperature, dim=-1)
    return logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


# ---------------------------------------------------------------- GRPO and its variants
# Rewards (N,) of N = prompts x G episodes, each prompt's G samples consecutive (one group).
# The source of each estimator and loss is in docs/grpo.md.
STD_EPS = 1e-4  # added to a standard deviation before dividing: a group of near-equal rewards


def _batch_std(
    values: torch.Tensor, valid: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Sample standard deviation (Bessel-corrected, as torch.std) of `values` where `valid`, over
    every process's values (`reduce`, see masked_mean)."""
    valid = valid.to(values.dtype)
    totals = reduce(torch.stack([(values * valid).sum(), valid.sum()]))
    mean = totals[0] / totals[1].clamp(min=1)
    squares = reduce(torch.stack([(((values - mean) * valid) ** 2).sum(), valid.sum()]))
    return torch.sqrt(squares[0] / (squares[1] - 1).clamp(min=1))


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    estimator: str = "grpo",
    scale: str = "auto",
    valid: torch.Tensor | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] = same,
) -> torch.Tensor:
    """(N,) advantages from (N,) rewards with the group as the baseline.

    grpo: r - group mean, / group std (Shao et al. 2024). dr_grpo: r - group mean (Liu et al.
    2025). rloo: r - the mean of the other G - 1 = G / (G - 1) x (r - group mean) (Ahmadian et al.
    2024). reinforce_pp: r - group mean, / its std over the batch (Hu et al. 2025; its batch mean is
    0 by construction). `scale` (auto: the estimator's own) replaces the division: group (the
    group's std), batch (the std of every reward in the batch, Liu et al. 2025's "group mean, batch
    std") or none. `valid` (N,) marks the episodes batch statistics count (filtered groups out);
    `reduce` sums them over processes. A group of equal rewards gets exactly 0."""
    if estimator not in ADVANTAGES:
        raise ValueError(f"unknown advantage estimator {estimator!r}; expected one of {ADVANTAGES}")
    groups = rewards.view(-1, group_size)
    valid = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid.bool()
    total = groups.sum(dim=1, keepdim=True)
    if estimator == "rloo":
        advantages = groups - (total - groups) / (group_size - 1)
    else:
        advantages = groups - total / group_size
    scale = NATURAL_SCALE[estimator] if scale == "auto" else scale
    if estimator == "reinforce_pp":
        advantages = advantages / (_batch_std(advantages.flatten(), valid, reduce) + STD_EPS)
    elif scale == "group":
        advantages = advantages / (groups.std(dim=1, keepdim=True) + STD_EPS)
    elif scale == "batch":
        advantages = advantages / (_batch_std(rewards, valid, reduce) + STD_EPS)
    elif scale != "none":
        raise ValueError(f"unknown reward scale {scale!r}; expected auto, group, batch or none")
    # a flat group has no signal: exactly 0, not the rounding of r - sum / G (~1e-17)
    flat = equal_reward_groups(rewards, group_size).view_as(groups)
    return advantages.masked_fill(flat, 0.0).flatten()


def equal_reward_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) bool: the episode's group gave every sample the same reward (no learning signal)."""
    groups = rewards.view(-1, group_size)
    same_rewards = (groups == groups[:, :1]).all(dim=1, keepdim=True)
    return same_rewards.expand_as(groups).flatten()


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    how: str,
    max_tokens: int | None = None,
    sequences: torch.Tensor | float | None = None,
    tokens: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """One loss from per-token losses (B, R). token_mean: over all tokens (DAPO); seq_mean_token_mean:
    each sequence's token mean, then the mean over sequences (the GRPO paper); seq_mean_token_sum_norm:
    token sums over the constant `max_tokens`, then the mean over sequences (Dr. GRPO).
    `sequences` / `tokens`: the counts to divide by when this batch is part of a larger one (the
    micro-batches of a minibatch on every process); this batch's own counts otherwise."""
    mask = mask.to(per_token.dtype)
    summed = masked(per_token, mask)
    if how == "token_mean":
        return summed.sum() / (mask.sum() if tokens is None else tokens).clamp(min=1)
    count = torch.as_tensor(
        (mask.sum(dim=1) > 0).sum() if sequences is None else sequences, dtype=per_token.dtype
    ).clamp(min=1)
    if how == "seq_mean_token_mean":
        return (summed.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum() / count
    if how == "seq_mean_token_sum_norm":
        if max_tokens is None:
            raise ValueError("seq_mean_token_sum_norm needs max_tokens (the generation limit)")
        return summed.sum() / (count * max_tokens)
    raise ValueError(f"unknown loss aggregation {how!r}; expected one of {LOSS_AGGREGATIONS}")


def grpo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    importance: str = "token",
    loss_agg: str = "token_mean",
    max_tokens: int | None = None,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    sequences: torch.Tensor | float | None = None,
    tokens: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate of GRPO with one advantage (B,) per sequence:
    per token max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)) (DAPO's clip-higher when the two
    differ), + beta x k3 KL to the reference per token (Shao et al. 2024), aggregated by `loss_agg`
    (`aggregate`). importance=token: r = pi / pi_old per token; sequence (GSPO, Zheng et al. 2025):
    r = exp(mean over the sequence's tokens of log(pi / pi_old)), one ratio per sequence.
    Returns (loss, detached stats: clip fractions low/high, ratio, approxkl, kl)."""
    mask = mask.to(logprobs.dtype)
    log_ratio = masked(logprobs - old_logprobs, mask)  # 0 on padding: no overflow there
    if importance == "sequence":
        per_sequence = log_ratio.sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        log_ratio = per_sequence.unsqueeze(1).expand_as(logprobs)
    elif importance != "token":
        raise ValueError(f"unknown importance level {importance!r}; expected token or sequence")
    ratio = torch.exp(log_ratio)
    advantage = advantages.to(logprobs.dtype).unsqueeze(1)
    unclipped = -advantage * ratio
    clipped = -advantage * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    kl = None
    if beta != 0.0:
        if ref_logprobs is None:
            raise ValueError("beta != 0 needs the reference's log-probs")
        kl = kl_penalty(logprobs, ref_logprobs, "k3")
        per_token = per_token + beta * kl
    loss = aggregate(per_token, mask, loss_agg, max_tokens, sequences, tokens)
    with torch.no_grad():
        stats = {
            "clip_low": masked_mean(
                ((ratio < 1 - clip_low) & (advantage < 0)).to(mask.dtype), mask
            ),
            "clip_high": masked_mean(
                ((ratio > 1 + clip_high) & (advantage > 0)).to(mask.dtype), mask
            ),
            "ratio": masked_mean(ratio, mask),
            "approxkl": 0.5 * masked_mean(log_ratio**2, mask),
            "kl": masked_mean(kl, mask) if kl is not None else torch.zeros((), dtype=mask.dtype),
        }
    return loss, stats
