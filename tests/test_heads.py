"""Which logits the stages' log-probs come from: the fused LM head (its own autograd op, cast
once under autocast) for architectures whose logits it knows, the model's own forward pass for
any other (Cohere scales its logits by logit_scale)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rlhf_cli import head, losses, modeling

from numerics import EPS_BF16, reordered_sum


def tiny_cohere():
    from transformers import CohereConfig, CohereForCausalLM

    torch.manual_seed(0)
    config = CohereConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, logit_scale=0.25,
                          max_position_embeddings=64, tie_word_embeddings=False)  # fmt: skip
    return CohereForCausalLM(config).eval()


@pytest.mark.numerics
def test_an_architecture_outside_the_allow_list_gets_its_own_logits():
    model = tiny_cohere()
    assert not modeling.head_is_known(model)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    positions = torch.arange(9).expand(2, 9)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits  # (2, 9, V), logit_scale in
        expected = torch.log_softmax(logits[:, -5:-1].float(), -1).gather(-1, ids[:, -4:, None])[
            ..., 0
        ]
        ours, _ = modeling.last_logprobs(model, ids, mask, positions, ids[:, -4:], 1.0)
        labels = ids.clone()
        labels[:, :5] = -100
        targets, _ = modeling.target_logprobs(
            model, {"input_ids": ids, "attention_mask": mask}, labels
        )
    # the same forward pass either way: equal but for the log-softmax's float32 rounding over 97
    # logits of size < 10 (a missing logit_scale of 0.25 moves them by > 0.1)
    bound = reordered_sum(97, 10.0)
    torch.testing.assert_close(ours, expected, rtol=0, atol=bound)
    torch.testing.assert_close(targets, expected.flatten(), rtol=0, atol=bound)


def test_the_known_architectures_keep_the_fused_head(tiny_model):
    from transformers import AutoModelForCausalLM

    assert modeling.head_is_known(AutoModelForCausalLM.from_pretrained(tiny_model))


class CastCounter(TorchDispatchMode):
    """Counts the copies made of tensors of one shape (autocast casts through aten._to_copy)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.copies = tuple(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and tuple(args[0].shape) == self.shape:
            self.copies += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.numerics
def test_under_autocast_the_fused_head_casts_the_lm_head_once_per_call():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g) / 4
    targets = torch.randint(0, 50, (40,), generator=g)
    # 8 chunks of 5 rows: autocast alone would cast the (50, 16) head twice in each
    with torch.autocast("cpu", dtype=torch.bfloat16), CastCounter(weight.shape) as counter:
        fused = head.head_logprobs(hidden, weight, None, targets, chunk_elements=5 * 50)
    assert counter.copies == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        unfused = losses.token_logprobs(torch.nn.functional.linear(hidden, weight), targets)
    # the same bf16 matmuls, the log-softmax in float32 either way: equal to float32 rounding
    # of a 50-term log-sum-exp of logits < 20
    torch.testing.assert_close(fused, unfused, rtol=0, atol=reordered_sum(50, 20.0))
    (grad,) = torch.autograd.grad(fused.sum(), hidden)
    (expected,) = torch.autograd.grad(unfused.sum(), hidden)
    # each entry of the gradient is a 50-term sum (over the vocabulary) of terms < 1 through bf16
    # matmuls, added in another association by the fused backward: bf16's reordered-sum bound
    torch.testing.assert_close(grad, expected, rtol=0, atol=reordered_sum(50, 1.0, EPS_BF16))
