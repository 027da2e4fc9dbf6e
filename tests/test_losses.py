import math

import torch
import torch.nn.functional as F

from rlhf_cli.losses import IGNORE_INDEX, count_targets, sft_loss


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
    assert math.isclose(loss_sum.item(), expected, rel_tol=1e-6)


def test_sft_loss_equals_transformers_mean_loss():
    from transformers.loss.loss_utils import ForCausalLMLoss

    torch.manual_seed(1)
    logits = torch.randn(3, 6, 11)
    labels = torch.randint(0, 11, (3, 6))
    labels[:, :2] = IGNORE_INDEX
    loss_sum, n = sft_loss(logits, labels)
    reference = ForCausalLMLoss(logits, labels, vocab_size=11)
    torch.testing.assert_close(loss_sum / n, reference, rtol=1e-6, atol=1e-6)


def test_uniform_logits_give_log_vocab():
    logits = torch.zeros(1, 4, 13)
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, 3]])
    loss_sum, n = sft_loss(logits, labels)
    assert math.isclose((loss_sum / n).item(), math.log(13), rel_tol=1e-6)


def test_completion_logps_sum_only_the_target_tokens():
    from rlhf_cli.losses import completion_logps

    torch.manual_seed(2)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor(
        [[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 1], [IGNORE_INDEX, 2, IGNORE_INDEX, IGNORE_INDEX, 6]]
    )
    sums, counts = completion_logps(logits, labels)
    assert counts.tolist() == [3, 2]
    for b in range(2):
        expected = sum(
            F.log_softmax(logits[b, t - 1], -1)[labels[b, t]].item()
            for t in range(1, 5)
            if labels[b, t] != IGNORE_INDEX
        )
        assert math.isclose(sums[b].item(), expected, rel_tol=1e-6)
    loss_sum, n = sft_loss(logits, labels)  # the same tokens SFT trains on
    torch.testing.assert_close(-sums.sum(), loss_sum)


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
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
