"""Scoring with a reward model: batches of examples, and (prompt, response) pairs from a checkpoint.

    scorer = RewardScorer.load("runs/reward/final")
    scorer.score(["What is 2 + 2?"], ["Answer: 4"])                 # raw scores
    scorer.score(prompts, responses, normalize=True)                 # (s - mean) / std from training

Prompts are plain text or chat message lists, rendered exactly as the reward stage rendered them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlhf_cli import checkpoint, data, modeling
from rlhf_cli.schema import RewardConfig, build_config

HEAD = "reward_head"


@torch.no_grad()
def score_examples(
    model,
    head,
    examples: list[data.Example],
    pad_token_id: int,
    device,
    dtype,
    batch_size: int = 16,
) -> torch.Tensor:
    """(N,) float32 scores of tokenized sequences, in order."""
    was_training = model.training
    model.eval()
    scores = []
    for start in range(0, len(examples), batch_size):
        batch = data.collate(examples[start : start + batch_size], pad_token_id, packed=False)
        with modeling.autocast(device, dtype):
            scores.append(
                modeling.sequence_scores(
                    model, head, batch["input_ids"].to(device), batch["attention_mask"].to(device)
                ).float()
            )
    model.train(was_training)
    return torch.cat(scores).cpu() if scores else torch.zeros(0)


class RewardScorer:
    """A reward checkpoint ready to score: base model + reward adapter (frozen) + scalar head."""

    def __init__(self, model, head, tokenizer, config: RewardConfig, stats: dict, device, dtype):
        self.model, self.head, self.tokenizer = model, head, tokenizer
        self.config, self.stats, self.device, self.dtype = config, stats, device, dtype

    @classmethod
    def load(
        cls, folder: str | Path, device: str = "auto", quant: str | None = None
    ) -> RewardScorer:
        from omegaconf import OmegaConf
        from peft import PeftModel

        folder = Path(folder)
        manifest = checkpoint.check_parent(str(folder), "scoring", ("reward",))
        config: RewardConfig = build_config("reward", OmegaConf.create(manifest["config"]))  # type: ignore[assignment]
        config.device = device
        if quant is not None:
            config.quant.mode = quant
        torch_device = modeling.resolve_device(config.device)
        tokenizer = modeling.load_tokenizer(config.model, path=str(folder))
        base, _ = modeling.load_base_model(config, tokenizer, torch_device)
        model = PeftModel.from_pretrained(base, str(folder), adapter_name="default").eval()
        head = modeling.ScalarHead(modeling.hidden_size(model)).to(torch_device)
        checkpoint.load_heads(folder, {HEAD: head})
        dtype = modeling.compute_dtype(config.quant, torch_device)
        return cls(
            model, head, tokenizer, config, manifest.get("reward_stats", {}), torch_device, dtype
        )

    def encode(self, prompt: str | list[dict], response: str) -> data.Example:
        ids, labels = data.tokenize_prompt_completion(
            self.tokenizer, prompt, response, "scored pair"
        )
        n = self.config.data.max_length
        return data.Example(ids[:n], labels[:n])

    def score(
        self,
        prompts: list[str | list[dict]],
        responses: list[str],
        batch_size: int = 16,
        normalize: bool = False,
    ) -> list[float]:
        """One score per (prompt, response); normalize=True applies the training mean/std."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        examples = [self.encode(p, r) for p, r in zip(prompts, responses, strict=True)]
        scores = score_examples(
            self.model,
            self.head,
            examples,
            self.tokenizer.pad_token_id,
            self.device,
            self.dtype,
            batch_size,
        )
        if normalize:
            scores = (scores - self.stats["mean"]) / max(self.stats["std"], 1e-6)
        return scores.tolist()
