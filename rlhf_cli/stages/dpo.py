"""`rlhf dpo`: direct preference optimisation of a LoRA policy, one readable loop.

    rlhf dpo init_from=runs/sft/final                      # shipped demo-prefs pairs
    rlhf dpo init_from=runs/sft/final dpo.loss=ipo dpo.beta=0.5 data=prefs.jsonl
    rlhf dpo dpo.loss=orpo dpo.beta=0.1                     # ORPO: from the raw base, no SFT stage

One base model in memory. The policy is a trainable LoRA adapter; the reference is the adapter the
policy started from, loaded again frozen as "reference" (or the bare base, adapters disabled, when
there is no init_from): never a second copy of the base weights; simpo and orpo use no reference.
With dpo.precompute_reference the reference log-probs are computed once before training and cached
in the run folder.

setup -> train (chosen and rejected in one forward pass, summed completion log-probs, dpo_loss or
orpo_loss) -> save (final/ with the policy adapter, tokenizer and manifest).
"""

from __future__ import annotations

import hashlib
import json
import time
from array import array
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rlhf_cli import checkpoint, data, distributed, losses, modeling
from rlhf_cli.data import load_examples
from rlhf_cli.lineage import POLICY_STAGES, stage_manifest
from rlhf_cli.loop import (
    StopOnSignal,
    begin,
    build_optimizer,
    due,
    end_of_step,
    lr_schedule,
    nonfinite_guard,
    optimizer_step,
    plan_steps,
    resume_position,
    step_size,
    train_stream,
)
from rlhf_cli.schema import REFERENCE_FREE, DPOConfig, to_container
from rlhf_cli.tracking import Tracker, make_console, run_name

REFERENCE = "reference"
REFERENCE_CACHE = "reference_logps.safetensors"


class Reference:
    """Reference log-probs: from the frozen role on the shared base, or from the precomputed cache."""

    def __init__(self, model, adapter: str | None, device, dtype):
        self.model, self.adapter, self.device, self.dtype = model, adapter, device, dtype
        self.cache: dict[str, torch.Tensor] = {}

    def compute(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with modeling.frozen_role(self.model, self.adapter):
            logps, _ = modeling.completion_logps(self.model, batch, self.device, self.dtype)
        return logps.float()

    def precompute(
        self, split: str, pairs: list[data.PairExample], pad_id: int, batch_size: int
    ) -> None:
        chosen, rejected = torch.zeros(len(pairs)), torch.zeros(len(pairs))
        for start in range(0, len(pairs), batch_size):
            batch = data.collate_pairs(pairs[start : start + batch_size], pad_id)
            logps = self.compute(batch).cpu()
            chosen[batch["index"]], rejected[batch["index"]] = logps.chunk(2)
        self.cache[f"{split}_chosen"], self.cache[f"{split}_rejected"] = chosen, rejected

    def logps(self, split: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(2B,) reference log-probs of the batch's chosen then rejected sequences."""
        if f"{split}_chosen" in self.cache:
            index = batch["index"]
            cached = torch.cat(
                [self.cache[f"{split}_chosen"][index], self.cache[f"{split}_rejected"][index]]
            )
            return cached.to(self.device)
        return self.compute(batch)


def dpo_step_loss(
    model, reference: Reference, batch, config: DPOConfig, device, dtype, split: str = "train"
):
    """(per-pair losses (B,), metrics inputs) for one batch of pairs; gradients flow to the policy only."""
    policy, lengths = modeling.completion_logps(model, batch, device, dtype)
    policy_chosen, policy_rejected = policy.chunk(2)
    chosen_lengths, rejected_lengths = lengths.chunk(2)
    extra = {}
    if config.dpo.loss == losses.ORPO:  # reference-free, with the SFT term on the chosen side
        pair_losses, chosen_rewards, rejected_rewards, extra = losses.orpo_loss(
            policy_chosen, policy_rejected, chosen_lengths, rejected_lengths, beta=config.dpo.beta
        )
    else:
        free = config.dpo.loss in REFERENCE_FREE
        ref = torch.zeros_like(policy) if free else reference.logps(split, batch)
        ref_chosen, ref_rejected = ref.chunk(2)
        pair_losses, chosen_rewards, rejected_rewards = losses.dpo_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths,
            rejected_lengths, loss_type=config.dpo.loss, beta=config.dpo.beta,
            label_smoothing=config.dpo.label_smoothing, simpo_gamma=config.dpo.simpo_gamma,
        )  # fmt: skip
    parts = {
        "losses": pair_losses.detach(),
        "chosen_rewards": chosen_rewards,
        "rejected_rewards": rejected_rewards,
        "policy_chosen": policy_chosen.detach(),
        "policy_rejected": policy_rejected.detach(),
        **extra,
    }
    return pair_losses, parts


def dpo_metrics(parts: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """TRL's metric names, over all pairs of the step (or of the held-out set)."""
    cat = {key: torch.cat([p[key] for p in parts]).float() for key in parts[0]}
    return {
        "loss": cat["losses"].mean().item(),
        "rewards/chosen": cat["chosen_rewards"].mean().item(),
        "rewards/rejected": cat["rejected_rewards"].mean().item(),
        "rewards/margins": (cat["chosen_rewards"] - cat["rejected_rewards"]).mean().item(),
        "rewards/accuracies": (cat["chosen_rewards"] > cat["rejected_rewards"])
        .float()
        .mean()
        .item(),
        "logps/chosen": cat["policy_chosen"].mean().item(),
        "logps/rejected": cat["policy_rejected"].mean().item(),
        **({"nll_loss": cat["nll"].mean().item()} if "nll" in cat else {}),
        **({"log_odds_ratio": cat["log_odds"].mean().item()} if "log_odds" in cat else {}),
    }


@torch.no_grad()
def evaluate(
    model, reference: Reference, pairs, config: DPOConfig, pad_id: int, device, dtype
) -> dict[str, float]:
    parts = []
    with modeling.eval_mode(model):
        for start in range(0, len(pairs), config.train.batch_size):
            batch = data.collate_pairs(pairs[start : start + config.train.batch_size], pad_id)
            parts.append(
                dpo_step_loss(model, reference, batch, config, device, dtype, split="eval")[1]
            )
    return {f"eval/{k}": v for k, v in dpo_metrics(parts).items()}


def reference_cache_key(config: DPOConfig, quant: str, dtype, train_pairs, eval_pairs) -> str:
    """What the precomputed reference log-probs depend on, hashed: the base model and how it is
    loaded, the reference adapter's files (init_from's content, or none: the bare base), and the
    token ids and targets of every pair (the data, the chat template, max_length and truncation).
    A cache with another key is computed again, never reused."""
    digest = hashlib.sha256()
    model = config.model
    reference = checkpoint.content_id(Path(config.init_from)) if config.init_from else "base"
    setting = [model.name_or_path, model.revision, quant, str(dtype), reference]
    digest.update(json.dumps(setting).encode())
    for split, pairs in (("train", train_pairs), ("eval", eval_pairs)):
        digest.update(f"{split}:{len(pairs)}".encode())
        for pair in pairs:
            for example in (pair.chosen, pair.rejected):
                digest.update(array("q", example.input_ids).tobytes() + b"|")
                digest.update(array("q", example.labels).tobytes() + b"|")
    return digest.hexdigest()


def cached_reference(cache_file: Path, key: str) -> dict[str, torch.Tensor] | None:
    """The cached reference log-probs in `cache_file` when they were computed with `key`."""
    if not cache_file.is_file():
        return None
    with safe_open(str(cache_file), "pt") as handle:
        if (handle.metadata() or {}).get("key") != key:
            return None
    return load_file(str(cache_file))


def build_policy_and_reference(config: DPOConfig, tokenizer, device, parent: dict | None):
    """The policy (trainable adapter "default") and how the reference is reached on the same base."""
    init_from = config.init_from if parent is not None else None
    model, quant, reference_adapter = modeling.policy_and_reference(
        config, tokenizer, device, init_from, REFERENCE
    )
    dtype = modeling.compute_dtype(config.quant, device)
    return model, quant, Reference(model, reference_adapter, device, dtype), dtype


def train(config: DPOConfig, signals: StopOnSignal | None = None) -> dict[str, float]:
    console = make_console()
    # ------------------------------------------------------------ setup
    resume_from, parent, device, tokenizer = begin(config, "dpo", console, parents=POLICY_STAGES)
    train_pairs, eval_pairs, train_stats, eval_stats = load_examples(
        config, tokenizer, console, "dpo"
    )

    model, quant, reference, dtype = build_policy_and_reference(config, tokenizer, device, parent)
    params = modeling.trainable_parameters(model)
    trainable, total = modeling.parameter_counts(model)
    start = f"the adapter of {config.init_from}" if parent else "a new adapter on the raw base"
    role = f"none ({config.dpo.loss} is reference-free)" if config.dpo.loss in REFERENCE_FREE else (
        "that adapter, frozen, on the same base" if parent else "the base with adapters disabled")  # fmt: skip
    console.print(
        f"model: {config.model.name_or_path} on {device} (quant={quant}); policy: {start} "
        f"({trainable:,} trainable of {total:,} parameters); reference: {role}"
    )
    if config.dpo.precompute_reference and config.dpo.loss not in REFERENCE_FREE:
        cache_file = Path(config.output_dir) / REFERENCE_CACHE
        key = reference_cache_key(config, quant, dtype, train_pairs, eval_pairs)
        stale = cache_file.is_file()  # a cache with another key is stale
        found = cached_reference(cache_file, key)
        distributed.barrier()  # every process has looked before rank 0 may write it
        if found is not None:
            reference.cache = found
            how = "read from"
        else:
            for split, pairs in (("train", train_pairs), ("eval", eval_pairs)):
                reference.precompute(split, pairs, tokenizer.pad_token_id, config.train.batch_size)
            if distributed.is_main():
                tmp = cache_file.with_name(f".{cache_file.name}.tmp")
                save_file(reference.cache, str(tmp), metadata={"key": key})
                tmp.replace(cache_file)
            distributed.barrier()
            how = (
                "computed again, the cached ones being for another reference or data, into"
                if stale
                else "saved in"
            )
        console.print(
            f"reference log-probs: precomputed for {len(train_pairs)} + {len(eval_pairs)} pairs "
            f"({how} {cache_file})"
        )

    optimizer = build_optimizer(params, config.optim)
    total_steps = plan_steps(len(train_pairs), config.train)
    scheduler = lr_schedule(optimizer, config.optim, total_steps)
    console.print(
        f"training: {step_size(total_steps, config.train, 'pairs')}, {len(train_pairs)} pairs per epoch; "
        f"loss={config.dpo.loss}, beta={config.dpo.beta}"
    )
    start_step, progress = resume_position(
        resume_from, model, optimizer, scheduler, config, console
    )
    stream = train_stream(train_pairs, config, progress)
    guard = nonfinite_guard(config, progress)
    tracker = Tracker(
        config.output_dir, "dpo", config.logger, to_container(config), run_name("dpo", config),
        total_steps, start_step, console,
    )  # fmt: skip

    def held_out() -> dict[str, float]:
        return evaluate(model, reference, eval_pairs, config, tokenizer.pad_token_id, device, dtype)

    # ------------------------------------------------------------ train
    model.train()
    metrics: dict[str, float] = {}
    try:
        for step in range(start_step + 1, total_steps + 1):
            started = time.perf_counter()
            shares = [distributed.shard(stream.next()) for _ in range(config.train.grad_accum)]
            # None: an epoch's last micro-batch may leave this process no rows
            micro_batches = [
                data.collate_pairs(rows, tokenizer.pad_token_id) if rows else None
                for rows in shares
            ]
            n_pairs = distributed.total(sum(len(rows) for rows in shares))
            parts = []
            for batch in micro_batches:
                if batch is None:
                    parts.append(None)
                    continue
                pair_losses, batch_parts = dpo_step_loss(
                    model, reference, batch, config, device, dtype
                )
                # normalised by the whole step's pair count: every pair weighs the same
                (pair_losses.sum() / n_pairs).backward()
                parts.append(batch_parts)
            metrics = dpo_metrics([distributed.gather_rows(parts, device)])
            metrics |= optimizer_step(
                params, optimizer, scheduler, config, metrics["loss"], guard, step
            )
            metrics |= {
                "epoch": stream.progress(),
                "perf/pairs_per_s": n_pairs / (time.perf_counter() - started),
            }
            if eval_pairs and due(step, config.train.eval_every, total_steps):
                metrics |= held_out()
            tracker.log(
                step, metrics, show=step % config.train.log_every == 0 or "eval/loss" in metrics
            )
            end_of_step(
                config, step, total_steps, model, optimizer, scheduler, stream, guard=guard,
                signals=signals,
            )  # fmt: skip
        # ------------------------------------------------------------ save
        final_metrics = {"train/loss": metrics.get("loss", float("nan")), "steps": total_steps}
        if eval_pairs:
            final_metrics |= held_out()
            tracker.log(
                total_steps, {k: v for k, v in final_metrics.items() if k.startswith("eval/")}
            )
        manifest = stage_manifest(
            "dpo",
            config,
            model,
            tokenizer,
            parent,
            "policy",
            final_metrics,
            (train_stats, eval_stats),
        )
        final = checkpoint.save_final(config.output_dir, model, tokenizer, manifest)
        accuracy = (
            f", held-out preference accuracy {final_metrics['eval/rewards/accuracies']:.3f}"
            if eval_pairs
            else ""
        )
        console.print(
            f"[bold green]done[/]: train loss {final_metrics['train/loss']:.4f}{accuracy}; policy in {final}"
        )
        return final_metrics
    finally:
        tracker.finish()
