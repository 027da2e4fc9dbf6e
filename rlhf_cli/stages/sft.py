"""`rlhf sft`: supervised fine-tuning of a LoRA adapter, one readable loop.

    rlhf sft                                      # embedded SmolLM2-135M on the shipped demo-sft data
    rlhf sft config=my.yaml data=train.jsonl optim.lr=1e-4
    rlhf sft -m optim.lr=1e-4,3e-4 lora.r=8,16    # a sweep

setup (tokenizer, data, model, optimizer, resume) -> train (accumulated AdamW steps with periodic
eval and checkpoints) -> save (final/ with adapter, tokenizer, manifest) -> samples before/after.
"""

from __future__ import annotations

import time
from pathlib import Path

from rlhf_cli import checkpoint, data, distributed, files, losses, modeling, rollout
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
from rlhf_cli.modeling import forward_loss, mean_token_loss
from rlhf_cli.schema import SFTConfig, to_container
from rlhf_cli.tracking import Tracker, make_console, run_name


def sample_prompts(rows: list[dict], config: SFTConfig) -> list[tuple[str | list[dict], str]]:
    """(prompt, reference answer) pairs from the first held-out rows."""
    pairs = []
    columns = config.data.columns
    for row in rows[: config.samples.num_prompts]:
        messages = row.get(columns.messages)
        if isinstance(messages, list):
            last = max(
                (i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None
            )
            if last:
                pairs.append((messages[:last], messages[last]["content"]))
        elif columns.prompt in row:
            completion = row.get(columns.completion, "")
            pairs.append(
                (
                    row[columns.prompt],
                    completion if isinstance(completion, str) else completion[-1]["content"],
                )
            )
    return pairs


def answer_samples(model, tokenizer, samples: list[tuple], config: SFTConfig) -> list[str]:
    prompts = [prompt for prompt, _ in samples]
    return rollout.generate(
        model, tokenizer, prompts, config.samples.max_new_tokens, config.samples.temperature
    )


def train(config: SFTConfig, signals: StopOnSignal | None = None) -> dict[str, float]:
    console = make_console()
    # ------------------------------------------------------------ setup
    resume_from, _, device, tokenizer = begin(config, "sft", console)
    train_rows, eval_rows = data.load_splits(config.data, config.seed)
    train_examples, train_stats = data.tokenize_sft(
        train_rows, tokenizer, config.data, config.data.path
    )
    eval_examples, eval_stats = [], data.TokenizeStats()
    if eval_rows:
        eval_examples, eval_stats = data.tokenize_sft(
            eval_rows, tokenizer, config.data, f"{config.data.path} (held out)"
        )
    console.print(
        f"data: train {train_stats.summary()}; held out {eval_stats.summary()}"
        f"{data.demo_note(config.data.path)}"
    )
    if config.data.packing:
        n_before = len(train_examples)
        train_examples = data.pack(train_examples, config.data.max_length)
        eval_examples = data.pack(eval_examples, config.data.max_length)
        console.print(
            f"packing: {n_before} examples -> {len(train_examples)} rows of <= {config.data.max_length} tokens"
        )

    model, quant = modeling.load_model(config, tokenizer, device)
    dtype = modeling.compute_dtype(config.quant, device)
    trainable, total = modeling.parameter_counts(model)
    console.print(
        f"model: {config.model.name_or_path} on {device} (quant={quant}); LoRA r={config.lora.r}: "
        f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)"
    )
    params = modeling.trainable_parameters(model)
    optimizer = build_optimizer(params, config.optim)
    total_steps = plan_steps(len(train_examples), config.train)
    scheduler = lr_schedule(optimizer, config.optim, total_steps)
    console.print(
        f"training: {step_size(total_steps, config.train, 'rows')}, {len(train_examples)} rows per epoch"
    )

    # the starting model's answers, before any checkpoint is loaded (a fresh LoRA adapter is the identity)
    samples = sample_prompts(eval_rows, config)
    before_file = Path(config.output_dir) / "samples_before.json"
    if (
        samples
        and distributed.is_main()
        and (
            resume_from is None
            or not before_file.is_file()
            or len(checkpoint.read_json(before_file)) != len(samples)
        )
    ):
        files.write_json_atomic(before_file, answer_samples(model, tokenizer, samples, config))

    start_step, progress = resume_position(
        resume_from, model, optimizer, scheduler, config, console
    )
    stream = train_stream(train_examples, config, progress)
    guard = nonfinite_guard(config, progress)

    tracker = Tracker(
        config.output_dir,
        "sft",
        config.logger,
        to_container(config),
        run_name("sft", config),
        total_steps,
        start_step,
        console,
    )

    def held_out_loss() -> float:
        return mean_token_loss(
            model, eval_examples, config.train.batch_size, tokenizer.pad_token_id, device, dtype,
            config.data.packing,
        )  # fmt: skip

    # ------------------------------------------------------------ train
    model.train()
    metrics: dict[str, float] = {}
    try:
        for step in range(start_step + 1, total_steps + 1):
            started = time.perf_counter()
            shares = [distributed.shard(stream.next()) for _ in range(config.train.grad_accum)]
            # (an epoch's last micro-batch may leave this process no rows: nothing to run)
            micro_batches = [
                data.collate(rows, tokenizer.pad_token_id, config.data.packing)
                for rows in shares
                if rows
            ]
            # the whole step's target count, over every process: each token weighs the same
            local = sum(losses.count_targets(b["labels"]) for b in micro_batches)
            n_targets = max(distributed.total(local), 1.0)
            loss_total = 0.0
            for batch in micro_batches:
                loss_sum, _ = forward_loss(model, batch, device, dtype)
                # normalised by the whole step's target count: every token weighs the same
                (loss_sum / n_targets).backward()
                loss_total += loss_sum.item()
            loss_total = distributed.total(loss_total)
            update = optimizer_step(params, optimizer, scheduler, config, loss_total, guard, step)

            elapsed = time.perf_counter() - started
            real_tokens = sum(b["num_real_tokens"].item() for b in micro_batches)
            slots = sum(b["input_ids"].numel() for b in micro_batches)
            metrics = {
                "loss": loss_total / n_targets,
                **update,
                "epoch": stream.progress(),
                "perf/tokens": real_tokens,  # non-padding tokens of this process's rows
                "perf/tokens_per_s": real_tokens / elapsed,
                # over every process's rows (this one may have had none: an epoch's tail)
                "perf/padding_fraction": 1
                - distributed.total(real_tokens) / distributed.total(slots),
            }
            if eval_examples and due(step, config.train.eval_every, total_steps):
                metrics["eval/loss"] = held_out_loss()
            tracker.log(
                step, metrics, show=step % config.train.log_every == 0 or "eval/loss" in metrics
            )
            end_of_step(
                config, step, total_steps, model, optimizer, scheduler, stream, guard=guard,
                signals=signals,
            )  # fmt: skip
        # ------------------------------------------------------------ save
        final_metrics = {"train/loss": metrics.get("loss", float("nan")), "steps": total_steps}
        if eval_examples:
            final_metrics["eval/loss"] = held_out_loss()
            tracker.log(total_steps, {"eval/loss": final_metrics["eval/loss"]})
        extra = {}
        if samples and distributed.is_main():
            after = answer_samples(model, tokenizer, samples, config)
            before = checkpoint.read_json(before_file)
            rows = [
                [data.prompt_text(p), b, a, ref]
                for (p, ref), b, a in zip(samples, before, after, strict=True)
            ]
            tracker.table(
                "held-out samples: before vs after SFT",
                ["prompt", "before", "after", "reference"],
                rows,
            )
            extra["samples.json"] = [
                dict(zip(("prompt", "before", "after", "reference"), r, strict=True)) for r in rows
            ]
        manifest = stage_manifest(
            "sft",
            config,
            model,
            tokenizer,
            None,
            "policy",
            final_metrics,
            (train_stats, eval_stats),
        )
        final = checkpoint.save_final(config.output_dir, model, tokenizer, manifest, extra)
        held_out = f", held-out loss {final_metrics['eval/loss']:.4f}" if eval_examples else ""
        console.print(
            f"[bold green]done[/]: train loss {final_metrics['train/loss']:.4f}{held_out}; adapter in {final}"
        )
        return final_metrics
    finally:
        tracker.finish()
