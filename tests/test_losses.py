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
