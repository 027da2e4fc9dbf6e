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


# The tiny model's hidden size: each attention projection, LM-head logit and MLP up projection is
# a dot product of this many terms, whose order BLAS picks by the matrix's shape; the tests'
# rounding bounds count it (numerics.reordered_sum). (The MLP's down projection sums 2x as many.)
TINY_HIDDEN = 64


def make_model(
    folder: Path, vocab_size: int | None = None, seed: int = 0, hidden_size: int = TINY_HIDDEN
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


# ---------------------------------------------------------------- the model families of the presets
def _template(name: str) -> str:
    """A family's real chat template: trl's byte copies of hub templates (trl is a test-only
    dependency), or tests/templates/ for the two trl does not carry (see its README)."""
    here = Path(__file__).parent / "templates" / f"{name}.jinja"
    if here.is_file():
        return here.read_text()
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text()


LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|finetune_right_pad_id|>"]  # fmt: skip
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# family -> the preset it stands for, its architecture, template and special tokens (as the hub
# tokenizers have them: MODELS.md), the ids generation stops at, and whether embeddings are tied
FAMILIES = {
    "llama-3.2": dict(preset="llama-3.2-1b", arch="llama", template="llama3_2",
                      specials=LLAMA3_SPECIALS, bos="<|begin_of_text|>", eos="<|eot_id|>",
                      stops=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"], tied=True),
    "llama-3.1": dict(preset="llama-3.1-8b", arch="llama", template="llama3_1",
                      specials=LLAMA3_SPECIALS, bos="<|begin_of_text|>", eos="<|eot_id|>",
                      stops=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"], tied=False),
    "qwen2.5": dict(preset="qwen2.5-0.5b", arch="qwen2", template="qwen2_5",
                    specials=CHATML_SPECIALS, eos="<|im_end|>", pad="<|endoftext|>",
                    stops=["<|im_end|>", "<|endoftext|>"], tied=True),
    "qwen3": dict(preset="qwen3-0.6b", arch="qwen3", template="qwen3", specials=CHATML_SPECIALS,
                  eos="<|im_end|>", pad="<|endoftext|>", added=["<think>", "</think>"],
                  stops=["<|im_end|>", "<|endoftext|>"], tied=True),
    "mistral": dict(preset="mistral-7b", arch="mistral", template="mistral_v0_3",
                    specials=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], bos="<s>", eos="</s>",
                    unk="<unk>", stops=["</s>"], tied=False),
    "gemma-2": dict(preset="gemma-2-2b", arch="gemma2", template="gemma",
                    specials=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>",
                              "<end_of_turn>"], bos="<bos>", eos="<eos>", pad="<pad>",
                    unk="<unk>", stops=["<eos>", "<end_of_turn>"], tied=True),
    "smollm2": dict(preset="smollm2-360m", arch="llama", template="smollm2",
                    specials=CHATML_SPECIALS, bos="<|im_start|>", eos="<|im_end|>",
                    pad="<|im_end|>", unk="<|endoftext|>", stops=["<|im_end|>"], tied=True),
}  # fmt: skip


def make_family_tokenizer(folder: Path, family: str, vocab_size: int = 384):
    """A tiny byte-level BPE tokenizer with the family's special tokens, BOS/EOS/pad/unk and its
    real chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    spec = FAMILIES[family]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=spec["specials"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tokenizer.train_from_iterator(tiny_corpus(), trainer)
    roles = {k: spec[k] for k in ("bos", "eos", "pad", "unk") if spec.get(k)}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, **{f"{k}_token": v for k, v in roles.items()}
    )
    if spec.get("added"):
        fast.add_tokens(spec["added"])
    fast.chat_template = _template(spec["template"])
    fast.save_pretrained(folder)
    return fast


def make_family_model(folder: Path, family: str, seed: int = 0) -> Path:
    """A 2-layer random model of the family's architecture class (with its quirks: Qwen2's q/k/v
    biases, Qwen3's q/k norms, Gemma 2's logit soft-capping and scaled embeddings, Mistral without
    a sliding window, tied or untied embeddings) and its tokenizer, saved in `folder`."""
    import torch
    import transformers
    from transformers import GenerationConfig

    folder.mkdir(parents=True, exist_ok=True)
    spec = FAMILIES[family]
    tokenizer = make_family_tokenizer(folder, family)
    shape = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=512, tie_word_embeddings=spec["tied"],
                 initializer_range=0.25, bos_token_id=tokenizer.bos_token_id,
                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    extra = {
        "llama": {},
        "qwen2": {"use_sliding_window": False},
        "qwen3": {"head_dim": 16},
        "mistral": {"sliding_window": None},
        "gemma2": {
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "final_logit_softcapping": 30.0,
            "attn_logit_softcapping": 50.0,
            "sliding_window": 64,
        },  # fmt: skip
    }[spec["arch"]]
    names = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral",
             "gemma2": "Gemma2"}  # fmt: skip
    prefix = names[spec["arch"]]
    config = getattr(transformers, f"{prefix}Config")(**shape, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForCausalLM")(config)
    stops = [tokenizer.convert_tokens_to_ids(t) for t in spec["stops"]]
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def family_chats(n: int = 12, seed: int = 0) -> list[dict]:
    """Conversations with a system turn and two assistant turns (what breaks naive masking)."""
    rows = []
    for row in chat_rows(2 * n, seed)[::2]:
        first, answer = row["messages"]
        rows.append({"messages": [
            {"role": "system", "content": "Answer with a count and a colour."},
            first, answer, {"role": "user", "content": "say it again"}, answer,
        ]})  # fmt: skip
    return rows
