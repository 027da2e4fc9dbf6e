"""GRPO building blocks in `rlhf_cli.losses`: group advantages and the clipped policy loss against
hand-computed values, the identities between the variants, and TRL's GRPOTrainer loss as an oracle.

Rewards are (N,) with each prompt's G samples consecutive; log-probs are (B, R) over right-padded
response tokens with `mask` 1 on response tokens. Expected values are written out by hand or
computed with plain Python, never with the function under test. float64 throughout, so the
tolerances below are about the formulas, not rounding (float64 rounding is ~1e-16 relative).
"""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from rlhf_cli.losses import (
    STD_EPS,
    aggregate,
    equal_reward_groups,
    group_advantages,
    grpo_policy_loss,
)
from rlhf_cli.schema import ADVANTAGES

F64 = torch.float64
EPS = STD_EPS  # added to every standard deviation before dividing


def _mask(lengths: list[int], width: int) -> torch.Tensor:
    return torch.tensor([[1.0] * n + [0.0] * (width - n) for n in lengths], dtype=F64)


# ---------------------------------------------------------------- advantages, by hand
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0], dtype=F64)  # G = 4: two groups


def test_each_estimator_on_a_hand_computed_example():
    half = [0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]  # r - group mean
    group_std = math.sqrt(4 * 0.25 / 3)  # the first group's sample std; the second's is 0
    expected = {
        "grpo": [v / (group_std + EPS) for v in half[:4]] + [0.0] * 4,
        "dr_grpo": half,
        "rloo": [1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3, 0.0, 0.0, 0.0, 0.0],
        # the batch std of the advantages (their mean is 0): sqrt(4 x 0.25 / 7)
        "reinforce_pp": [v / (math.sqrt(1 / 7) + EPS) for v in half],
    }
    for estimator, values in expected.items():
        got = group_advantages(REWARDS, 4, estimator)
        # float64 against the written-out values: a few roundings of values < 2 (~1e-15)
        torch.testing.assert_close(got, torch.tensor(values, dtype=F64), rtol=1e-12, atol=1e-12)


def test_scale_rewards_replaces_the_division():
    half = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0], dtype=F64)
    # every reward's sample std: mean 1.25, squares 2 x 0.0625 + 2 x 1.5625 + 4 x 0.5625 = 5.5
    batch_std = math.sqrt(5.5 / 7)
    # float64: the std of 8 dyadic rewards to a few ulps (~1e-16); atol=0 keeps the 0s exact
    torch.testing.assert_close(
        group_advantages(REWARDS, 4, "grpo", "batch"), half / (batch_std + EPS), rtol=1e-12, atol=0
    )
    # exact: dyadic rewards, group sums and means (2 / 4, 8 / 4) and differences
    assert torch.equal(group_advantages(REWARDS, 4, "grpo", "none"), half)
    group_std = math.sqrt(1 / 3)
    torch.testing.assert_close(  # float64 std against math.sqrt: ~1e-16; default rtol 1e-7
        group_advantages(REWARDS, 4, "dr_grpo", "group")[:4], half[:4] / (group_std + EPS)
    )


def test_batch_statistics_leave_out_the_filtered_groups():
    """With the flat group marked invalid, the batch std is the first group's alone."""
    valid = torch.tensor([True] * 4 + [False] * 4)
    got = group_advantages(REWARDS, 4, "grpo", "batch", valid)
    torch.testing.assert_close(  # float64 std against math.sqrt: ~1e-16; default rtol 1e-7
        got[:4], torch.tensor([0.5, -0.5, -0.5, 0.5], dtype=F64) / (math.sqrt(1 / 3) + EPS)
    )


# every estimator with every scale it accepts (reinforce_pp takes none: a ConfigError)
COMBINATIONS = [(e, s) for e in ADVANTAGES for s in ("auto", "group", "batch", "none")
                if e != "reinforce_pp" or s == "auto"]  # fmt: skip


@pytest.mark.parametrize(("estimator", "scale"), COMBINATIONS)
def test_a_group_of_equal_rewards_gets_exactly_zero_advantage(estimator, scale):
    rewards = torch.tensor([0.3, 0.3, 0.3, 0.9, 0.1, 0.4], dtype=F64)  # G = 3
    got = group_advantages(rewards, 3, estimator, scale)
    assert torch.equal(got[:3], torch.zeros(3, dtype=F64))
    assert got[3:].abs().sum() > 0


def test_rloo_is_g_over_g_minus_1_times_the_mean_baseline():
    torch.manual_seed(0)
    for group in (2, 3, 8):
        rewards = torch.randn(5 * group, dtype=F64)
        mean = rewards.view(-1, group).mean(dim=1, keepdim=True)
        expected = group / (group - 1) * (rewards.view(-1, group) - mean)
        # two ways of summing a group (<= 8 values |r| < 4): < reordered_sum(8, 32, EPS64) = 5e-14
        torch.testing.assert_close(group_advantages(rewards, group, "rloo"), expected.flatten())


def test_dr_grpo_equals_grpo_when_every_group_std_is_one():
    torch.manual_seed(1)
    raw = torch.randn(6, 5, dtype=F64)
    rewards = ((raw - raw.mean(1, keepdim=True)) / raw.std(1, keepdim=True) + 3.0).flatten()
    # grpo divides by std + EPS = 1 + 1e-4: the same advantages to a relative 1e-4
    torch.testing.assert_close(
        group_advantages(rewards, 5, "grpo"), group_advantages(rewards, 5, "dr_grpo"),
        rtol=1.01 * EPS, atol=0,
    )  # fmt: skip


def test_equal_reward_groups_marks_whole_groups():
    got = equal_reward_groups(torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 2.0]), 2)
    assert got.tolist() == [True, True, False, False, True, True]


# ---------------------------------------------------------------- aggregation, by hand
def test_the_three_aggregations_on_a_hand_computed_example():
    per_token = torch.tensor([[1.0, 3.0, 99.0], [5.0, 99.0, 99.0]], dtype=F64)
    mask = _mask([2, 1], 3)
    # exact: small integers sum exactly, and the quotients 9 / 3, 4 / 2, 7 / 2, 9 / 8 are dyadic
    assert aggregate(per_token, mask, "token_mean").item() == 9 / 3
    assert aggregate(per_token, mask, "seq_mean_token_mean").item() == (2 + 5) / 2
    got = aggregate(per_token, mask, "seq_mean_token_sum_norm", max_tokens=4).item()
    assert got == 9 / (2 * 4)


@pytest.mark.parametrize("how", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_micro_batches_given_the_minibatch_counts_add_up_to_the_whole(how):
    """Gradient accumulation: each micro-batch divided by the minibatch's token / sequence counts,
    summed, is the loss of the whole minibatch."""
    torch.manual_seed(2)
    per_token, mask = torch.randn(6, 5, dtype=F64), _mask([5, 1, 3, 4, 2, 5], 5)
    whole = aggregate(per_token, mask, how, max_tokens=5)
    tokens, sequences = mask.sum(), torch.tensor(6.0, dtype=F64)
    parts = sum(
        aggregate(per_token[i : i + 2], mask[i : i + 2], how, 5, sequences, tokens)
        for i in range(0, 6, 2)
    )
    # float64, 20 terms |x| < 4 in two orders: < reordered_sum(20, 80, EPS64) = 3e-13; default 1e-7
    torch.testing.assert_close(parts, whole)


# ---------------------------------------------------------------- the policy loss
def test_the_ratio_is_one_on_the_first_iteration_and_the_gradient_is_the_policy_gradient():
    torch.manual_seed(3)
    logprobs = torch.randn(3, 4, dtype=F64).requires_grad_()
    mask, advantages = _mask([4, 2, 3], 4), torch.tensor([1.5, -0.5, 0.25], dtype=F64)
    loss, stats = grpo_policy_loss(logprobs, logprobs.detach(), advantages, mask)
    # exact: exp(0) = 1, and a mean of ones or zeros
    assert stats["ratio"].item() == 1.0 and stats["clip_low"] == 0 and stats["clip_high"] == 0
    loss.backward()
    # d/dlogp of -A exp(logp - sg(logp)), token mean over 9 tokens: -A / 9 on each token
    expected = -advantages.unsqueeze(1).expand(3, 4) * mask / 9
    # float64 -A x (1 / 9) against -A / 9: an ulp or two; padding 0 either way
    torch.testing.assert_close(logprobs.grad, expected, rtol=1e-12, atol=1e-15)


def test_gspo_ratio_is_exp_of_the_mean_token_log_ratio():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.7, 0.0]], dtype=F64)
    old = torch.tensor([[-1.1, -2.3, -2.9], [-0.4, -0.9, 5.0]], dtype=F64)
    mask = _mask([3, 2], 3)
    advantages = torch.tensor([1.0, 1.0], dtype=F64)
    loss, stats = grpo_policy_loss(
        logprobs, old, advantages, mask, 10.0, 10.0, "sequence", "seq_mean_token_mean"
    )
    s1 = math.exp((0.1 + 0.3 - 0.1) / 3)
    s2 = math.exp((-0.1 + 0.2) / 2)  # the padding position (5.0) does not count
    # float64: log-ratios like -1 - (-1.1) come out ~1e-16 off 0.1, so ~1e-15 relative
    assert loss.item() == pytest.approx(-(s1 + s2) / 2, rel=1e-12)
    assert stats["ratio"].item() == pytest.approx((3 * s1 + 2 * s2) / 5, rel=1e-12)


def test_clip_higher_clips_each_side_at_its_own_bound():
    logprobs = torch.log(torch.tensor([[1.25, 1.25, 0.7, 0.7]], dtype=F64))
    old = torch.zeros(1, 4, dtype=F64)
    mask = torch.ones(1, 4, dtype=F64)
    # one sequence with A = +1: ratio 1.25 is clipped at 1 + 0.28? no (1.25 < 1.28): unclipped
    loss, stats = grpo_policy_loss(logprobs, old, torch.tensor([1.0], dtype=F64), mask, 0.2, 0.28)
    assert stats["clip_high"].item() == 0.0  # exact: a mean of zeros
    # float64 exp(log r) is r to an ulp or two, ~1e-16 relative
    assert loss.item() == pytest.approx(-(1.25 + 1.25 + 0.7 + 0.7) / 4, rel=1e-12)
    # with A = -1 the low bound 0.8 binds: max(0.7, 0.8) = 0.8 on the two low tokens
    loss, stats = grpo_policy_loss(logprobs, old, torch.tensor([-1.0], dtype=F64), mask, 0.2, 0.28)
    assert stats["clip_low"].item() == 0.5  # exact: 2 / 4
    assert loss.item() == pytest.approx((1.25 + 1.25 + 0.8 + 0.8) / 4, rel=1e-12)


def test_the_kl_term_is_beta_times_k3_per_token():
    logprobs = torch.tensor([[-1.0, -2.0]], dtype=F64)
    ref = torch.tensor([[-1.5, -1.0]], dtype=F64)
    mask = torch.ones(1, 2, dtype=F64)
    loss, stats = grpo_policy_loss(logprobs, logprobs, torch.zeros(1, dtype=F64), mask, ref_logprobs=ref, beta=0.1)  # fmt: skip
    k3 = [math.exp(d) - d - 1 for d in (-0.5, 1.0)]  # d = ref - logp
    # float64; exp(d) - d - 1 cancels to 0.11 from 1.1: ~10 ulps, 2e-15 relative
    assert stats["kl"].item() == pytest.approx(sum(k3) / 2, rel=1e-12)
    assert loss.item() == pytest.approx(0.1 * sum(k3) / 2, rel=1e-12)


# ---------------------------------------------------------------- TRL GRPOTrainer oracle
def _trl_grpo_loss(logprobs, old, ref, advantages, mask, loss_type, importance, beta, low, high, max_tokens):  # fmt: skip
    """TRL 1.16 `GRPOTrainer._compute_loss`, called unbound on a stand-in trainer whose forward
    pass returns the given log-probs."""
    from trl import GRPOTrainer

    rows, width = logprobs.shape
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logprobs, torch.zeros_like(logprobs), None),
        top_entropy_quantile=1.0,
        aux_loss_enabled=False,
        off_policy_mask_threshold=None,
        importance_sampling_level=importance,
        beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        loss_type=loss_type,
        epsilon_low=low,
        epsilon_high=high,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=max_tokens,
        _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        accelerator=SimpleNamespace(
            gather=lambda t: t, gather_for_metrics=lambda t: t, reduce=lambda t, reduction: t,
            num_processes=1,
        ),
    )  # fmt: skip
    inputs = {
        "prompt_ids": torch.zeros(rows, 1, dtype=torch.long),
        "prompt_mask": torch.ones(rows, 1, dtype=torch.long),
        "completion_ids": torch.zeros(rows, width, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": advantages,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }
    return GRPOTrainer._compute_loss(trainer, None, inputs)


OURS = {"grpo": "seq_mean_token_mean", "dr_grpo": "seq_mean_token_sum_norm", "dapo": "token_mean",
        "bnpo": "token_mean"}  # fmt: skip


@pytest.mark.parametrize(
    ("loss_type", "importance"),
    [("grpo", "token"), ("dr_grpo", "token"), ("dapo", "token"), ("bnpo", "token"), ("grpo", "sequence")],
)  # fmt: skip
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_matches_trl_grpo_trainer(loss_type, importance, beta):
    torch.manual_seed(4)
    rows, width = 6, 7
    mask = _mask([7, 3, 5, 1, 6, 4], width)
    old = -torch.rand(rows, width, dtype=F64) * 3
    logprobs = old + 0.3 * torch.randn(rows, width, dtype=F64)  # some ratios outside the clip
    ref = old + 0.2 * torch.randn(rows, width, dtype=F64)
    advantages = torch.randn(rows, dtype=F64)
    theirs = _trl_grpo_loss(logprobs, old, ref, advantages, mask, loss_type, importance, beta, 0.2, 0.28, width)  # fmt: skip
    ours, _ = grpo_policy_loss(
        logprobs, old, advantages, mask, 0.2, 0.28, importance, OURS[loss_type], width, ref, beta
    )
    # the same float64 operations in another order: rounding at 1e-15; the bar is 1e-6
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6, rel=1e-6)
