"""`rlhf reward`: a Bradley-Terry reward model (LoRA adapter + scalar head), one readable loop.

    rlhf reward init_from=runs/sft/final             # start from the SFT adapter, shipped demo-prefs
    rlhf reward data=prefs.jsonl optim.lr=5e-5        # or from the raw base on your own pairs

setup (parent check, tokenizer, pairs, model + head, optimizer, resume) -> train (chosen and
rejected scored in one forward pass, -logsigmoid(r_c - r_r - margin), held-out accuracy) -> save
(final/ with adapter, head, tokenizer, and the score mean/std PPO normalises with).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from rlhf_cli import checkpoint, data, distributed, losses, modeling
from rlhf_cli.data import load_examples
from rlhf_cli.lineage import stage_manifest
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
from rlhf_cli.schema import RewardConfig, to_container
from rlhf_cli.scoring import HEAD, score_examples
from rlhf_cli.tracking import Tracker, make_console, run_name


def pair_scores(
    model, head, pairs: list[data.PairExample], pad_id: int, device, dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) scores, each (B,), from one forward pass. The prompt a pair's two
    sequences share runs once (`data.collate_shared_prefix`) where the attention takes a custom
    mask; otherwise the 2B whole sequences run as one batch."""
    shared = data.collate_shared_prefix(pairs, pad_id)
    with modeling.autocast(device, dtype):
        if modeling.takes_custom_mask(model, shared["input_ids"].size(1)):
            return (
                modeling.shared_prefix_scores(model, head, shared, device, dtype).float().unbind(-1)
            )
        batch = data.collate_pairs(pairs, pad_id)
        scores = modeling.sequence_scores(
            model, head, batch["input_ids"].to(device), batch["attention_mask"].to(device)
        )  # (2B,)
    return scores.float().chunk(2)


def preference_metrics(
    chosen: torch.Tensor, rejected: torch.Tensor, pair_losses: torch.Tensor
) -> dict[str, float]:
    both = torch.cat([chosen, rejected])
    return {
        "loss": pair_losses.mean().item(),
        "accuracy": (chosen > rejected).float().mean().item(),  # ties are not wins
        "margin": (chosen - rejected).mean().item(),
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/mean": both.mean().item(),
        "rewards/std": both.std().item() if both.numel() > 1 else 0.0,
    }


def evaluate(
    model, head, pairs: list[data.PairExample], config: RewardConfig, pad_id: int, device, dtype
) -> dict:
    """Held-out loss, accuracy and margin over all pairs."""
    with torch.no_grad(), modeling.eval_mode(model):
        scored = [
            pair_scores(
                model, head, pairs[start : start + config.train.batch_size], pad_id, device, dtype
            )
            for start in range(0, len(pairs), config.train.batch_size)
        ]
    chosen, rejected = (torch.cat(side).cpu() for side in zip(*scored, strict=True))
    margin = torch.tensor([p.margin for p in pairs])
    pair_losses = losses.bradley_terry(
        chosen, rejected, margin, config.reward.center_rewards_coefficient
    )
    return {f"eval/{k}": v for k, v in preference_metrics(chosen, rejected, pair_losses).items()}


def train(config: RewardConfig, signals: StopOnSignal | None = None) -> dict[str, float]:
    console = make_console()
    # ------------------------------------------------------------ setup
    resume_from, parent, device, tokenizer = begin(config, "reward", console, parents=("sft",))
    train_pairs, eval_pairs, train_stats, eval_stats = load_examples(
        config, tokenizer, console, "reward"
    )

    if parent is not None:
        model, quant = modeling.load_trainable_adapter(
            config, tokenizer, device, Path(config.init_from)
        )
    else:
        model, quant = modeling.load_model(config, tokenizer, device)
    head = modeling.ScalarHead(modeling.hidden_size(model), config.reward.head_init).to(device)
    heads = {HEAD: head}
    dtype = modeling.compute_dtype(config.quant, device)
    params = modeling.trainable_parameters(model) + list(head.parameters())
    trainable, total = modeling.parameter_counts(model)
    start = f"the adapter of {config.init_from}" if parent else "a new adapter on the raw base"
    console.print(
        f"model: {config.model.name_or_path} on {device} (quant={quant}), {start} + a scalar head: "
        f"{trainable + head.linear.weight.numel() + 1:,} trainable of {total:,} parameters"
    )
    optimizer = build_optimizer(params, config.optim)
    total_steps = plan_steps(len(train_pairs), config.train)
    scheduler = lr_schedule(optimizer, config.optim, total_steps)
    console.print(
        f"training: {step_size(total_steps, config.train, 'pairs')}, {len(train_pairs)} pairs per epoch"
    )

    start_step, progress = resume_position(
        resume_from, model, optimizer, scheduler, config, console, heads
    )
    stream = train_stream(train_pairs, config, progress)
    guard = nonfinite_guard(config, progress)
    tracker = Tracker(
        config.output_dir, "reward", config.logger, to_container(config), run_name("reward", config),
        total_steps, start_step, console,
    )  # fmt: skip

    def held_out() -> dict:
        return evaluate(model, head, eval_pairs, config, tokenizer.pad_token_id, device, dtype)

    # ------------------------------------------------------------ train
    model.train()
    metrics: dict[str, float] = {}
    try:
        for step in range(start_step + 1, total_steps + 1):
            started = time.perf_counter()
            micro_batches = [
                distributed.shard(stream.next()) for _ in range(config.train.grad_accum)
            ]
            n_pairs = distributed.total(sum(len(pairs) for pairs in micro_batches))
            parts = []  # per-row values of each micro-batch; None for an empty share
            for pairs in micro_batches:
                if not pairs:  # an epoch's last micro-batch may leave this process no rows
                    parts.append(None)
                    continue
                chosen, rejected = pair_scores(
                    model, head, pairs, tokenizer.pad_token_id, device, dtype
                )
                pair_losses = losses.bradley_terry(
                    chosen,
                    rejected,
                    torch.tensor([p.margin for p in pairs], device=device),
                    config.reward.center_rewards_coefficient,
                )
                # normalised by the whole step's pair count: every pair weighs the same
                (pair_losses.sum() / n_pairs).backward()
                parts.append({"chosen": chosen, "rejected": rejected, "losses": pair_losses})
            every = distributed.gather_rows(parts, device)
            metrics = preference_metrics(every["chosen"], every["rejected"], every["losses"])
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
                config, step, total_steps, model, optimizer, scheduler, stream, heads, guard=guard,
                signals=signals,
            )  # fmt: skip
        # ------------------------------------------------------------ save
        final_metrics = {"train/loss": metrics.get("loss", float("nan")), "steps": total_steps}
        if eval_pairs:
            final_metrics |= held_out()
            tracker.log(
                total_steps, {k: v for k, v in final_metrics.items() if k.startswith("eval/")}
            )
        # the score distribution PPO normalises with: both responses of (a sample of) the training
        # pairs. Chosen responses alone can have a tiny spread once the model separates the pairs
        # (std 0.04 on the demo), which would blow normalised scores up by 25x.
        sample = [
            r for p in train_pairs[: config.reward.norm_samples] for r in (p.chosen, p.rejected)
        ]
        scores = score_examples(
            model, head, sample, tokenizer.pad_token_id, device, dtype, config.train.batch_size
        )
        reward_stats = {
            "mean": scores.mean().item(),
            "std": scores.std().item(),
            "count": len(sample),
            "source": "chosen and rejected responses of the first training pairs",
        }
        if eval_pairs:
            show_pairs(tracker, model, head, eval_pairs[:3], tokenizer, device, dtype)
        heads_info = {
            HEAD: {"file": checkpoint.head_file(HEAD), "hidden_size": modeling.hidden_size(model)}
        }
        manifest = stage_manifest(
            "reward", config, model, tokenizer, parent, "reward", final_metrics, (train_stats, eval_stats),
            heads=heads_info, reward_stats=reward_stats,
        )  # fmt: skip
        final = checkpoint.save_final(config.output_dir, model, tokenizer, manifest, heads=heads)
        accuracy = f", held-out accuracy {final_metrics['eval/accuracy']:.3f}" if eval_pairs else ""
        console.print(
            f"[bold green]done[/]: train loss {final_metrics['train/loss']:.4f}{accuracy}; scores on training "
            f"responses: mean {reward_stats['mean']:.3f}, std {reward_stats['std']:.3f}; reward model in {final}"
        )
        return final_metrics
    finally:
        tracker.finish()


def show_pairs(
    tracker: Tracker, model, head, pairs: list[data.PairExample], tokenizer, device, dtype
) -> None:
    """A few held-out pairs with both responses and their scores."""
    chosen = score_examples(
        model, head, [p.chosen for p in pairs], tokenizer.pad_token_id, device, dtype
    )
    rejected = score_examples(
        model, head, [p.rejected for p in pairs], tokenizer.pad_token_id, device, dtype
    )
    rows = [
        [
            _response_text(tokenizer, p.chosen),
            f"{c:.3f}",
            _response_text(tokenizer, p.rejected),
            f"{r:.3f}",
        ]
        for p, c, r in zip(pairs, chosen.tolist(), rejected.tolist(), strict=True)
    ]
    tracker.table("held-out pairs: reward scores", ["chosen", "score", "rejected", "score"], rows)


def _response_text(tokenizer, example: data.Example) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels, strict=True) if label >= 0],
                            skip_special_tokens=True).strip()  # fmt: skip
