"""Tiny models and tokenizers made on the spot for tests: no hub, a few seconds on a CPU."""

from __future__ import annotations

import json
import random
from pathlib import Path

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WORDS = [
    "red",
    "blue",
    "green",
    "cat",
    "dog",
    "bird",
    "one",
    "two",
    "three",
    "four",
    "five",
    "yes",
    "no",
    "what",
    "is",
    "the",
    "colour",
    "of",
    "sky",
    "grass",
    "answer",
    "say",
    "hello",
    "world",
]


def tiny_corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]
    return lines + ["Answer: 0123456789", "What is the colour of the sky?", "user assistant system"]


def make_tokenizer(folder: Path, vocab_size: int = 384):
    """A byte-level BPE tokenizer with ChatML special tokens; pad is left unset (as in many models)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tiny_corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    return fast


def make_model(
    folder: Path, vocab_size: int | None = None, seed: int = 0, hidden_size: int = 64
) -> Path:
    """A 2-layer Llama (hidden 64 by default) with its tokenizer, saved as safetensors in `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(folder)
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        initializer_range=0.25,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def chat_rows(n: int = 16, seed: int = 0) -> list[dict]:
    """Chat examples whose answers follow from the question (learnable by a tiny model)."""
    rng = random.Random(seed)
    colours = {"sky": "blue", "grass": "green", "cat": "red", "dog": "yellow"}
    counts = ["one", "two", "three", "four", "five"]
    pairs = [(thing, count) for thing in sorted(colours) for count in counts]
    rng.shuffle(pairs)
    rows = []
    for thing, count in (pairs * (n // len(pairs) + 1))[:n]:
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"What is the colour of {count} {thing}?"},
                    {"role": "assistant", "content": f"Answer: {count} {colours[thing]}"},
                ]
            }
        )
    return rows


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    """Pairs where chosen differs from rejected by a learnable feature: colour words vs animal words."""
    rng = random.Random(seed)
    good, bad = ["blue", "green", "red", "yellow"], ["cat", "dog", "bird", "world"]
    rows = []
    for _ in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))) + " ? "
        rows.append(
            {
                "prompt": prompt,
                "chosen": " ".join(rng.choice(good) for _ in range(rng.randint(1, 3))),
                "rejected": " ".join(rng.choice(bad) for _ in range(rng.randint(1, 3))),
            }
        )
    return rows
