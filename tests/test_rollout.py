"""Where generation stops and in which dtype it runs: the token that closes the chat template's
assistant turn is a stop token whatever the model's EOS (a base model given chatml), and a 4-bit
model generates under its compute dtype."""

from __future__ import annotations

import pytest
import torch

from rlhf_cli import chat, data, modeling, rollout

from conftest import config_of, model_config
from tiny import FAMILIES, make_family_tokenizer, make_tokenizer

CLOSES_A_TURN = {
    "llama-3.2": "<|eot_id|>",
    "llama-3.1": "<|eot_id|>",
    "mistral": "</s>",
    "gemma-2": "<end_of_turn>",
}  # fmt: skip  (the ChatML families: <|im_end|>)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_token_closing_each_familys_assistant_turn_is_found(family, tmp_path):
    make_family_tokenizer(tmp_path, family)
    preset = config_of(
        "sft", f"model={FAMILIES[family]['preset']}", f"model.name_or_path={tmp_path}"
    )
    tokenizer = modeling.load_tokenizer(preset.model)
    closing = CLOSES_A_TURN.get(family, "<|im_end|>")
    assert chat.turn_end_id(tokenizer) == tokenizer.convert_tokens_to_ids(closing)


def test_no_template_no_turn_end(tmp_path):
    tokenizer = make_tokenizer(tmp_path)
    tokenizer.chat_template = None
    assert chat.turn_end_id(tokenizer) is None


@pytest.fixture
def base_with_chatml(tmp_path, tiny_model):
    """A base model (its EOS <|endoftext|>, as Qwen2.5's base models have it) run with
    model.chat_template=chatml, whose turns close with <|im_end|>: its tokenizer, and the tiny
    model with its LM head made to always pick <|im_end|>."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "base"
    tokenizer = make_tokenizer(folder)
    tokenizer.eos_token, tokenizer.chat_template = "<|endoftext|>", None
    tokenizer.save_pretrained(folder)
    tokenizer = modeling.load_tokenizer(model_config(folder, chat_template="chatml"))
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.generation_config.eos_token_id = tokenizer.eos_token_id  # the base's own config
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    head = model.get_output_embeddings()
    with torch.no_grad():  # every logit 0 but <|im_end|>'s: greedy and sampling both pick it
        head.weight.zero_()
        head.bias = torch.nn.Parameter(torch.zeros(head.out_features))
        head.bias[im_end] = 50.0
    return tokenizer, model, im_end


def test_a_base_model_with_chatml_stops_at_im_end(base_with_chatml):
    tokenizer, model, im_end = base_with_chatml
    assert tokenizer.eos_token_id != im_end
    assert im_end in rollout.stop_token_ids(model, tokenizer)
    prompt = data.encode_prompt(tokenizer, [{"role": "user", "content": "say hello"}])
    for temperature in (0.0, 1.0):
        out = rollout.sample(model, tokenizer, [prompt, prompt], 8, temperature)
        # the first token closes the turn: the response ends there (8 tokens without the stop)
        assert out.ended.all() and out.lengths.tolist() == [1, 1], temperature
        assert out.response[:, 0].tolist() == [im_end, im_end]


def test_a_4bit_model_generates_under_its_compute_dtype(monkeypatch, tiny_model):
    """prepare_model_for_kbit_training leaves a 4-bit model's norms and embeddings in float32:
    generation asks for the compute dtype (bf16 on CUDA, where `modeling.autocast` turns it on),
    or its activations and KV cache would be float32, twice bf16's memory. On this CPU autocast
    is off, so what is checked is the dtype generation asks for."""
    config = config_of("sft", f"model.name_or_path={tiny_model}", "quant.mode=nf4",
                       "quant.compute_dtype=bfloat16")  # fmt: skip
    tokenizer = modeling.load_tokenizer(config.model)
    model, _ = modeling.load_model(config, tokenizer, torch.device("cpu"))
    assert modeling.kbit_compute_dtype(model) == torch.bfloat16
    asked = []
    real = modeling.autocast

    def recording(device, dtype):
        asked.append(dtype)
        return real(device, dtype)

    monkeypatch.setattr(modeling, "autocast", recording)
    prompt = data.encode_prompt(tokenizer, [{"role": "user", "content": "say hello"}])
    rollout.sample(model, tokenizer, [prompt], 2, 0.0)
    assert asked == [torch.bfloat16]
    unquantized = config_of("sft", f"model.name_or_path={tiny_model}", "quant.mode=none")
    plain, _ = modeling.load_model(unquantized, tokenizer, torch.device("cpu"))
    assert modeling.kbit_compute_dtype(plain) == torch.float32
