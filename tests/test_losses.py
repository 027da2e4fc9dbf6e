import math

import pytest
import torch
import torch.nn.functional as F

from rlhf_cli.losses import IGNORE_INDEX, count_targets, sft_loss

from numerics import log_softmax_error, reordered_sum


@pytest.mark.numerics
def test_sft_loss_matches_a_hand_written_shifted_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor(
        [[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 1], [IGNORE_INDEX, 2, 2, IGNORE_INDEX, IGNORE_INDEX]]
    )
    loss_sum, n = sft_loss(logits, labels)
    expected, count = 0.0, 0
    for b in range(2):
        for t in range(1, 5):
            if labels[b, t] != IGNORE_INDEX:
                expected -= F.log_softmax(logits[b, t - 1], -1)[labels[b, t]].item()
                count += 1
    assert n.item() == count == 5 == count_targets(labels).item()
    # each of the 5 float32 log-probs (batched and one row at a time) within log_softmax_error(7,
    # max|z|), their float32 sum within reordered_sum(5, |sum|): ~4e-5; a wrong shift moves it ~1
    bound = 5 * log_softmax_error(7, logits.abs().max().item()) + reordered_sum(5, abs(expected))
    assert math.isclose(loss_sum.item(), expected, rel_tol=0, abs_tol=bound)


@pytest.mark.numerics
def test_sft_loss_equals_transformers_mean_loss():
    from transformers.loss.loss_utils import ForCausalLMLoss

    torch.manual_seed(1)
    logits = torch.randn(3, 6, 11)
    labels = torch.randint(0, 11, (3, 6))
    labels[:, :2] = IGNORE_INDEX
    loss_sum, n = sft_loss(logits, labels)
    reference = ForCausalLMLoss(logits, labels, vocab_size=11)
    # cross_entropy over 15 rows and over 18: log-probs within log_softmax_error(11, max|z|), means
    # of the 12 in other orders within reordered_sum(12, mean); a token more or less moves it ~0.2
    bound = log_softmax_error(11, logits.abs().max().item()) + reordered_sum(n.item(), reference)
    torch.testing.assert_close(loss_sum / n, reference, rtol=0, atol=bound.item())


@pytest.mark.numerics
def test_uniform_logits_give_log_vocab():
    logits = torch.zeros(1, 4, 13)
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, 3]])
    loss_sum, n = sft_loss(logits, labels)
    # float32 log(13) to an ulp, a sum of 3 and a division: < 4 * EPS32 = 5e-7 relative, under 1e-6
    assert math.isclose((loss_sum / n).item(), math.log(13), rel_tol=1e-6)


@pytest.mark.numerics
def test_completion_logps_sum_only_the_target_tokens():
    from rlhf_cli.losses import completion_logps

    torch.manual_seed(2)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor(
        [[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 1], [IGNORE_INDEX, 2, IGNORE_INDEX, IGNORE_INDEX, 6]]
    )
    sums, counts = completion_logps(logits, labels)
    assert counts.tolist() == [3, 2]
    per_logprob = log_softmax_error(7, logits.abs().max().item())  # batched vs one row, float32
    for b in range(2):
        expected = sum(
            F.log_softmax(logits[b, t - 1], -1)[labels[b, t]].item()
            for t in range(1, 5)
            if labels[b, t] != IGNORE_INDEX
        )
        # counts[b] log-probs, each within per_logprob, summed over 4 positions in float32
        bound = counts[b].item() * per_logprob + reordered_sum(4, abs(expected))
        assert math.isclose(sums[b].item(), expected, rel_tol=0, abs_tol=bound)
    loss_sum, n = sft_loss(logits, labels)  # the same tokens SFT trains on
    # the same 5 log-probs by log_softmax + gather and by cross_entropy, summed in other orders
    bound = 5 * per_logprob + reordered_sum(8, loss_sum.item())
    torch.testing.assert_close(-sums.sum(), loss_sum, rtol=0, atol=bound)


@pytest.mark.numerics
def test_half_precision_logits_are_upcast_before_every_log_softmax():
    """fp16 logits (what a 4-bit model with an fp16 compute dtype returns) give the float32 results
    of the same values: a log-softmax or a long sum in fp16 would lose digits (4096 tokens of loss
    ~4 sum to ~16000, where fp16 steps are 16 apart)."""
    from rlhf_cli.losses import completion_logps, sft_loss, token_logprobs

    torch.manual_seed(0)
    logits16 = (torch.randn(2, 2049, 64) * 8).half()
    logits32 = logits16.float()
    labels = torch.randint(0, 64, (2, 2049))
    for ours, reference in [
        (sft_loss(logits16, labels)[0], sft_loss(logits32, labels)[0]),
        (completion_logps(logits16, labels)[0], completion_logps(logits32, labels)[0]),
        (token_logprobs(logits16, labels), token_logprobs(logits32, labels)),
    ]:
        assert ours.dtype == torch.float32
        # exact: fp16 -> float32 is exact, so both do the same float32 ops on the same values in
        # the same order; an fp16 log-softmax or sum would be off by ~1e-3 relative
        assert torch.equal(ours, reference)


def _head_case(dtype, n=11, hidden=6, vocab=13, bias=True):
    torch.manual_seed(3)
    h = torch.randn(n, hidden, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, hidden, dtype=dtype)
    b = torch.randn(vocab, dtype=dtype) if bias else None
    return h, weight, b, torch.randint(0, vocab, (n,))


@pytest.mark.numerics
def test_head_logprobs_equal_the_log_softmax_of_the_whole_logits_with_their_gradient(monkeypatch):
    """The fused head + log-softmax (head.head_logprobs) gives the log-probs and d/d hidden of
    token_logprobs(F.linear(hidden, weight, bias)), exactly (float64), whatever the chunk: one row,
    three rows (the last chunk short) or all rows at once; and no call sees more rows than a chunk."""
    from rlhf_cli import head as fused
    from rlhf_cli import losses

    h, weight, bias, targets = _head_case(torch.float64)
    weights = torch.linspace(-1, 2, len(targets), dtype=torch.float64)  # every row's own gradient
    expected = losses.token_logprobs(F.linear(h, weight, bias), targets)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), h)
    linear, seen = F.linear, []
    monkeypatch.setattr(fused.F, "linear", lambda x, *a: seen.append(len(x)) or linear(x, *a))
    for rows in (1, 3, len(targets)):
        seen.clear()
        ours = fused.head_logprobs(h, weight, bias, targets, chunk_elements=rows * len(weight))
        (grad,) = torch.autograd.grad((ours * weights).sum(), h)
        assert ours.dtype == torch.float64 and max(seen) == rows and sum(seen) == len(targets)
        # float64, GEMMs of other shapes: logits (7 products) within reordered_sum(8, 10, EPS64),
        # log-probs 2x that + log_softmax_error(13, 7.3, EPS64) = 9e-14, slopes 2 x 2.3 x that
        torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.numerics
def test_head_logprobs_at_a_temperature_and_their_entropy_equal_the_unfused_ones():
    """PPO's form: log softmax(logits / T) with its d/d hidden, and the entropy of that softmax,
    exactly (float64) as token_logprobs(F.linear(...), T) and entropy_from_logits(logits / T) give
    them, in chunks of 4 rows; the entropy carries no gradient."""
    from rlhf_cli import head as fused
    from rlhf_cli import losses

    h, weight, bias, targets = _head_case(torch.float64)
    weights = torch.linspace(-1, 2, len(targets), dtype=torch.float64)
    for temperature in (0.7, 1.0, 2.5):
        logits = F.linear(h, weight, bias) / temperature
        expected = losses.token_logprobs(logits, targets)
        (expected_grad,) = torch.autograd.grad((expected * weights).sum(), h)
        ours, entropy = fused.head_logprobs_and_entropy(
            h, weight, bias, targets, temperature, chunk_elements=4 * len(weight)
        )
        (grad,) = torch.autograd.grad((ours * weights).sum(), h)
        # as in the test above, with |z / T| <= 7.3 / 0.7 = 10.4: log-probs within 1.2e-13, slopes
        # within 2 x 2.3 x that, the entropy's 13 terms p log p within (p + 1/e) x that: 7e-13
        torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
        p = torch.softmax(logits.detach(), -1)
        torch.testing.assert_close(entropy, -(p * p.log()).sum(-1), rtol=1e-12, atol=1e-12)
        assert not entropy.requires_grad
        alone = fused.head_logprobs(h, weight, bias, targets, temperature)
        # 4-row chunks against one 11-row matmul: different GEMM shapes round differently (seen:
        # 1.7e-16 and 1.9e-16 on two CPUs). float64 log-softmax over 13 logits of magnitude
        # <= 11: a few ulps of 11 (1.8e-15 each), so 1e-12 leaves a margin of 100x and more
        torch.testing.assert_close(alone, ours, rtol=1e-12, atol=1e-12)


@pytest.mark.numerics
def test_head_logprobs_in_float32_and_without_gradient():
    """float32 in, float32 out, close to the float64 result; under no_grad nothing is kept for a
    backward pass (the reference model's and held-out evaluation's case)."""
    from rlhf_cli import head as fused

    h, weight, _, targets = _head_case(torch.float64, bias=False)
    exact = fused.head_logprobs(h, weight, None, targets)
    h32 = h.detach().float().requires_grad_()
    ours = fused.head_logprobs(h32, weight.float(), None, targets, chunk_elements=4 * 13)
    assert ours.dtype == torch.float32 and ours.requires_grad
    # float32 logits of 6 products (inputs rounded to float32 too) within reordered_sum(8, S) of
    # the exact ones, S = max sum_k |h_k w_k|; a log-prob moves by 2x that + the log-softmax's own
    largest = (h.abs() @ weight.abs().T).max().item()
    log_softmax = log_softmax_error(13, F.linear(h, weight).abs().max().item())
    bound = 2 * reordered_sum(8, largest) + log_softmax  # ~4e-5; a wrong row or target is ~1 off
    torch.testing.assert_close(ours.double(), exact.detach(), rtol=0, atol=bound)
    with torch.no_grad():
        frozen = fused.head_logprobs(h32, weight.float(), None, targets)
    assert frozen.grad_fn is None
    # one 11-row GEMM against 4-row chunks: logits (6 products each) within reordered_sum(7, S)
    bound = 2 * reordered_sum(7, largest) + log_softmax
    torch.testing.assert_close(frozen, ours.detach(), rtol=0, atol=bound)


@pytest.mark.numerics
def test_head_logprobs_under_bf16_autocast_match_the_unfused_head():
    """Under bf16 autocast (how CUDA runs the stages), with a float32 or a bf16 head, the fused head
    gives the unfused head's log-probs and hidden-state gradient up to bf16 rounding."""
    from rlhf_cli import head as fused
    from rlhf_cli import losses

    for weight_dtype in (torch.float32, torch.bfloat16):
        h, weight, _, targets = _head_case(torch.float32, n=9, hidden=32, vocab=200, bias=False)
        weight = weight.to(weight_dtype)
        results = []
        for use_fused in (True, False):
            x = h.detach().clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                if use_fused:
                    out = fused.head_logprobs(x, weight, None, targets, chunk_elements=4 * 200)
                else:
                    out = losses.token_logprobs(F.linear(x, weight), targets)
            out.sum().backward()
            assert out.dtype == torch.float32 and x.grad.dtype == torch.float32
            results.append((out.detach(), x.grad))
        (ours, ours_grad), (theirs, theirs_grad) = results
        # bf16 logits from two differently shaped matmuls may land one bf16 step apart (8
        # significant bits: 2^(e-7) for |z| in [2^e, 2^(e+1))), and a log-prob moves by at most
        # two such steps (its logit and the log-sum-exp), + its float32 log-softmax's own rounding
        largest = F.linear(h, weight.float()).abs().max().item()
        step = 2.0 ** (math.floor(math.log2(largest)) - 7)
        bound = 2 * step + log_softmax_error(200, largest)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=bound)
        # each path rounds terms of size <= max|W| to bf16 (unit roundoff 2^-8) about three times
        bound = 6 * 2**-8 * weight.float().abs().max().item()
        torch.testing.assert_close(ours_grad, theirs_grad, rtol=0, atol=bound)
