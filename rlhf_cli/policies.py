"""A trained policy (or the raw base) ready to answer prompts, for the stages that generate from
checkpoints without training them (`rlhf eval`, `rlhf sample`): the base with the policy's adapter
and a second one (a KL reference, or sample's policy B) as frozen roles, and batched responses.

    model, quant = load_model(config, tokenizer, device, reference)   # roles POLICY, REFERENCE
    texts, lengths, ended = respond(model, POLICY, prompts, tokenizer, config)
    played = play(model, POLICY, prompts, tokenizer, config)   # episodes (config.env: multi-turn)
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlhf_cli import distributed, episodes, modeling
from rlhf_cli.rollout import sample, stop_token_ids
from rlhf_cli.schema import LoraConfig

POLICY, REFERENCE = "policy", "reference"
PLACEHOLDER = "unused"  # an identity adapter, only so that the raw base is a peft model too


def load_model(config, tokenizer, device, reference: str | None):
    """The base with the policy (and reference) adapters, frozen; a peft model in every case."""
    from peft import PeftModel, get_peft_model

    base, quant = modeling.load_base_model(config, tokenizer, device)
    if config.policy:
        model = PeftModel.from_pretrained(base, config.policy, adapter_name=POLICY)
    else:
        # LoRA's B starts at zero, so this adapter adds exactly 0 to every layer
        identity = LoraConfig(r=1, alpha=1.0, dropout=0.0, target_modules="all-linear")
        model = get_peft_model(base, modeling.peft_lora_config(identity), adapter_name=PLACEHOLDER)
    if reference:
        modeling.add_frozen_adapter(model, Path(reference), REFERENCE)
    model.requires_grad_(False)
    modeling.disable_dropout(model)
    return model.eval(), quant


@torch.no_grad()
def generate(model, role, prompts: list, tokenizer, config, temperature: float):
    """One batch of responses from `role` (greedy at temperature 0)."""
    ids = [p.input_ids for p in prompts]
    with modeling.frozen_role(model, role):
        return sample(model, tokenizer, ids, config.generation.max_new_tokens, temperature)


def play(
    model, role, prompts, tokenizer, config, temperature: float = 0.0, seed: int | None = None
) -> list[episodes.Episode]:
    """One episode per prompt, from `role`: one turn, or in the environment of `config.env`
    (each prompt then a row for it). Greedy at temperature 0; sampled otherwise, each batch of
    `generation.batch_size` with the RNG seeded at `seed` + its index (so the samples do not
    depend on which process draws them). Every process gets every episode (without its
    environment instance)."""
    setup = episodes.setup_for(config, config.generation)
    stops = stop_token_ids(model, tokenizer)

    def one_batch(index: int, batch: list) -> list[episodes.Episode]:
        if seed is not None:
            torch.manual_seed(seed + index)
        played = episodes.start(batch, tokenizer, setup, f"batch {index}")
        with modeling.frozen_role(model, role):
            episodes.run(model, tokenizer, played, setup, temperature, stops)
        return [episodes.detached(e) for e in played]

    return distributed.map_batches(prompts, config.generation.batch_size, one_batch)


def respond(
    model, role, prompts, tokenizer, config, temperature: float = 0.0, seed: int | None = None
):
    """One response per prompt (the last turn of its episode: `play`): (texts, lengths in policy
    tokens, ended with a stop token). `config` needs `generation` (rlhf sample uses this)."""
    played = play(model, role, prompts, tokenizer, config, temperature, seed)
    return [e.response for e in played], [sum(e.policy) for e in played], [e.ended for e in played]
