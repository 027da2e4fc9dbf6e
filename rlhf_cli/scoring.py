"""Scoring with a reward model: batches of examples, and (prompt, response) pairs from a checkpoint.

    scorer = RewardScorer.load("runs/reward/final")
    scorer.score(["What is 2 + 2?"], ["Answer: 4"])                 # raw scores
    scorer.score(prompts, responses, normalize=True)                 # (s - mean) / std from training
    ProgrammaticReward("my_rewards:exact_match").score(prompts, responses)   # a user function

Prompts are plain text or chat message lists, rendered exactly as the reward stage rendered them.
"""

from __future__ import annotations

import importlib
import inspect
import math
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from rlhf_cli import checkpoint, data, modeling
from rlhf_cli.compose import saved_config
from rlhf_cli.schema import RewardConfig, UserCodeError, UserError

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
    scores = []
    with modeling.eval_mode(model):
        for start in range(0, len(examples), batch_size):
            batch = data.collate(examples[start : start + batch_size], pad_token_id, packed=False)
            with modeling.autocast(device, dtype):
                scores.append(
                    modeling.sequence_scores(
                        model,
                        head,
                        batch["input_ids"].to(device),
                        batch["attention_mask"].to(device),
                    ).float()
                )
    return torch.cat(scores).cpu() if scores else torch.zeros(0)


class RewardScorer:
    """A reward checkpoint ready to score: base model + reward adapter (frozen) + scalar head."""

    def __init__(
        self,
        model,
        head,
        tokenizer,
        config: RewardConfig,
        stats: dict,
        device,
        dtype,
        adapter: str | None = None,
    ):
        self.model, self.head, self.tokenizer = model, head, tokenizer
        self.config, self.stats, self.device, self.dtype = config, stats, device, dtype
        self.adapter = adapter  # the RM's adapter name when it shares a base with other roles
        self.truncated = 0  # scored sequences longer than the RM's data.max_length (start cut)

    @classmethod
    def load(
        cls, folder: str | Path, device: str = "auto", quant: str | None = None
    ) -> RewardScorer:
        from peft import PeftModel

        folder = Path(folder)
        manifest = checkpoint.check_parent(str(folder), "scoring", ("reward",))
        config = reward_config(manifest)
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

    @classmethod
    def on_shared_base(
        cls, model, folder: str | Path, tokenizer, device, dtype, adapter: str = "reward"
    ) -> RewardScorer:
        """The reward checkpoint in `folder` as a frozen adapter on `model`'s base (which must be the
        RM's base: the caller checks fingerprints), with its head."""
        folder = Path(folder)
        manifest = checkpoint.read_manifest(folder)
        config = reward_config(manifest)
        modeling.add_frozen_adapter(model, folder, adapter)
        head = modeling.ScalarHead(modeling.hidden_size(model)).to(device)
        checkpoint.load_heads(folder, {HEAD: head})
        head.requires_grad_(False)
        # the same vocabulary (the caller checked), rendered with the RM's own chat settings
        # (template, its variables, merge_system), as it rendered its training pairs
        tokenizer = modeling.load_tokenizer(config.model, path=str(folder))
        return cls(
            model, head, tokenizer, config, manifest.get("reward_stats", {}), device, dtype,
            adapter,
        )  # fmt: skip

    @classmethod
    def beside(
        cls, model, folder: str | Path, manifest: dict, tokenizer, config, console, adapter="reward"
    ) -> tuple[RewardScorer, bool]:
        """The reward model in `folder` for a run whose model is `model` (a peft model, `config`
        its stage config): a frozen adapter on that same base when the RM was trained on it, else a
        second model (said in the log). -> (scorer, shared base?)"""
        device = modeling.resolve_device(config.device)
        shared = manifest["base_fingerprint"] == modeling.fingerprint(model.config, tokenizer)
        if shared:
            dtype = modeling.compute_dtype(config.quant, device)
            return cls.on_shared_base(model, folder, tokenizer, device, dtype, adapter), True
        console.print(
            f"[yellow]reward model[/]: {folder} was trained on {manifest['base_model']}, not on "
            f"this run's base {config.model.name_or_path}: loading it as a second model"
        )
        return cls.load(folder, config.device, config.quant.mode), False

    def normalization(self) -> tuple[float, float]:
        """(mean, std) of the scores on the RM's training responses, as the reward stage stored them."""
        if "mean" not in self.stats or "std" not in self.stats:
            raise UserError(
                "this reward model's rlhf_stage.json has no reward_stats to normalise scores with; "
                "retrain it with this version of rlhf reward, or set reward.normalize=false."
            )
        return self.stats["mean"], max(self.stats["std"], 1e-6)

    def encode(self, prompt: str | list[dict], response: str, ended: bool = True) -> data.Example:
        """(prompt, response) tokenized and truncated as the reward stage did its training pairs
        (data.keep_end: the prompt's start is cut first, never the scored end). A response that
        did not end (cut at max_new_tokens) is scored as it was cut: no turn end, no EOS."""
        if ended:
            ids, labels = data.tokenize_prompt_completion(
                self.tokenizer, prompt, response, "scored pair"
            )
        else:
            ids = data.tokenize_unfinished(self.tokenizer, prompt, response)
            labels = list(ids)
        max_length = self.config.data.max_length
        self.truncated += len(ids) > max_length  # counted for the stage's log
        keep = data.leading_bos(self.tokenizer, ids)
        ids, labels, _ = data.keep_end(ids, labels, max_length, keep)
        return data.Example(ids, labels)

    def score(
        self,
        prompts: list[str | list[dict]],
        responses: list[str],
        batch_size: int = 16,
        normalize: bool = False,
        ended: list[bool] | None = None,
    ) -> list[float]:
        """One score per (prompt, response); normalize=True applies the training mean/std.
        `ended` (one per response; all True when left out) says which responses emitted a stop
        token: the others were cut at max_new_tokens and are scored without a closing EOS."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        ended = [True] * len(responses) if ended is None else list(ended)
        examples = [self.encode(p, r, e) for p, r, e in zip(prompts, responses, ended, strict=True)]
        with modeling.frozen_role(self.model, self.adapter) if self.adapter else nullcontext():
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
            mean, std = self.normalization()
            scores = (scores - mean) / std
        return scores.tolist()


def reward_config(manifest: dict) -> RewardConfig:
    """The typed config a reward checkpoint was trained with (how it tokenized its inputs)."""
    return saved_config("reward", manifest["config"])  # type: ignore[return-value]


def import_object(spec: str, key: str, what: str = "function") -> Any:
    """`package.module:name` -> the object (the current folder is importable, as with
    `python -m`). One sentence when it cannot be found; the module's own error while importing is
    the user's bug (their traceback)."""
    module_name, _, name = spec.partition(":")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is None or not (module_name + ".").startswith(err.name + "."):
            raise UserCodeError(
                f"{key}={spec}: importing {module_name} raised {type(err).__name__}: {err}", err
            ) from err
        raise UserError(
            f"{key}={spec}: could not import {module_name} ({type(err).__name__}: {err}); give "
            f"package.module:{what} importable from the current folder or PYTHONPATH."
        ) from None
    except Exception as err:  # the module itself raised while being imported: the user's bug
        raise UserCodeError(
            f"{key}={spec}: importing {module_name} raised {type(err).__name__}: {err}", err
        ) from err
    value = getattr(module, name, None)
    if value is None:
        raise UserError(
            f"{key}={spec}: {module_name} has no {what} {name!r}; give package.module:{what}."
        )
    return value


def load_reward_fn(spec: str, key: str = "reward.fn") -> Callable:
    """`package.module:function` -> the function (`import_object`), checked to be callable."""
    fn = import_object(spec, key)
    if not callable(fn):
        module_name, _, name = spec.partition(":")
        raise UserError(
            f"{key}={spec}: {module_name} has no function {name!r}; give package.module:function."
        )
    return fn


class ProgrammaticReward:
    """A user function (prompts, responses, **columns) -> one float per response, checked on every
    call. Parameters after the first two name dataset columns (e.g. `answer`), passed as lists
    aligned with the responses, as TRL's reward functions receive them."""

    def __init__(self, spec: str, key: str = "reward.fn"):
        self.spec, self.key, self.fn = spec, key, load_reward_fn(spec, key)
        parameters = list(inspect.signature(self.fn).parameters.values())[2:]
        self.columns = [
            p.name
            for p in parameters
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty
        ]

    def check_columns(self, row: dict, source: str) -> None:
        missing = [c for c in self.columns if c not in row]
        if missing:
            raise UserError(
                f"{self.key}={self.spec} needs the column(s) {', '.join(missing)}, which the rows of "
                f"{source} lack (they have {', '.join(sorted(row))})."
            )

    def score(
        self, prompts: list, responses: list[str], rows: list[dict] | None = None
    ) -> list[float]:
        what = f"{self.key}={self.spec}"
        columns = {c: [row.get(c) for row in rows or [{}] * len(responses)] for c in self.columns}
        try:
            values = self.fn(prompts, responses, **columns)
        except Exception as err:  # a bug in the user's function: their traceback, not ours
            raise UserCodeError(f"{what} raised {type(err).__name__}: {err}", err) from err
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            raise UserError(
                f"{what} returned {type(values).__name__}, not a sequence of numbers; it must "
                "return one float per response."
            ) from None
        if len(values) != len(responses):
            raise UserError(
                f"{what} returned {len(values)} values for {len(responses)} responses; it must "
                "return one float per response."
            )
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is not None:
            raise UserError(
                f"{what} returned {values[bad]} for response {bad}; rewards must be finite numbers."
            )
        return values
