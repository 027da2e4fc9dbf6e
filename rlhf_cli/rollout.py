"""Batched generation: left-padded prompts, the KV cache, truncation after the first EOS.

    responses = generate(model, tokenizer, prompts, max_new_tokens=48, temperature=0.0)

A prompt is plain text or a list of chat messages (rendered with the chat template and a
generation prompt).
"""

from __future__ import annotations

import torch

from rlhf_cli.data import render_chat


def encode_prompt(tokenizer, prompt: str | list[dict]) -> list[int]:
    if isinstance(prompt, list):
        return tokenizer(
            render_chat(tokenizer, prompt, add_generation_prompt=True), add_special_tokens=False
        )["input_ids"]
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def stop_token_ids(model, tokenizer) -> list[int]:
    """EOS plus any end-of-turn ids the model's generation config lists (e.g. Llama-3's <|eot_id|>)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, (list, tuple)):
        ids.update(configured)
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str | list[dict]],
    max_new_tokens: int,
    temperature: float = 0.0,
    batch_size: int = 8,
) -> list[str]:
    """Responses (text up to, not including, the first stop token) for each prompt."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    stops = stop_token_ids(model, tokenizer)
    responses: list[str] = []
    for start in range(0, len(prompts), batch_size):
        encoded = [encode_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
        longest = max(len(ids) for ids in encoded)
        input_ids = torch.full(
            (len(encoded), longest), tokenizer.pad_token_id, dtype=torch.long
        )  # (B, P) left-padded
        attention_mask = torch.zeros_like(input_ids)
        for i, ids in enumerate(encoded):
            input_ids[i, longest - len(ids) :] = torch.tensor(ids)
            attention_mask[i, longest - len(ids) :] = 1
        sampling = (
            {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
            if temperature > 0
            else {"do_sample": False}
        )
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
            **sampling,
        )
        for row in output[:, longest:].tolist():  # (B, new)
            cut = next((t for t, token in enumerate(row) if token in stops), len(row))
            responses.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    if was_training:
        model.train()
    return responses
