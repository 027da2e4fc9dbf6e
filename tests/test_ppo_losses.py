"""PPO building blocks in `rlhf_cli.losses` against hand-computed values and known identities.

Shapes are (B, R) over response tokens, right-padded; `mask` is 1 on response tokens and 0 on the
padding after them. Expected values are written out as plain Python floats or computed with plain
Python loops, never with the function under test.
"""

import math

import pytest
import torch

from rlhf_cli import losses
from rlhf_cli.losses import (
    entropy_from_logits,
    explained_variance,
    gae,
    kl_penalty,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    shaped_rewards,
    token_logprobs,
)

from numerics import EPS32, log_softmax_error, reordered_sum

F64 = torch.float64


def _lengths_mask(lengths: list[int], width: int) -> torch.Tensor:
    """Right-padded float mask: row i has lengths[i] ones, then zeros."""
    return torch.tensor([[1.0] * n + [0.0] * (width - n) for n in lengths], dtype=F64)


# ---------------------------------------------------------------- masked_mean


def test_masked_mean_ignores_padding_and_is_zero_when_empty():
    """Mean over mask == 1 only; an all-zero mask gives 0 rather than NaN."""
    values = torch.tensor([[1.0, 2.0, 1e6], [3.0, 1e6, -1e6]], dtype=F64)
    mask = _lengths_mask([2, 1], 3)
    # exact: small integers sum exactly (the 1e6 are replaced by 0, not multiplied), and 6 / 3 = 2
    assert masked_mean(values, mask).item() == (1.0 + 2.0 + 3.0) / 3
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0


# ---------------------------------------------------------------- GAE


def test_gae_hand_computed_with_padding():
    """GAE matches hand-written delta_t / A_t; a short row ends at its last valid token (V = 0
    beyond it) and its padded advantages and returns are exactly 0."""
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[1.0, 0.5, 2.0], [0.2, -1.0, 99.0]], dtype=F64)
    values = torch.tensor([[0.4, 0.3, 0.6], [0.5, 0.1, 7.0]], dtype=F64)
    mask = _lengths_mask([3, 2], 3)

    advantages, returns = gae(rewards, values, mask, gamma, lam)

    # row 0 (full length 3):
    # delta_2 = 2.0 + 0.9 * 0   - 0.6 = 1.4
    # delta_1 = 0.5 + 0.9 * 0.6 - 0.3 = 0.74
    # delta_0 = 1.0 + 0.9 * 0.3 - 0.4 = 0.87
    # A_2 = 1.4;  A_1 = 0.74 + 0.72 * 1.4 = 1.748;  A_0 = 0.87 + 0.72 * 1.748 = 2.12856
    # row 1 (length 2, so the episode ends at t = 1 and the padded 99.0 / 7.0 are ignored):
    # delta_1 = -1.0 + 0.9 * 0   - 0.1 = -1.1
    # delta_0 =  0.2 + 0.9 * 0.1 - 0.5 = -0.21
    # A_1 = -1.1;  A_0 = -0.21 + 0.72 * (-1.1) = -1.002
    expected_adv = [[2.12856, 1.748, 1.4], [-1.002, -1.1, 0.0]]
    expected_ret = [[2.12856 + 0.4, 1.748 + 0.3, 1.4 + 0.6], [-1.002 + 0.5, -1.1 + 0.1, 0.0]]
    # float64 against decimals: a few roundings of values < 3 (~1e-15); default rtol/atol 1e-7
    torch.testing.assert_close(advantages, torch.tensor(expected_adv, dtype=F64))
    torch.testing.assert_close(returns, torch.tensor(expected_ret, dtype=F64))
    assert advantages[1, 2].item() == 0.0
    assert returns[1, 2].item() == 0.0


def test_gae_non_finite_padding_does_not_leak():
    """An inf reward / value on a padded position leaves the valid advantages finite and exact."""
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    rewards = torch.tensor([[0.0, 1.0, float("inf")]])
    values = torch.tensor([[0.0, 0.0, float("inf")]])

    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)

    # exact: gamma = lambda = 1 and rewards 0 and 1: every step adds or multiplies small integers
    assert torch.equal(advantages, torch.tensor([[1.0, 1.0, 0.0]]))
    assert torch.equal(returns, torch.tensor([[1.0, 1.0, 0.0]]))


def test_gae_gamma_lambda_one_zero_values_is_reward_to_go():
    """gamma = lambda = 1 and V = 0: advantages are the reward-to-go over valid tokens, returns
    equal advantages, and padding is 0."""
    g = torch.Generator().manual_seed(0)
    batch, width = 6, 7
    lengths = [int(n) for n in torch.randint(0, width + 1, (batch,), generator=g)]
    lengths[0], lengths[1] = width, 0  # always cover a full row and an empty row
    mask = _lengths_mask(lengths, width)
    rewards = torch.randn(batch, width, generator=g, dtype=F64)
    values = torch.zeros(batch, width, dtype=F64)

    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)

    expected = [[0.0] * width for _ in range(batch)]
    for i, n in enumerate(lengths):
        running = 0.0
        for t in reversed(range(n)):
            running += rewards[i, t].item()
            expected[i][t] = running
    # exact: with gamma = lambda = 1 and V = 0, gae adds r_t + A_(t+1) in this loop's order (the
    # other terms are x * 1.0 and x + 0.0), and returns = A + 0
    assert torch.equal(advantages, torch.tensor(expected, dtype=F64))
    assert torch.equal(returns, advantages)


# ---------------------------------------------------------------- KL penalty


def test_kl_penalty_k1_k3_pointwise():
    """k1 == logp - ref; k3 >= 0 everywhere (even for huge differences); both exactly 0 at
    logp == ref; k3 matches (r - 1) - log r with log r = ref - logp."""
    g = torch.Generator().manual_seed(1)
    logp = torch.randn(4, 50, generator=g) * torch.tensor([0.01, 1.0, 10.0, 80.0]).unsqueeze(1)
    ref = torch.randn(4, 50, generator=g) * torch.tensor([0.01, 1.0, 10.0, 80.0]).unsqueeze(1)

    assert torch.equal(kl_penalty(logp, ref, "k1"), logp - ref)  # exact: -(b - a) is a - b
    assert torch.equal(kl_penalty(logp, ref), kl_penalty(logp, ref, "k1"))  # k1 is the default
    k3 = kl_penalty(logp, ref, "k3")
    assert (k3 >= 0).all()
    assert not torch.isnan(k3).any()
    for a, b in [(-1.0, -2.0), (-3.0, -0.5), (0.0, -5.0)]:
        logr = b - a
        expected = (math.exp(logr) - 1.0) - logr
        got = kl_penalty(torch.tensor([a], dtype=F64), torch.tensor([b], dtype=F64), "k3")
        # float64 expm1 against exp - 1: the worst cancellation (0.61 + 0.5 - 1) costs ~10 ulps
        assert got.item() == pytest.approx(expected, rel=1e-12)

    for estimator in ("k1", "k3"):
        assert torch.equal(kl_penalty(logp, logp.clone(), estimator), torch.zeros_like(logp))


def test_kl_penalty_unknown_estimator_raises():
    """An estimator name other than k1 / k3 is a ValueError."""
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError):
        kl_penalty(x, x, "k2")


def test_kl_penalty_monte_carlo_matches_exact_kl():
    """On samples x ~ p, mean(k1) and mean(k3) both approximate KL(p || q)."""
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=F64)
    q = torch.tensor([0.1, 0.3, 0.2, 0.2, 0.2], dtype=F64)
    # KL(p || q) = sum p log(p / q) ~= 0.5418
    exact = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist(), strict=True))

    g = torch.Generator().manual_seed(2)
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    logprobs, ref_logprobs = p.log()[x], q.log()[x]

    for estimator in ("k1", "k3"):
        estimate = kl_penalty(logprobs, ref_logprobs, estimator).mean().item()
        # statistical, not rounding: the standard error of mean(k1) is 1.09 / sqrt(2e5) = 0.0024
        # (k3's 0.0009), so 0.015 is 6 of them; a wrong sign or a missing -1 is off by > 0.5
        assert estimate == pytest.approx(exact, abs=0.015), estimator


# ---------------------------------------------------------------- shaped rewards


def test_shaped_rewards_kl_on_valid_tokens_score_on_last():
    """-kl_coef * kl on each valid token, score added at the last valid token, 0 on padding;
    a row with no valid tokens gets all zeros (no score)."""
    kl_coef = 0.1
    kl = torch.tensor(
        [[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 50.0, 60.0], [7.0, 8.0, 9.0, 10.0]], dtype=F64
    )
    scores = torch.tensor([10.0, -2.0, 5.0], dtype=F64)
    mask = _lengths_mask([4, 2, 0], 4)

    rewards = shaped_rewards(scores, kl, mask, kl_coef)

    expected = [
        [-0.1, -0.2, -0.3, -0.4 + 10.0],
        [-0.05, 0.1 - 2.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0],
    ]
    # float64 products 0.1 x k against the decimals 0.k: an ulp apart; default rtol/atol 1e-7
    torch.testing.assert_close(rewards, torch.tensor(expected, dtype=F64))
    assert (rewards[1, 2:] == 0).all() and (rewards[2] == 0).all()


def test_shaped_rewards_random_lengths_match_loop():
    """On random kl and lengths (including 0 and full), rewards match a plain-Python loop."""
    g = torch.Generator().manual_seed(3)
    batch, width, kl_coef = 8, 6, 0.05
    lengths = [int(n) for n in torch.randint(0, width + 1, (batch,), generator=g)]
    lengths[0], lengths[1] = width, 0
    mask = _lengths_mask(lengths, width)
    kl = torch.randn(batch, width, generator=g, dtype=F64)
    scores = torch.randn(batch, generator=g, dtype=F64)

    rewards = shaped_rewards(scores, kl, mask, kl_coef)

    expected = [[0.0] * width for _ in range(batch)]
    for i, n in enumerate(lengths):
        for t in range(n):
            expected[i][t] = -kl_coef * kl[i, t].item()
        if n > 0:
            expected[i][n - 1] += scores[i].item()
    # exact: the same float64 product -kl_coef * kl and the same one addition of the score
    assert torch.equal(rewards, torch.tensor(expected, dtype=F64))


# ---------------------------------------------------------------- PPO policy loss


def test_policy_loss_on_policy_is_minus_mean_advantage():
    """logprobs == old_logprobs: ratio mean 1, clipfrac 0, approxkl 0, loss = -mean(A) over
    valid tokens."""
    g = torch.Generator().manual_seed(4)
    logp = -torch.rand(3, 5, generator=g, dtype=F64) * 5
    adv = torch.randn(3, 5, generator=g, dtype=F64)
    mask = _lengths_mask([5, 3, 1], 5)

    loss, stats = ppo_policy_loss(logp, logp.clone(), adv, mask, clip_range=0.2)

    valid = [adv[i, t].item() for i, n in enumerate([5, 3, 1]) for t in range(n)]
    # float64 means of 9 terms |A| < 3 in two orders: within reordered_sum(10, 3, EPS64) = 6e-15,
    # whatever the mean's size (rel=1e-12 would not be); a clipped or dropped token moves it ~0.1
    assert loss.item() == pytest.approx(-sum(valid) / len(valid), rel=0, abs=1e-12)
    # exact: exp(0) = 1, nine ones sum to 9, and 0 / 9 = 0
    assert stats["ratio"].item() == 1.0
    assert stats["clipfrac"].item() == 0.0
    assert stats["approxkl"].item() == 0.0


def test_policy_loss_hand_computed_clipping():
    """Clipped surrogate, clipfrac, ratio, approxkl and d loss / d logprobs against hand values:
    ratio > 1 + eps with A > 0 and ratio < 1 - eps with A < 0 are clipped (zero gradient)."""
    eps = 0.2
    ratios = [1.5, 0.5, 1.5, 1.1, 0.5, 3.0]  # the last token is padding
    adv = torch.tensor([[2.0, -1.0, -1.0, 3.0, 1.0, 1e6]], dtype=F64)
    mask = _lengths_mask([5], 6)
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.5, -4.0]], dtype=F64)
    logp = (old + torch.tensor([ratios], dtype=F64).log()).requires_grad_(True)

    loss, stats = ppo_policy_loss(logp, old, adv, mask, clip_range=eps)
    loss.backward()

    # per-token max(-A r, -A clip(r)):
    # t0: r=1.5, A= 2 -> max(-3.0, -2.4) = -2.4  clipped
    # t1: r=0.5, A=-1 -> max( 0.5,  0.8) =  0.8  clipped
    # t2: r=1.5, A=-1 -> max( 1.5,  1.2) =  1.5
    # t3: r=1.1, A= 3 -> max(-3.3, -3.3) = -3.3  (inside the range)
    # t4: r=0.5, A= 1 -> max(-0.5, -0.8) = -0.5
    # float64 against decimals: logp - old gives back log r to eps * |old| (1e-15), so every term
    # is a few ulps of values < 4 off: < 1e-14, under rel=1e-12 of 0.78; a clip moves it ~0.1
    assert loss.item() == pytest.approx((-2.4 + 0.8 + 1.5 - 3.3 - 0.5) / 5, rel=1e-12)
    # a float32 share (the bool mask in float32): 2 / 5 rounded (3e-8 relative), under rel=1e-6
    assert stats["clipfrac"].item() == pytest.approx(2 / 5)
    assert stats["ratio"].item() == pytest.approx((1.5 + 0.5 + 1.5 + 1.1 + 0.5) / 5, rel=1e-12)
    logs = [math.log(r) for r in ratios[:5]]
    assert stats["approxkl"].item() == pytest.approx(0.5 * sum(x * x for x in logs) / 5, rel=1e-12)
    # d/dlogp of -A r / N is -A r / N on unclipped tokens, 0 on clipped tokens and on padding
    expected_grad = [[0.0, 0.0, 1.5 / 5, -3.3 / 5, -0.5 / 5, 0.0]]
    # float64, as above (~1e-15); default rtol/atol 1e-7
    torch.testing.assert_close(logp.grad, torch.tensor(expected_grad, dtype=F64))
    assert all(not s.requires_grad for s in stats.values())


def _policy_loss_and_grad(logp, old, adv, mask):
    logp = logp.clone().requires_grad_(True)
    loss, _ = ppo_policy_loss(logp, old, adv, mask, clip_range=0.2)
    loss.backward()
    return loss.detach(), logp.grad


def test_policy_loss_padding_contributes_nothing():
    """Changing padded logprobs / old_logprobs / advantages (to large finite values) changes
    neither the loss nor the gradient at valid positions; the gradient on padding is exactly 0."""
    g = torch.Generator().manual_seed(5)
    mask = _lengths_mask([6, 4, 2, 0], 6)
    pad = mask == 0
    logp = -torch.rand(4, 6, generator=g, dtype=F64) * 3
    old = logp + 0.3 * torch.randn(4, 6, generator=g, dtype=F64)
    adv = torch.randn(4, 6, generator=g, dtype=F64)
    loss, grad = _policy_loss_and_grad(logp, old, adv, mask)

    # log-probability-like garbage on padding: log ratio up to +-30, advantages up to 1e6
    logp2 = torch.where(pad, torch.tensor(-1.0, dtype=F64), logp)
    old2 = torch.where(pad, torch.tensor(-31.0, dtype=F64), old)
    adv2 = torch.where(pad, torch.tensor(1e6, dtype=F64), adv)
    loss2, grad2 = _policy_loss_and_grad(logp2, old2, adv2, mask)

    # exact: padding is replaced by 0 before any arithmetic, so both runs do the same operations
    assert loss2.item() == loss.item()
    torch.testing.assert_close(grad2, grad, rtol=0, atol=0)
    assert (grad[pad] == 0).all() and (grad2[pad] == 0).all()


def test_policy_loss_padding_with_overflowing_log_ratio():
    """A padded position whose log ratio overflows exp() in float32 must still contribute 0."""
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    old = torch.tensor([[-1.1, -1.9, -100.0]])  # log ratio 99.5 on padding: exp() = inf
    adv = torch.tensor([[1.0, -1.0, 0.0]])  # GAE's advantages are exactly 0 on padding

    loss, stats = ppo_policy_loss(logp, old, adv, mask, clip_range=0.2)
    loss.backward()

    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert all(torch.isfinite(s) for s in stats.values())
    assert logp.grad[0, 2].item() == 0.0


# ---------------------------------------------------------------- PPO value loss


def test_value_loss_hand_computed_clipping():
    """Clipped value loss, clipfrac and d loss / d values against hand values (clip_range 0.2)."""
    clip = 0.2
    values = torch.tensor([[1.5, 1.5, 0.1, -0.5, -0.5, 9.0]], dtype=F64, requires_grad=True)
    old = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0, -9.0]], dtype=F64)
    returns = torch.tensor([[2.0, 1.0, 1.0, 0.0, -1.0, 100.0]], dtype=F64)
    mask = _lengths_mask([5], 6)

    loss, stats = ppo_value_loss(values, old, returns, mask, clip_range=clip)
    loss.backward()

    # per-token max((V - R)^2, (clip(V, old +- 0.2) - R)^2):
    # t0: V=1.5 -> 1.2, R= 2: max(0.25, 0.64) = 0.64  clipped
    # t1: V=1.5 -> 1.2, R= 1: max(0.25, 0.04) = 0.25
    # t2: V=0.1 (in range), R=1: 0.81
    # t3: V=-.5 -> -.2, R= 0: max(0.25, 0.04) = 0.25
    # t4: V=-.5 -> -.2, R=-1: max(0.25, 0.64) = 0.64  clipped
    # float64 against decimals: a few ulps of values < 1 (~1e-16), far under rel=1e-12
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.25 + 0.81 + 0.25 + 0.64) / 5, rel=1e-12)
    assert stats["clipfrac"].item() == pytest.approx(2 / 5)  # float32 2 / 5: 3e-8 relative
    # d/dV of 0.5 (V - R)^2 / N = (V - R) / N when unclipped; 0 when clipped or padding
    expected_grad = [[0.0, 0.5 / 5, -0.9 / 5, -0.5 / 5, 0.0, 0.0]]
    torch.testing.assert_close(values.grad, torch.tensor(expected_grad, dtype=F64))  # ~1e-16
    assert not stats["clipfrac"].requires_grad


def _value_loss_and_grad(values, old, returns, mask):
    values = values.clone().requires_grad_(True)
    loss, stats = ppo_value_loss(values, old, returns, mask, clip_range=0.2)
    loss.backward()
    return loss.detach(), values.grad, stats["clipfrac"]


def test_value_loss_padding_contributes_nothing():
    """Changing padded values / old values / returns (to huge finite values) changes neither the
    loss, the clipfrac nor the gradient at valid positions; the gradient on padding is 0."""
    g = torch.Generator().manual_seed(6)
    mask = _lengths_mask([6, 3, 1, 0], 6)
    pad = mask == 0
    values = torch.randn(4, 6, generator=g, dtype=F64)
    old = values + 0.3 * torch.randn(4, 6, generator=g, dtype=F64)
    returns = torch.randn(4, 6, generator=g, dtype=F64)
    loss, grad, clipfrac = _value_loss_and_grad(values, old, returns, mask)

    values2 = torch.where(pad, torch.tensor(1e6, dtype=F64), values)
    old2 = torch.where(pad, torch.tensor(-1e6, dtype=F64), old)
    returns2 = torch.where(pad, torch.tensor(-1e6, dtype=F64), returns)
    loss2, grad2, clipfrac2 = _value_loss_and_grad(values2, old2, returns2, mask)

    # exact: padding is replaced by 0 before any arithmetic, so both runs do the same operations
    assert loss2.item() == loss.item()
    assert clipfrac2.item() == clipfrac.item()
    torch.testing.assert_close(grad2, grad, rtol=0, atol=0)
    assert (grad[pad] == 0).all() and (grad2[pad] == 0).all()


# ---------------------------------------------------------------- whitening, explained variance


def _valid(x: torch.Tensor, lengths: list[int]) -> list[float]:
    return [x[i, t].item() for i, n in enumerate(lengths) for t in range(n)]


def test_masked_whiten_zero_mean_unit_std_over_valid():
    """Over valid positions: mean ~0, population std ~1, values match (x - mean) / std; padding
    comes back as exactly 0."""
    g = torch.Generator().manual_seed(7)
    lengths = [7, 4, 2]
    mask = _lengths_mask(lengths, 7)
    x = 3.0 + 5.0 * torch.randn(3, 7, generator=g, dtype=F64)
    x = torch.where(mask == 0, torch.tensor(1e6, dtype=F64), x)  # garbage on padding

    out = masked_whiten(x, mask)

    raw = _valid(x, lengths)
    mean = sum(raw) / len(raw)
    std = math.sqrt(sum((v - mean) ** 2 for v in raw) / len(raw))
    got = _valid(out, lengths)
    # float64, 13 values |x| < 20: the two means differ by < reordered_sum(13, 20, EPS64) = 5e-14,
    # and rsqrt(var + 1e-8) at var ~ 25 is 2e-10 relative off 1 / std; a kept mean would be ~0.6
    assert sum(got) / len(got) == pytest.approx(0.0, abs=1e-9)
    assert math.sqrt(sum(v * v for v in got) / len(got)) == pytest.approx(1.0, rel=1e-6)
    # rel=1e-6 over the 2e-10 of the 1e-8, approx's default abs=1e-12 over the 1e-14 near 0
    assert got == pytest.approx([(v - mean) / std for v in raw], rel=1e-6)
    assert (out[mask == 0] == 0).all()


def test_masked_whiten_without_shift_keeps_mean():
    """shift_mean=False: unit std over valid positions but the original mean is kept; padding 0."""
    g = torch.Generator().manual_seed(8)
    lengths = [5, 3]
    mask = _lengths_mask(lengths, 5)
    x = 4.0 + 2.0 * torch.randn(2, 5, generator=g, dtype=F64)

    out = masked_whiten(x, mask, shift_mean=False)

    raw = _valid(x, lengths)
    mean = sum(raw) / len(raw)
    got = _valid(out, lengths)
    got_mean = sum(got) / len(got)
    # float64 as above: the mean ~4 to ~1e-15, the std to the 1e-8's 1e-9 relative (var ~4)
    assert got_mean == pytest.approx(mean, rel=1e-9)
    assert math.sqrt(sum((v - got_mean) ** 2 for v in got) / len(got)) == pytest.approx(1.0)
    assert (out[mask == 0] == 0).all()


def test_explained_variance():
    """1 for perfect predictions, ~0 for the constant mean, a hand value otherwise; padding is
    ignored."""
    mask = _lengths_mask([4, 0], 4)
    target = torch.tensor([[1.0, 2.0, 3.0, 4.0], [100.0, -50.0, 7.0, 3.0]], dtype=F64)
    garbage = torch.tensor([[0.0, 0.0, 0.0, 0.0], [-9e3, 4e3, 1.0, 2.0]], dtype=F64)

    # exact: the inputs are dyadic and every mean and variance here is too (2.5, 1.25, 0.1875)
    assert explained_variance(target.clone(), target, mask) == 1.0
    assert explained_variance(torch.full_like(target, 2.5), target, mask) == 0.0
    # residual [0, 0, 0, -1]: mean -0.25, var 0.1875; target var 1.25 -> 1 - 0.15 = 0.85
    pred = torch.tensor([[1.0, 2.0, 3.0, 5.0], [0.0, 0.0, 0.0, 0.0]], dtype=F64)
    hand = explained_variance(pred, target, mask)
    assert hand == pytest.approx(0.85)  # one rounding: 0.1875 / 1.25 is not dyadic
    # exact: padding is replaced by 0 before any arithmetic, so the garbage changes no operation
    assert explained_variance(pred + garbage, target, mask) == hand


# ---------------------------------------------------------------- entropy, token log-probs


def _two_order_errors(valid: torch.Tensor, whitened: torch.Tensor, ev: float):
    """How far float32 statistics of the n `valid` values may move when their sums add in another
    order (each process's part summed, then the parts; or one pass): (mean, whitened values,
    explained variance). A mean within reordered_sum(n + 1, mean|v|) (+1: the division); a
    variance, a mean of n squares >= 0, within reordered_sum(n + 4, var) (each square's own
    roundings); (v - mean) * rsqrt(var + 1e-8) within the mean's error / std plus |w| x half the
    variance's relative error, and 5 eps relative (rtol) for the two paths' own subtraction, + 1e-8,
    sqrt, division and product; 1 - rv / tv within (rv / tv) x the two variances' relative errors
    and the division's, + eps for the 1 -."""
    n, var = len(valid), valid.var(unbiased=False).item()
    mean_error = reordered_sum(n + 1, valid.abs().mean().item())
    var_relative = reordered_sum(n + 4, 1.0)
    whiten_error = mean_error / var**0.5 + whitened.abs().max().item() * var_relative / 2
    return mean_error, whiten_error, (1 - ev) * 2 * var_relative + EPS32


def two_process_reduce() -> list:
    """Two `reduce` functions that behave like an all-reduce between two processes (two threads
    here): each returns the sum of what both passed in the same call."""
    import threading

    barrier, slots = threading.Barrier(2), [None, None]

    def make(i):
        def reduce(total):
            slots[i] = total
            barrier.wait()
            summed = slots[0] + slots[1]
            barrier.wait()
            return summed

        return reduce

    return [make(0), make(1)]


@pytest.mark.numerics
def test_whitening_and_statistics_over_two_processes_equal_those_of_the_whole_batch():
    """PPO in several processes: each holds part of the batch; with `reduce` (distributed.all_sum)
    the whitened advantages, masked mean and explained variance are those of the whole batch, not
    of each part (which the per-part results would differ from)."""
    import threading

    generator = torch.Generator().manual_seed(0)
    values = torch.randn(6, 5, generator=generator) * 3 + 1
    predicted = values + torch.randn(6, 5, generator=generator)
    lengths = torch.tensor([5, 2, 4, 1, 3, 5])
    mask = (torch.arange(5)[None, :] < lengths[:, None]).float()
    parts = [slice(0, 2), slice(2, 6)]  # unequal shares, as the tokens of two processes are
    results: list = [None, None]

    def run(i, reduce):
        part = parts[i]
        results[i] = (
            masked_whiten(values[part], mask[part], reduce=reduce),
            masked_mean(values[part], mask[part], reduce),
            explained_variance(predicted[part], values[part], mask[part], reduce),
        )

    threads = [
        threading.Thread(target=run, args=(i, r)) for i, r in enumerate(two_process_reduce())
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    whole = masked_whiten(values, mask)
    ev = explained_variance(predicted, values, mask)
    mean_error, whiten_error, ev_error = _two_order_errors(values[mask.bool()], whole, ev)
    # float32 sums in two orders (~6e-6 here); per-part statistics move them by ~0.6 (below)
    torch.testing.assert_close(
        torch.cat([results[0][0], results[1][0]]), whole, rtol=5 * EPS32, atol=whiten_error
    )
    for i in (0, 1):
        assert results[i][1].item() == pytest.approx(
            masked_mean(values, mask).item(), abs=mean_error
        )
        assert results[i][2] == pytest.approx(ev, rel=0, abs=ev_error)
    alone = masked_whiten(values[parts[0]], mask[parts[0]])  # without reduce: its own statistics
    assert not torch.allclose(alone, whole[parts[0]], atol=1e-3)


@pytest.mark.numerics
def test_entropy_from_logits_matches_definition():
    """Entropy equals -(p * log p).sum over the vocabulary; uniform logits give log(V)."""
    g = torch.Generator().manual_seed(9)
    logits = 3.0 * torch.randn(2, 5, 11, generator=g)

    entropy = entropy_from_logits(logits)

    p = torch.softmax(logits.double(), dim=-1)
    expected = -(p * p.log()).sum(dim=-1)
    assert entropy.dtype == torch.float32 and entropy.shape == (2, 5)
    # float32 logsumexp(z) - sum(p z) against float64: the first within log_softmax_error, the sum
    # of 11 terms p z (sum |p z| <= max|z|) and p's own ~V eps/2 error within 2 reordered_sums
    largest = logits.abs().max().item()
    bound = log_softmax_error(11, largest) + 2 * reordered_sum(11, largest)  # ~5e-5; a bug is ~0.1
    torch.testing.assert_close(entropy.double(), expected, rtol=0, atol=bound)
    uniform = entropy_from_logits(torch.full((3, 7), 4.2))
    bound = log_softmax_error(7, 4.2) + 2 * reordered_sum(7, 4.2)  # the same with V = 7, |z| = 4.2
    torch.testing.assert_close(uniform, torch.full((3,), math.log(7)), rtol=0, atol=bound)


@pytest.mark.numerics
def test_token_logprobs_temperature_and_float32():
    """token_logprobs(T) == log_softmax(logits / T) at the tokens, returned in float32 even for
    bfloat16 logits."""
    g = torch.Generator().manual_seed(10)
    logits = 2.0 * torch.randn(2, 4, 9, generator=g)
    tokens = torch.randint(0, 9, (2, 4), generator=g)

    for temperature in (1.0, 0.7, 2.0):
        got = token_logprobs(logits, tokens, temperature)
        # a float32 log-softmax over 9 logits z / T (each rounded) against float64: ~2e-5; a
        # missing temperature or a wrong token moves it by > 0.1
        bound = log_softmax_error(9, logits.abs().max().item() / temperature)
        for b in range(2):
            for t in range(4):
                row = [v / temperature for v in logits[b, t].tolist()]
                lse = math.log(sum(math.exp(v) for v in row))
                assert got[b, t].item() == pytest.approx(row[tokens[b, t]] - lse, abs=bound)

    bf16 = logits.to(torch.bfloat16)
    got = token_logprobs(bf16, tokens, 0.7)
    assert got.dtype == torch.float32
    expected = torch.log_softmax(bf16.double() / 0.7, dim=-1).gather(-1, tokens.unsqueeze(-1))
    bound = log_softmax_error(9, bf16.abs().max().item() / 0.7)  # float32 from exact bf16 values
    torch.testing.assert_close(got.double(), expected.squeeze(-1), rtol=0, atol=bound)


def test_gae_over_a_multi_turn_episode_is_gae_over_its_policy_tokens_alone():
    """pack/unpack: the policy's tokens of two turns with an environment message between them
    (mask 1 1 0 0 1 1) give the advantages of the four policy tokens as one episode; the
    environment's positions get 0; a one-turn mask (a prefix) is left as it is."""
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 0]], dtype=torch.float64)
    values = torch.randn(1, 7, dtype=torch.float64)
    rewards = torch.randn(1, 7, dtype=torch.float64)
    packed_mask = losses.pack(mask, mask)
    assert packed_mask.tolist() == [[1, 1, 1, 1, 0, 0, 0]]
    advantages, returns = losses.gae(
        losses.pack(rewards, mask), losses.pack(values, mask), packed_mask, 0.9, 0.8
    )
    advantages, returns = losses.unpack(advantages, mask), losses.unpack(returns, mask)
    policy = [0, 1, 4, 5]
    alone, alone_returns = losses.gae(
        rewards[:, policy], values[:, policy], torch.ones(1, 4, dtype=torch.float64), 0.9, 0.8
    )
    # exact: the same float64 operations on the same numbers in the same order
    assert torch.equal(advantages[:, policy], alone) and torch.equal(
        returns[:, policy], alone_returns
    )
    assert advantages[0, [2, 3, 6]].tolist() == [0.0, 0.0, 0.0]
    prefix = torch.tensor([[1, 1, 1, 0]])
    x = torch.randn(1, 4)
    assert torch.equal(losses.pack(x, prefix), x)
