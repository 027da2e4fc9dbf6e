"""Batched generation: left-padded prompts, the KV cache, truncation after the first stop token.

    rollout = sample(model, tokenizer, [p.input_ids for p in prompts], max_new_tokens=48,
                     temperature=1.0)                       # token ids + masks, for PPO
    texts = generate(model, tokenizer, prompts, max_new_tokens=48)   # greedy text, for samples

Sampling is plain: temperature T, top_k=0, top_p=1, no other logits processor, so the log-probs a
later forward pass computes from logits / T are those of the distribution that was sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf_cli import chat, modeling
from rlhf_cli.data import encode_prompt


@dataclass
class Rollout:
    """B episodes: left-padded prompts followed by right-padded responses.

    A one-turn response runs up to and including its first stop token (EOS); what follows is
    padding. A multi-turn episode's "response" is everything after the prompt: the policy's turns
    and, between them, the environment's messages (rlhf_cli.episodes); `policy_mask` marks the
    tokens the policy sampled (the only ones that carry loss), `response_mask` every real token.
    """

    query: torch.Tensor  # (B, P) prompt ids, left-padded
    query_mask: torch.Tensor  # (B, P) 1 on prompt tokens
    response: torch.Tensor  # (B, R) response ids, pad after the first stop token
    response_mask: torch.Tensor  # (B, R) 1 on response tokens (the stop token included)
    ended: torch.Tensor  # (B,) bool: the (last) response emitted a stop token
    policy_mask: torch.Tensor | None = None  # (B, R) 1 on sampled tokens | None: response_mask

    def __post_init__(self):
        if self.policy_mask is None:
            self.policy_mask = self.response_mask

    @property
    def input_ids(self) -> torch.Tensor:  # (B, P + R)
        return torch.cat([self.query, self.response], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:  # (B, P + R)
        return torch.cat([self.query_mask, self.response_mask], dim=1)

    @property
    def position_ids(self) -> torch.Tensor:  # (B, P + R): 0 at each row's first real token
        mask = self.attention_mask
        return (mask.cumsum(dim=1) - 1).clamp(min=0)

    @property
    def lengths(self) -> torch.Tensor:  # (B,) tokens the policy sampled
        return self.policy_mask.sum(dim=1)

    def select(self, index: torch.Tensor) -> Rollout:
        """The episodes at `index`, with the same padded widths (so per-row numerics do not change)."""
        return Rollout(*(t[index] for t in vars(self).values()))

    def trimmed(self) -> Rollout:
        """The same episodes without the columns that are padding in every row: the prompts' common
        left padding and the responses' common right padding (a micro-batch of one group shares
        its prompt, so its forward pass then has no prompt padding at all). Response column t is
        still response token t: log-probs of a trimmed rollout are the first columns of the
        untrimmed one's."""
        first = int(self.query_mask.any(dim=0).long().argmax()) if self.query_mask.any() else 0
        width = int(self.response_mask.any(dim=0).sum())  # right padding: a suffix of columns
        return Rollout(
            self.query[:, first:], self.query_mask[:, first:], self.response[:, :width],
            self.response_mask[:, :width], self.ended, self.policy_mask[:, :width],
        )  # fmt: skip


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), each (B, longest), right-aligned."""
    longest = max(len(ids) for ids in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(sequences):
        if row:
            ids[i, longest - len(row) :] = torch.tensor(row)
            mask[i, longest - len(row) :] = 1
    return ids, mask


def truncate_after_stop(
    tokens: torch.Tensor, stop_ids: list[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each row (B, R) after its first stop token (kept). Returns (tokens with pad after the cut,
    mask (B, R) of the kept tokens, ended (B,) bool)."""
    is_stop = torch.isin(tokens, torch.tensor(stop_ids, device=tokens.device))
    ended = is_stop.any(dim=1)
    # number of stop tokens strictly before t: 0 means t is at or before the first stop
    before = is_stop.long().cumsum(dim=1) - is_stop.long()
    mask = (before == 0).long()
    return tokens.masked_fill(mask == 0, pad_id), mask, ended


def stop_token_ids(model, tokenizer) -> list[int]:
    """EOS, the token the chat template closes an assistant turn with (`chat.turn_end_id`: a base
    model with model.chat_template=chatml stops at <|im_end|>, not only at its own EOS), and any
    end-of-turn ids the model's generation config lists (e.g. Llama-3's <|eot_id|>)."""
    ids = {tokenizer.eos_token_id, chat.turn_end_id(tokenizer)}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, (list, tuple)):
        ids.update(configured)
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    stops: list[int] | None = None,
) -> Rollout:
    """One response per prompt with the KV cache: sampled at `temperature` (top_k=0, top_p=1), or
    greedy when temperature is 0."""
    device = next(model.parameters()).device
    stops = stops or stop_token_ids(model, tokenizer)
    query, query_mask = (t.to(device) for t in left_pad(prompt_ids, tokenizer.pad_token_id))
    output = plain_generate(model, tokenizer, query, query_mask, max_new_tokens, temperature, stops)
    response, response_mask, ended = truncate_after_stop(
        output[:, query.size(1) :], stops, tokenizer.pad_token_id
    )
    return Rollout(query, query_mask, response, response_mask, ended)


@torch.no_grad()
def plain_generate(
    model, tokenizer, input_ids, attention_mask, max_new_tokens: int, temperature: float,
    stops: list[int], streamer=None,
) -> torch.Tensor:  # fmt: skip
    """model.generate() sampling softmax(logits / T) and nothing else (top_k 0, top_p 1; greedy at
    temperature 0), stopping at `stops`, in eval mode, with repeated prompts prefilled once
    (shared_prefill), under the compute dtype of a 4-bit model (`modeling.kbit_compute_dtype`:
    bf16 activations and KV cache on CUDA, not float32). Returns the prompts followed by the
    generated tokens."""
    from transformers import GenerationConfig

    settings = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    generation_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
        **(settings if temperature > 0 else {"do_sample": False}),
    )
    # generate() fills every setting left unset (repetition_penalty, min_p, no_repeat_ngram_size,
    # ...) from the model's own generation config, which would sample from something other than
    # softmax(logits / T): swap in a bare one while generating.
    inner = modeling.unwrapped(model)
    saved, inner.generation_config = inner.generation_config, GenerationConfig()
    dtype = modeling.kbit_compute_dtype(model)
    try:
        with modeling.eval_mode(model), modeling.autocast(input_ids.device, dtype):
            return model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=generation_config,
                streamer=streamer,
                **shared_prefill(model, input_ids, attention_mask),
            )
    finally:
        inner.generation_config = saved


def shared_prefill(model, query: torch.Tensor, query_mask: torch.Tensor):
    """The KV cache of each prompt but its last token, computed once per distinct prompt and copied
    to the rows that repeat it (a GRPO group's G samples share one prompt), for generate() to go on
    from; nothing when no prompt repeats (generate() then fills its own). A forward pass costs in
    proportion to its tokens, so G samples of one prompt pay for its prefill once, not G times:
    the same saving on a GPU, where long prompts make the prefill most of the work. The last
    token is left to generate(), which needs one token to start from; its cache then matches one
    it would have built itself (the same positions and masks, row by row). Returns generate()'s
    keyword for the cache (`cache`; `past_key_values` before transformers 5.x renamed it), or {}."""
    rows = torch.cat([query, query_mask], dim=1)
    distinct, inverse = torch.unique(rows, dim=0, return_inverse=True)
    if len(distinct) == len(rows) or query.size(1) < 2:
        return {}
    ids, mask = distinct[:, : query.size(1) - 1], distinct[:, query.size(1) : -1]
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    output = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
    )
    name = "cache" if "cache" in output else "past_key_values"
    output[name].batch_select_indices(inverse)
    return {name: output[name]}


def response_logprobs(
    model, rollout: Rollout, temperature: float, device, dtype, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, R) log-probs of the response tokens under the model's active adapter, from logits / T in
    float32 (the LM head too), and optionally the per-token entropy (modeling.last_logprobs).
    Padding positions hold finite junk: mask them."""
    with modeling.autocast(device, dtype):
        return modeling.last_logprobs(
            model, rollout.input_ids, rollout.attention_mask, rollout.position_ids,
            rollout.response, temperature, with_entropy,
        )  # fmt: skip


def decode_responses(tokenizer, rollout: Rollout) -> list[str]:
    """Response texts without the stop token and special tokens."""
    texts = []
    for tokens, mask, ended in zip(
        rollout.response.tolist(),
        rollout.response_mask.tolist(),
        rollout.ended.tolist(),
        strict=True,
    ):
        kept = [t for t, m in zip(tokens, mask, strict=True) if m]
        texts.append(decode_response(tokenizer, kept, ended))
    return texts


def decode_response(tokenizer, kept: list[int], ended: bool) -> str:
    """One response's text: its kept ids without the closing stop token, special tokens left out."""
    return tokenizer.decode(kept[:-1] if ended else kept, skip_special_tokens=True).strip()


def generate(
    model,
    tokenizer,
    prompts: list[str | list[dict]],
    max_new_tokens: int,
    temperature: float = 0.0,
    batch_size: int = 8,
) -> list[str]:
    """Response texts (up to, not including, the first stop token) for each prompt."""
    responses: list[str] = []
    for start in range(0, len(prompts), batch_size):
        ids = [encode_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
        rollout = sample(model, tokenizer, ids, max_new_tokens, temperature)
        responses += decode_responses(tokenizer, rollout)
    return responses
