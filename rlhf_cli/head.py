"""The LM head fused with its log-softmax: log-probs of chosen tokens straight from hidden states,
a chunk of rows at a time, as one autograd op (`head_logprobs`, `head_logprobs_and_entropy`), so
that the (tokens x vocabulary) logits and their gradient never exist whole. The modeling module
decides where it applies (a frozen, plain linear head; see modeling.target_logprobs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf_cli.losses import wide

# logits held at once by head_logprobs: 2**25 float32 numbers (128 MiB), 682 rows of SmolLM2's
# 49,152-token vocabulary or 261 of Llama-3's 128,256
HEAD_CHUNK_ELEMENTS = 2**25


def head_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """(N,) float32 log softmax((hidden @ weight.T + bias) / T) at `targets`: the LM head and its
    log-softmax fused, a chunk of rows at a time, so that the (N, vocab) logits never exist whole
    (unfused, the logits, their float32 copy, the log-softmax and its gradient are each (N, vocab)).

    hidden (N, H), weight (V, H) and bias (V,) of a frozen head, targets (N,). Each logit row lives
    only inside its chunk. Where the gradient is wanted, each row's d logp / d hidden
    ((onehot - softmax) @ weight / T, an (N, H) tensor like `hidden`) is taken there too, and the
    backward pass only scales it by the incoming gradient: no second pass over the vocabulary. The
    matmuls run under the caller's autocast, the log-softmax in float32, as the unfused
    `token_logprobs(head(hidden), targets, T)` does. The head's own parameters get no gradient (see
    modeling.target_logprobs, which falls back to the unfused form for a trainable head)."""
    return _head(hidden, weight, bias, targets, temperature, chunk_elements, False)[0]


def head_logprobs_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_elements: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`head_logprobs`, and the (N,) float32 entropy of each row's softmax(logits / T) (PPO's
    statistic; it gets no gradient)."""
    return _head(hidden, weight, bias, targets, temperature, chunk_elements, True)


def _head(hidden, weight, bias, targets, temperature, chunk_elements, with_entropy):
    rows = max(1, (chunk_elements or HEAD_CHUNK_ELEMENTS) // weight.size(0))
    wanted = torch.is_grad_enabled() and hidden.requires_grad
    return _HeadLogprobs.apply(
        hidden, weight, bias, targets, temperature, rows, wanted, with_entropy
    )


class _HeadLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, rows, wanted, with_entropy):
        # under autocast the matmuls run in its dtype, as unfused; the head is cast to it once
        # here (a copy of the whole (vocab, H) matrix), not once per chunk as autocast would
        device = hidden.device.type
        if torch.is_autocast_enabled(device):
            cast = torch.get_autocast_dtype(device)
            head, head_bias = weight.to(cast), None if bias is None else bias.to(cast)
        else:
            head, head_bias = weight, bias
        with torch.autocast(device_type=device, enabled=False):
            return _HeadLogprobs._chunks(
                ctx, hidden, weight, head, head_bias, targets, temperature, rows, wanted,
                with_entropy,
            )  # fmt: skip

    @staticmethod
    def _chunks(ctx, hidden, weight, head, bias, targets, temperature, rows, wanted, with_entropy):
        picked, entropy = [], []
        slopes = torch.empty_like(hidden) if wanted else None  # d logprobs[i] / d hidden[i]
        for start in range(0, max(len(targets), 1), rows):  # no targets: one empty chunk
            part, index = slice(start, start + rows), targets[start : start + rows]
            # a fresh (n, vocab) tensor
            logits = wide(F.linear(hidden[part].to(head.dtype), head, bias))
            logprobs = torch.log_softmax(
                logits if temperature == 1 else logits.div_(temperature), -1
            )
            del logits  # at most two (n, vocab) tensors live at once
            picked.append(logprobs.gather(-1, index[:, None]).squeeze(-1))
            if with_entropy:
                entropy.append(-logprobs.exp().mul_(logprobs).sum(-1))
            if wanted:
                # d logp / d hidden = (onehot - softmax) @ weight / T
                softmax = logprobs.exp_()  # in place: one (n, vocab) tensor at a time
                slopes[part] = weight[index] - softmax.to(head.dtype) @ head
                if temperature != 1:
                    slopes[part] /= temperature
        ctx.save_for_backward(slopes)
        entropy = torch.cat(entropy) if with_entropy else picked[0].new_empty(0)
        ctx.mark_non_differentiable(entropy)
        return torch.cat(picked), entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        (slopes,) = ctx.saved_tensors
        grad = (grad_logprobs[:, None] * slopes).to(slopes.dtype)
        return grad, None, None, None, None, None, None, None
