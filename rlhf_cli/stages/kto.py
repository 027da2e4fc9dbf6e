"""`rlhf kto`: Kahneman-Tversky optimisation on unpaired feedback, one readable loop.

    rlhf kto init_from=runs/sft/final data=feedback.jsonl       # prompt, completion, label: true|false
    rlhf kto init_from=runs/sft/final                          # demo-prefs pairs, split into rows
    rlhf kto init_from=runs/sft/final kto.desirable_weight=1.33

Each row is one response marked desirable or undesirable (preference pairs give one of each). One
base model in memory: the policy is a trainable LoRA adapter; the reference is the adapter the
policy started from, loaded again frozen (or the bare base, adapters disabled, without init_from).

KTO's reference point z0 estimates KL(policy || reference) from mismatched pairs: each prompt of a
micro-batch with another row's completion (`data.mismatched`, formed before the micro-batch is
shared out among processes). It is taken over the whole optimizer step (every micro-batch, every
process), without gradients, before the step's loss passes.

setup -> train (KL passes for z0, then per micro-batch: policy log-probs with gradients, reference
log-probs without, kto_loss) -> save (final/ with the policy adapter, tokenizer and manifest).
"""

from __future__ import annotations

import time

import torch

from rlhf_cli import checkpoint, data, distributed, losses, modeling
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
from rlhf_cli.schema import KTOConfig, kto_weight_ranges, to_container
from rlhf_cli.tracking import Tracker, make_console, run_name

REFERENCE = "reference"


def weight_advice(n_desirable: int, n_undesirable: int, w_d: float, w_u: float) -> str | None:
    """One line of advice when the weights do not suit the counts (`kto_weight_ranges`), else None."""
    ranges = kto_weight_ranges(n_desirable, n_undesirable, w_d, w_u)
    if ranges is None:
        return None
    (d_low, d_high), (u_low, u_high) = ranges
    ratio = (w_d * n_desirable) / (w_u * n_undesirable)
    return (
        f"{n_desirable} desirable and {n_undesirable} undesirable rows: weight x count gives "
        f"desirable/undesirable = {ratio:.2f}, outside the [1, 1.33] the KTO paper advises; set "
        f"kto.desirable_weight in [{d_low:.2f}, {d_high:.2f}] or kto.undesirable_weight in "
        f"[{u_low:.2f}, {u_high:.2f}] (not both)."
    )


def balance_weights(config: KTOConfig, n_desirable: int, n_undesirable: int, console) -> None:
    """kto.balance: raise the rarer kind's weight so that w_D n_D = w_U n_U (the low end of the
    paper's [1, 4/3]), in the config itself, so the manifest and a resume see the weights used."""
    kto = config.kto
    ranges = kto_weight_ranges(
        n_desirable, n_undesirable, kto.desirable_weight, kto.undesirable_weight
    )
    if ranges is None:
        return
    if n_desirable * kto.desirable_weight < n_undesirable * kto.undesirable_weight:
        kto.desirable_weight = ranges[0][0]
    else:
        kto.undesirable_weight = ranges[1][1]
    console.print(
        f"kto.balance: desirable_weight={kto.desirable_weight:.4g}, undesirable_weight="
        f"{kto.undesirable_weight:.4g} (weight x count equal for the two kinds)"
    )


def reference_logps(model, adapter: str | None, batch, device, dtype) -> torch.Tensor:
    with modeling.frozen_role(model, adapter):
        return modeling.completion_logps(model, batch, device, dtype)[0].float()


@torch.no_grad()
def kl_point(model, reference: str | None, batches: list[dict], config: KTOConfig, device, dtype):
    """z0 over these micro-batches and every process (`losses.kto_kl_estimate`); 0 without the
    passes for apo_zero_unpaired, which has no reference point."""
    if config.kto.loss != "kto":
        return torch.zeros((), device=device)
    parts = [
        None if b is None else {
            "policy": modeling.completion_logps(model, b["kl"], device, dtype)[0].float(),
            "reference": reference_logps(model, reference, b["kl"], device, dtype),
        }
        for b in batches
    ]  # fmt: skip
    every = distributed.gather_rows(parts, device)
    return losses.kto_kl_estimate(every["policy"], every["reference"])


def kto_batch_loss(model, reference: str | None, batch, kl, config: KTOConfig, device, dtype):
    """(per-row losses (B,), metrics inputs) for one micro-batch; gradients reach the policy only."""
    policy = modeling.completion_logps(model, batch["rows"], device, dtype)[0]
    ref = reference_logps(model, reference, batch["rows"], device, dtype)
    desirable = batch["desirable"].to(device)
    row_losses, rewards = losses.kto_loss(
        policy, ref, desirable, kl, loss_type=config.kto.loss, beta=config.kto.beta,
        desirable_weight=config.kto.desirable_weight,
        undesirable_weight=config.kto.undesirable_weight,
    )  # fmt: skip
    parts = {
        "losses": row_losses.detach(),
        "rewards": rewards,
        "logps": policy.detach().float(),
        "desirable": desirable.float(),  # float: gathered across processes like the others
    }
    return row_losses, parts


def kto_metrics(parts: list[dict[str, torch.Tensor]], kl: torch.Tensor) -> dict[str, float]:
    """TRL's KTO metric names (chosen = desirable, rejected = undesirable) over the given rows, and
    `accuracy`: the share of rows whose implied reward has the label's sign (> 0 when desirable,
    < 0 when not; 0 at the start, where policy = reference)."""
    cat = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    good = cat["desirable"].bool()
    rewards = cat["rewards"].float()

    def mean(values: torch.Tensor) -> float:
        return values.mean().item() if values.numel() else float("nan")

    metrics = {
        "loss": cat["losses"].float().mean().item(),
        "kl": kl.item(),
        "rewards/chosen": mean(rewards[good]),
        "rewards/rejected": mean(rewards[~good]),
        "logps/chosen": mean(cat["logps"][good]),
        "logps/rejected": mean(cat["logps"][~good]),
        "count/desirable": float(good.sum()),
        "count/undesirable": float((~good).sum()),
        "accuracy": torch.where(good, rewards > 0, rewards < 0).float().mean().item(),
    }
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics


def eval_batches(rows: list, batch_size: int) -> list[list]:
    """The held-out rows in batches of batch_size; a last batch of one joins the one before (a row
    alone would be its own KL pair)."""
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        last = batches.pop()
        batches[-1] = batches[-1] + last
    return batches


def collate(rows: list, config: KTOConfig, tokenizer, shard: bool = False) -> dict | None:
    """A micro-batch with its KL pairs. The pairs are formed over the whole (global) micro-batch
    before a process takes its share, so N processes pair rows as one process with N times the
    batch does (and train like it). None when this process's share is empty (an epoch's last
    micro-batch can hold fewer rows than there are processes)."""
    kl_pairs = data.mismatched(rows, config.data.max_length, tokenizer.bos_token_id)
    mine = distributed.shard(list(range(len(rows)))) if shard else range(len(rows))
    if not mine:
        return None
    return data.collate_unpaired(
        [rows[i] for i in mine], [kl_pairs[i] for i in mine], tokenizer.pad_token_id
    )


@torch.no_grad()
def evaluate(model, reference, rows, config: KTOConfig, tokenizer, device, dtype) -> dict:
    with modeling.eval_mode(model):
        batches = [
            collate(b, config, tokenizer) for b in eval_batches(rows, config.train.batch_size)
        ]
        kl = kl_point(model, reference, batches, config, device, dtype)
        parts = [kto_batch_loss(model, reference, b, kl, config, device, dtype)[1] for b in batches]
    return {f"eval/{k}": v for k, v in kto_metrics(parts, kl).items()}


def train(config: KTOConfig, signals: StopOnSignal | None = None) -> dict[str, float]:
    console = make_console()
    # ------------------------------------------------------------ setup
    resume_from, parent, device, tokenizer = begin(config, "kto", console, parents=POLICY_STAGES)
    train_rows, eval_rows, train_stats, eval_stats = data.load_examples(
        config, tokenizer, console, "kto", tokenize=data.tokenize_unpaired, what="rows"
    )
    n_good = sum(r.desirable for r in train_rows)
    n_bad = len(train_rows) - n_good
    console.print(f"feedback: {n_good} desirable and {n_bad} undesirable training rows")
    if config.kto.balance:  # before anything reads or records the weights (a resume compares them)
        balance_weights(config, n_good, n_bad, console)
    elif advice := weight_advice(
        n_good, n_bad, config.kto.desirable_weight, config.kto.undesirable_weight
    ):
        console.print(f"[yellow]advice[/]: {advice}")

    init_from = config.init_from if parent is not None else None
    model, quant, reference = modeling.policy_and_reference(
        config, tokenizer, device, init_from, REFERENCE
    )
    dtype = modeling.compute_dtype(config.quant, device)
    params = modeling.trainable_parameters(model)
    trainable, total = modeling.parameter_counts(model)
    start = f"the adapter of {config.init_from}" if parent else "a new adapter on the raw base"
    role = "that adapter, frozen, on the same base" if parent else "the base, adapters disabled"
    console.print(
        f"model: {config.model.name_or_path} on {device} (quant={quant}); policy: {start} "
        f"({trainable:,} trainable of {total:,} parameters); reference: {role}"
    )

    optimizer = build_optimizer(params, config.optim)
    total_steps = plan_steps(len(train_rows), config.train)
    scheduler = lr_schedule(optimizer, config.optim, total_steps)
    console.print(
        f"training: {step_size(total_steps, config.train, 'rows')}, {len(train_rows)} rows per "
        f"epoch; loss={config.kto.loss}, beta={config.kto.beta}, weights "
        f"{config.kto.desirable_weight}/{config.kto.undesirable_weight}"
    )
    start_step, progress = resume_position(
        resume_from, model, optimizer, scheduler, config, console
    )
    stream = train_stream(train_rows, config, progress)
    guard = nonfinite_guard(config, progress)
    tracker = Tracker(
        config.output_dir, "kto", config.logger, to_container(config), run_name("kto", config),
        total_steps, start_step, console,
    )  # fmt: skip

    def held_out() -> dict[str, float]:
        return evaluate(model, reference, eval_rows, config, tokenizer, device, dtype)

    # ------------------------------------------------------------ train
    model.train()
    metrics: dict[str, float] = {}
    try:
        for step in range(start_step + 1, total_steps + 1):
            started = time.perf_counter()
            micro_batches = [
                collate(stream.next(), config, tokenizer, shard=True)
                for _ in range(config.train.grad_accum)
            ]
            n_rows = distributed.total(sum(len(b["desirable"]) for b in micro_batches if b))
            kl = kl_point(model, reference, micro_batches, config, device, dtype)
            parts = []
            for batch in micro_batches:
                if batch is None:  # this process's share of the micro-batch is empty
                    parts.append(None)
                    continue
                row_losses, batch_parts = kto_batch_loss(
                    model, reference, batch, kl, config, device, dtype
                )
                # normalised by the whole step's row count: every row weighs the same
                (row_losses.sum() / n_rows).backward()
                parts.append(batch_parts)
            metrics = kto_metrics([distributed.gather_rows(parts, device)], kl)
            metrics |= optimizer_step(
                params, optimizer, scheduler, config, metrics["loss"], guard, step
            )
            metrics |= {
                "epoch": stream.progress(),
                "perf/rows_per_s": n_rows / (time.perf_counter() - started),
            }
            if eval_rows and due(step, config.train.eval_every, total_steps):
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
        if eval_rows:
            final_metrics |= held_out()
            tracker.log(
                total_steps, {k: v for k, v in final_metrics.items() if k.startswith("eval/")}
            )
        manifest = stage_manifest(
            "kto", config, model, tokenizer, parent, "policy", final_metrics,
            (train_stats, eval_stats),
        )  # fmt: skip
        final = checkpoint.save_final(config.output_dir, model, tokenizer, manifest)
        accuracy = (
            f", held-out reward-sign accuracy {final_metrics['eval/accuracy']:.3f}"
            if eval_rows
            else ""
        )
        console.print(
            f"[bold green]done[/]: train loss {final_metrics['train/loss']:.4f}{accuracy}; policy in {final}"
        )
        return final_metrics
    finally:
        tracker.finish()
