"""`rlhf grpo`: critic-free RL (GRPO, Dr. GRPO, DAPO, RLOO, REINFORCE++, GSPO) on one base model.

    rlhf grpo policy.init_from=runs/sft/final reward.fns=[my_rewards:correct] data=prompts.jsonl
    rlhf grpo policy.init_from=runs/sft/final reward.from=runs/reward/final

One base model in memory carries the "policy" adapter (trainable, starts as the SFT adapter) and,
when kl.beta > 0, the "reference" (the SFT adapter frozen; or the bare base when there is no SFT
adapter); a reward model on the same base joins as the frozen "reward" adapter + head. There is no
value model: each prompt is sampled grpo.group_size times and the group is the baseline.

Each step: B prompts x G samples with the KV cache -> rewards (each function weighed, the reward
model too) -> advantages per group (grpo.advantage) -> `grpo.iterations` passes of
`grpo.minibatches` clipped policy updates (the ratio is exactly 1 on the first) -> log.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_cli import checkpoint, data, distributed, episodes, files, health, losses, modeling
from rlhf_cli.lineage import POLICY_STAGES, stage_manifest
from rlhf_cli.loop import (
    NonFiniteGuard,
    StopOnSignal,
    begin,
    build_optimizer,
    due,
    end_of_step,
    lr_schedule,
    nonfinite_guard,
    resume_position,
)
from rlhf_cli.rollout import Rollout, response_logprobs, stop_token_ids
from rlhf_cli.schema import GRPOConfig, UserError, to_container
from rlhf_cli.scoring import ProgrammaticReward, RewardScorer
from rlhf_cli.tracking import Stopwatch, Tracker, make_console, run_name

POLICY, REFERENCE, REWARD = "policy", "reference", "reward"
ADAPTER_DIRS = {".": POLICY}  # final/ holds the policy at the top, as every stage's final/ does


# ---------------------------------------------------------------- the roles on one base
@dataclass
class Roles:
    model: torch.nn.Module  # the peft model: the policy (+ reference, reward) adapters
    reference: str | None  # the reference adapter | None: the bare base (or no KL term at all)
    fns: list[ProgrammaticReward]
    reward_model: RewardScorer | None
    rm_shared: bool  # the reward model is an adapter on this base (else a second model)
    device: torch.device
    dtype: torch.dtype
    quant: str


def build_roles(
    config: GRPOConfig, tokenizer, device, rm_manifest: dict | None, fns, console
) -> Roles:
    """Load the base once with the policy adapter; the reference adapter only when kl.beta > 0
    needs it; the reward model beside it (an adapter when it shares the base). Only the policy's
    parameters are trainable."""
    init_from = config.policy.init_from
    if init_from:
        model, quant = modeling.load_trainable_adapter(
            config, tokenizer, device, Path(init_from), POLICY
        )
        reference = None
        if config.kl.beta > 0:
            modeling.add_frozen_adapter(model, Path(init_from), REFERENCE)
            reference = REFERENCE
    else:
        base, quant = modeling.load_base_model(config, tokenizer, device)
        model = modeling.add_lora(
            base, config.lora, quant, modeling.gradient_checkpointing(config.model, device), POLICY
        )
        reference = None
    reward_model, shared = None, False
    if config.reward.from_:
        reward_model, shared = RewardScorer.beside(
            model, config.reward.from_, rm_manifest, tokenizer, config, console, REWARD
        )
    model.set_adapter(POLICY)
    for name, param in model.named_parameters():
        param.requires_grad_(f".{POLICY}." in name)
    modeling.disable_dropout(model)
    dtype = modeling.compute_dtype(config.quant, device)
    return Roles(model, reference, fns, reward_model, shared, device, dtype, quant)


# ---------------------------------------------------------------- rewards
def reward_names(config: GRPOConfig) -> list[str]:
    """The metric name of each reward: the function's name (module-qualified when two share it),
    then `model` for the reward model, then `env` for the environment's (its turns' sum)."""
    short = [spec.rsplit(":", 1)[1] for spec in config.reward.fns]
    names = [s if short.count(s) == 1 else spec.replace(":", ".") for s, spec in zip(short, config.reward.fns, strict=True)]  # fmt: skip
    return names + (["model"] if config.reward.from_ else []) + (["env"] if config.env.name else [])


def describe_rewards(config: GRPOConfig, roles: Roles) -> str:
    """The weighted sum the run maximises, for the log: `1.0x pkg.mod:f + 0.5x the reward model ...`."""
    terms = list(config.reward.fns)
    if config.reward.from_:
        where = "an adapter on this base" if roles.rm_shared else "a second model"
        terms.append(f"the reward model {config.reward.from_} ({where})")
    weights = list(config.reward.weights or [1] * len(terms))
    if config.env.name:
        terms, weights = [*terms, f"the environment {config.env.name}"], [*weights, 1]
    return " + ".join(f"{w}x {term}" for w, term in zip(weights, terms, strict=True))


def score_all(roles: Roles, config: GRPOConfig, played: list[episodes.Episode]) -> torch.Tensor:
    """(N, K) float32: each reward (the functions in order, then the reward model, then the
    environment's) per episode; the functions and the reward model score its last policy turn
    (as cut when it was cut at max_new_tokens: no closing EOS)."""
    prompts, responses = [e.prompt for e in played], [e.response for e in played]
    columns = [fn.score(prompts, responses, [e.row for e in played]) for fn in roles.fns]
    if roles.reward_model is not None:
        columns.append(
            roles.reward_model.score(
                prompts,
                responses,
                normalize=config.reward.normalize,
                ended=[e.ended for e in played],
            )  # fmt: skip
        )
    if config.env.name:
        columns.append([e.env_reward for e in played])
    return torch.tensor(columns, dtype=torch.float32).T.reshape(len(responses), len(columns))


def weighted(config: GRPOConfig, per_reward: torch.Tensor) -> torch.Tensor:
    """(N,) the weighted sum of the (N, K) rewards (reward.weights, or all 1; the environment's
    reward, the last column when there is one, weighs 1)."""
    weights = list(config.reward.weights or [1.0] * per_reward.size(1))
    weights += [1.0] * (per_reward.size(1) - len(weights))
    return per_reward @ torch.tensor(weights, dtype=per_reward.dtype)


# ---------------------------------------------------------------- rollout phase
@dataclass
class Batch:
    """One step's episodes (this process's share, whole groups), everything the update needs."""

    rollout: Rollout
    prompts: list
    responses: list[str]  # the last policy turn (one-turn episodes: the response)
    transcripts: list[str]  # every turn after the prompt
    rewards: torch.Tensor  # (N,) weighted, after the missing-EOS penalty
    advantages: torch.Tensor  # (N,)
    loss_mask: torch.Tensor  # (B, R) response tokens that count in the loss
    old_logprobs: torch.Tensor | None  # (N, R) of the sampling policy | None: ratio 1, not needed
    ref_logprobs: torch.Tensor | None  # (N, R) | None when kl.beta is 0


@torch.no_grad()
def collect(
    roles: Roles, prompts: list[data.PromptExample], config: GRPOConfig, tokenizer,
    step: int = 0,
) -> tuple[Batch, dict[str, float]]:  # fmt: skip
    """Play G episodes of each prompt (one turn, or in the environment), score them, compute the
    group advantages and the log-probs the update compares against. Batch statistics
    (scale_rewards=batch, reinforce_pp) and the logged numbers are over every process's
    episodes."""
    started, watch = time.perf_counter(), Stopwatch()
    model, group = roles.model, config.grpo.group_size
    setup = episodes.setup_for(config)
    played = episodes.start(
        [p for p in prompts for _ in range(group)],
        tokenizer,
        setup,
        f"step {step}/rank {distributed.rank()}",
    )  # fmt: skip  (each group consecutive)
    stops = stop_token_ids(model, tokenizer)
    with modeling.frozen_role(model, POLICY):
        episodes.run(model, tokenizer, played, setup, config.rollout.temperature, stops, watch)
    rollout = episodes.to_rollout(played, tokenizer.pad_token_id, roles.device)
    raw, responses = [e.prompt for e in played], [e.response for e in played]
    with watch("score"):
        per_reward = score_all(roles, config, played)
    truncated = ~rollout.ended.cpu()
    rewards = weighted(config, per_reward) - config.reward.missing_eos_penalty * truncated.float()
    rewards = rewards.to(roles.device)

    flat = losses.equal_reward_groups(rewards, group)
    valid = ~flat if config.grpo.filter_groups else torch.ones_like(flat)
    advantages = losses.group_advantages(
        rewards, group, config.grpo.advantage, config.grpo.scale_rewards, valid,
        reduce=distributed.all_sum,
    )  # fmt: skip
    keep = valid.clone()
    if config.grpo.mask_truncated:
        keep &= rollout.ended
    # only the policy's tokens carry loss; an environment's messages are context
    loss_mask = rollout.policy_mask * keep.unsqueeze(1).to(rollout.policy_mask.dtype)

    old_logprobs = ref_logprobs = None
    micro = config.train.batch_size
    on_policy = config.grpo.iterations == 1 and config.grpo.minibatches == 1
    parts = {"old": [], "ref": []}
    for start in range(0, len(played), micro):
        chunk = rollout.select(torch.arange(start, min(start + micro, len(played)))).trimmed()
        if not on_policy:  # the sampling policy's log-probs: later updates' ratios need them
            with watch("policy_forward"), modeling.frozen_role(model, POLICY):
                logprobs, _ = response_logprobs(
                    model, chunk, config.rollout.temperature, roles.device, roles.dtype
                )
            parts["old"].append(widen(logprobs, rollout.response.size(1)))
        if config.kl.beta > 0:
            with watch("reference_forward"), modeling.frozen_role(model, roles.reference):
                ref, _ = response_logprobs(
                    model, chunk, config.rollout.temperature, roles.device, roles.dtype
                )
            parts["ref"].append(widen(ref, rollout.response.size(1)))
    if parts["old"]:
        old_logprobs = torch.cat(parts["old"])
    if parts["ref"]:
        ref_logprobs = torch.cat(parts["ref"])
    transcripts = [episodes.transcript(e) for e in played]
    batch = Batch(rollout, raw, responses, transcripts, rewards, advantages, loss_mask, old_logprobs, ref_logprobs)  # fmt: skip

    lengths, ended, all_rewards, flat_all, kept = (
        distributed.gather(v.to(roles.device).float())
        for v in (rollout.lengths, rollout.ended, rewards, flat, loss_mask.sum(dim=1) > 0)
    )
    every_reward = distributed.gather(per_reward.to(roles.device))
    played_counts = distributed.gather(episodes.counts(played).to(roles.device))
    seconds = time.perf_counter() - started
    stats = {
        "reward/mean": all_rewards.mean().item(),
        "reward/std": all_rewards.std().item() if len(all_rewards) > 1 else 0.0,
        **{
            f"rewards/{name}/{what}": value
            for k, name in enumerate(reward_names(config))
            for what, value in (
                ("mean", every_reward[:, k].mean().item()),
                ("std", every_reward[:, k].std().item() if len(every_reward) > 1 else 0.0),
            )
        },
        "groups/zero_std_fraction": flat_all.mean().item(),
        "groups/kept_fraction": kept.mean().item(),
        "rollout/response_length": lengths.mean().item(),
        "rollout/truncated_fraction": 1 - ended.mean().item(),
        "perf/rollout_s": seconds,
        "perf/tokens_per_s": lengths.sum().item() / max(watch.seconds["generate"], 1e-9),
        **watch.metrics(),
        "grpo/episodes": len(all_rewards),
    }
    if config.env.name:
        stats |= episodes.summary(played_counts.cpu())
    return batch, stats


def widen(logprobs: torch.Tensor, width: int) -> torch.Tensor:
    """(B, R') log-probs of a trimmed rollout -> (B, width), 0 on the added padding columns."""
    return torch.nn.functional.pad(logprobs, (0, width - logprobs.size(1)))


# ---------------------------------------------------------------- update phase
def update(
    roles: Roles, batch: Batch, optimizer, config: GRPOConfig, params, guard: NonFiniteGuard,
    step: int, watch: Stopwatch,
) -> list[dict[str, float]]:  # fmt: skip
    """`grpo.iterations` passes over the step's episodes in `grpo.minibatches` shuffled minibatches,
    one optimizer step each (skipped by `guard` when the loss or gradient is not finite, and when
    no token of the minibatch counts). The loss of a minibatch is aggregated over all its
    micro-batches on every process (the token and sequence counts are summed first), so
    accumulation and processes do not change it. On the first pass the ratio is exactly 1: the
    log-probs of the sampling policy are those of the policy being updated."""
    model, grpo = roles.model, config.grpo
    size = len(batch.responses)
    per_minibatch, per_micro = config.episodes_per_update, config.train.batch_size
    mask = batch.loss_mask.float()
    updates: list[dict[str, float]] = []
    for _ in range(grpo.iterations):
        order = torch.randperm(size) if grpo.minibatches > 1 else torch.arange(size)
        for first in range(0, size, per_minibatch):
            minibatch = order[first : first + per_minibatch]
            counts = distributed.all_sum(
                torch.stack([mask[minibatch].sum(), (mask[minibatch].sum(dim=1) > 0).sum()])
            )
            tokens, sequences = counts[0], counts[1]
            sums = dict.fromkeys(
                ("policy/loss", "policy/clip_low", "policy/clip_high", "policy/ratio",
                 "policy/approxkl", "policy/entropy", "objective/kl"), 0.0,
            )  # fmt: skip
            for m in range(0, per_minibatch, per_micro):
                idx = minibatch[m : m + per_micro].to(roles.device)
                chunk = batch.rollout.select(idx).trimmed()  # no all-padding columns
                width = chunk.response.size(1)
                chunk_mask = mask[idx][:, :width]
                with watch("policy_update"), modeling.adapter_role(model, POLICY):
                    logprobs, entropy = response_logprobs(
                        model, chunk, config.rollout.temperature, roles.device, roles.dtype, True
                    )
                    old = (
                        logprobs.detach()
                        if batch.old_logprobs is None
                        else batch.old_logprobs[idx, :width]
                    )
                    ref = None if batch.ref_logprobs is None else batch.ref_logprobs[idx, :width]
                    loss, stats = losses.grpo_policy_loss(
                        logprobs, old, batch.advantages[idx], chunk_mask, grpo.clip_low,
                        grpo.clip_high, grpo.importance, grpo.loss_agg,
                        config.rollout.max_new_tokens, ref, config.kl.beta, sequences, tokens,
                    )  # fmt: skip
                    loss.backward()  # already this micro-batch's share of the minibatch's loss
                share = (chunk_mask.sum() / tokens.clamp(min=1)).item()  # for the token means
                sums["policy/loss"] += loss.item()
                for key in ("clip_low", "clip_high", "ratio", "approxkl"):
                    sums[f"policy/{key}"] += stats[key].item() * share
                sums["objective/kl"] += stats["kl"].item() * share
                sums["policy/entropy"] += (
                    losses.masked_mean(entropy.detach(), chunk_mask).item() * share
                )
            with watch("optimizer"):
                totals = distributed.all_sum(torch.tensor(list(sums.values()), dtype=torch.float64))
                sums = dict(zip(sums, totals.tolist(), strict=True))
                distributed.sum_gradients(params)
                norm = config.optim.max_grad_norm or float("inf")
                sums["policy/grad_norm"] = torch.nn.utils.clip_grad_norm_(params, norm).item()
                applied = tokens.item() > 0 and guard.finite(
                    step, sums["policy/loss"], sums["policy/grad_norm"]
                )
                if applied:
                    files.kill_point("update")
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            sums["applied"] = float(applied)
            updates.append(sums)
    return updates


# ---------------------------------------------------------------- held-out rewards and samples
@torch.no_grad()
def evaluate(
    roles: Roles, prompts: list[data.PromptExample], config: GRPOConfig, tokenizer
) -> dict:
    """Greedy responses to the held-out prompts: mean weighted reward (and each reward's mean),
    length and truncated share. With several processes each answers its share of the batches, so
    the numbers are those of one process."""
    names = reward_names(config)
    setup = episodes.setup_for(config)
    stops = stop_token_ids(roles.model, tokenizer)

    def one_batch(index: int, chunk: list) -> list[tuple]:
        played = episodes.start(chunk, tokenizer, setup, f"eval {index}")
        with modeling.frozen_role(roles.model, POLICY):
            episodes.run(roles.model, tokenizer, played, setup, 0.0, stops)
        per_reward = score_all(roles, config, played)
        total = weighted(config, per_reward)
        table = episodes.counts(played)
        return [
            (total[i].item(), *per_reward[i].tolist(), float(sum(e.policy)), not e.ended, *table[i].tolist())
            for i, e in enumerate(played)
        ]  # fmt: skip

    answers = distributed.map_batches(prompts, config.rollout.batch_size, one_batch)
    n = max(len(answers), 1)
    k = len(names) + 3
    means = [sum(a[i] for a in answers) / n for i in range(k)]
    out = {
        "eval/reward": means[0],
        **{f"eval/{name}": means[1 + j] for j, name in enumerate(names)},
        "eval/response_length": means[k - 2],
        "eval/truncated_fraction": means[k - 1],
    }
    if config.env.name:
        table = torch.tensor([a[k:] for a in answers], dtype=torch.float64)
        out |= episodes.summary(table.reshape(len(answers), len(episodes.COUNTS)), "eval")
    return out


def sample_table(tracker: Tracker, batch: Batch, step: int, rows: int, group: int) -> None:
    """The first responses of a few of this step's groups: prompt, response (every turn after the
    prompt in an environment), reward, advantage."""
    table = [
        [data.prompt_text(batch.prompts[i]), batch.transcripts[i], f"{batch.rewards[i].item():.3f}",
         f"{batch.advantages[i].item():+.3f}"]
        for g in range(min(rows, len(batch.responses) // group))
        for i in (g * group, g * group + 1)
    ]  # fmt: skip
    tracker.table(
        f"step {step}: two samples of each of {min(rows, len(batch.responses) // group)} groups",
        ["prompt", "response", "reward", "advantage"], table,
    )  # fmt: skip


# ---------------------------------------------------------------- the stage
def train(config: GRPOConfig, signals: StopOnSignal | None = None) -> dict[str, float]:
    console = make_console()
    # ------------------------------------------------------------ setup
    # a function that cannot be imported stops the run before any model loads
    fns = [ProgrammaticReward(spec, "reward.fns") for spec in config.reward.fns]
    setup = episodes.setup_for(config)  # so does an environment that cannot be imported
    rm_manifest = None
    if config.reward.from_:
        rm_manifest = checkpoint.check_parent(
            config.reward.from_, "grpo", ("reward",), "reward.from"
        )
    resume_from, parent, device, tokenizer = begin(
        config, "grpo", console, POLICY_STAGES, config.policy.init_from,
        "policy.init_from",
        (rm_manifest, config.reward.from_, "reward.from") if rm_manifest else None,
    )  # fmt: skip
    prompts, eval_prompts, prompt_stats, eval_stats = episodes.load_prompts(
        config, tokenizer, console, "grpo", setup
    )
    for fn in fns:  # the dataset columns each function asks for
        fn.check_columns(prompts[0].row if prompts else {}, config.data.path)
    world = distributed.world()
    per_step = config.prompts_per_step * world  # prompts per step, over all processes
    if len(prompts) < per_step:
        per_process = f" x {world} processes" if world > 1 else ""
        raise UserError(
            f"{config.data.path} has {len(prompts)} usable training prompts, fewer than the "
            f"{per_step} prompts of one GRPO step (train.batch_size={config.train.batch_size} x "
            f"train.grad_accum={config.train.grad_accum} x grpo.minibatches="
            f"{config.grpo.minibatches}{per_process} episodes / grpo.group_size="
            f"{config.grpo.group_size}); lower one of them or give more prompts."
        )

    roles = build_roles(config, tokenizer, device, rm_manifest, fns, console)
    model = roles.model
    params = [p for n, p in model.named_parameters() if f".{POLICY}." in n]
    trainable, total = modeling.parameter_counts(model)
    reference = (
        "none (kl.beta=0: no reference pass)" if config.kl.beta == 0
        else "that adapter, frozen" if roles.reference else "the base with adapters disabled"
    )  # fmt: skip
    console.print(
        f"model: {config.model.name_or_path} on {device} (quant={roles.quant}), one base; policy: "
        f"{'the adapter of ' + config.policy.init_from if config.policy.init_from else 'a new adapter'}; "
        f"reference: {reference}; reward: {describe_rewards(config, roles)}; {episodes.describe(setup)}; "
        f"{trainable:,} trainable of {total:,} parameters"
    )
    optimizer = build_optimizer(params, config.optim)
    total_steps = config.train.max_steps or max(
        1, math.ceil(config.train.epochs * (len(prompts) // per_step))
    )
    scheduler = lr_schedule(optimizer, config.optim, total_steps)
    grpo = config.grpo
    processes = f" x {world} processes" if world > 1 else ""
    console.print(
        f"training: {total_steps} GRPO steps x {per_step} prompts x {grpo.group_size} samples "
        f"({config.train.batch_size} per micro-batch x {config.train.grad_accum} accumulation x "
        f"{grpo.minibatches} minibatches{processes}); {grpo.iterations} iterations x "
        f"{grpo.minibatches} updates per step; advantage={grpo.advantage} "
        f"(scale {grpo.scale_rewards}), loss_agg={grpo.loss_agg}, importance={grpo.importance}, "
        f"clip [{1 - grpo.clip_low:g}, {1 + grpo.clip_high:g}], kl.beta={config.kl.beta}; "
        f"{len(prompts)} prompts per epoch"
    )
    start_step, progress = resume_position(
        resume_from, model, optimizer, scheduler, config, console, {}, ADAPTER_DIRS
    )
    guard = nonfinite_guard(config, progress)
    stream = data.BatchStream(  # every process walks it and samples its own share of each batch
        prompts, per_step, config.seed, **progress["stream"], drop_last=True
    )
    tracker = Tracker(
        config.output_dir, "grpo", config.logger, to_container(config), run_name("grpo", config),
        total_steps, start_step, console,
    )  # fmt: skip

    # ------------------------------------------------------------ train
    model.train()
    monitor = health.Monitor()  # the signs of a run going wrong (rlhf_cli/health.py)
    metrics: dict[str, float] = {}
    try:
        for step in range(start_step + 1, total_steps + 1):
            batch, metrics = collect(
                roles, distributed.shard(stream.next()), config, tokenizer, step
            )
            started, watch = time.perf_counter(), Stopwatch()
            updates = update(roles, batch, optimizer, config, params, guard, step, watch)
            lr = optimizer.param_groups[0]["lr"]
            applied = [u.pop("applied") for u in updates]
            if any(applied):  # a step whose updates were all skipped leaves the schedule as it was
                scheduler.step()
            update_s = time.perf_counter() - started
            metrics |= {k: sum(u[k] for u in updates) / len(updates) for k in updates[0]}
            metrics |= {
                "grpo/updates": len(updates),
                "skipped_updates": guard.skipped,
                "lr": lr,
                "epoch": stream.progress(),
                "perf/update_s": update_s,
                "perf/sampling_share": metrics["perf/generate_s"] / (metrics["perf/rollout_s"] + update_s),
                **watch.metrics(),
            }  # fmt: skip
            if eval_prompts and due(step, config.train.eval_every, total_steps):
                metrics |= evaluate(roles, eval_prompts, config, tokenizer)
            metrics |= monitor.check(step, metrics, console)
            tracker.log(step, metrics, show=step % config.train.log_every == 0)
            if config.samples.every and step % config.samples.every == 0:
                sample_table(tracker, batch, step, config.samples.num_prompts, grpo.group_size)
            end_of_step(
                config, step, total_steps, model, optimizer, scheduler, stream, {}, ADAPTER_DIRS,
                guard, signals,
            )  # fmt: skip
        # ------------------------------------------------------------ save
        final_metrics = {
            k: metrics[k] for k in ("reward/mean", "groups/zero_std_fraction") if k in metrics
        } | {"steps": total_steps}
        if eval_prompts:
            final_metrics |= evaluate(roles, eval_prompts, config, tokenizer)
            tracker.log(
                total_steps, {k: v for k, v in final_metrics.items() if k.startswith("eval/")}
            )
        manifest = stage_manifest(
            "grpo", config, model, tokenizer, parent, "policy", final_metrics,
            (prompt_stats, eval_stats), init_from=config.policy.init_from,
            reward={"fns": list(config.reward.fns), "weights": config.reward.weights,
                    "from": config.reward.from_},
        )  # fmt: skip
        final = checkpoint.save_final(
            config.output_dir, model, tokenizer, manifest, adapters=ADAPTER_DIRS
        )
        held_out = f", held-out greedy reward {final_metrics['eval/reward']:.3f}" if eval_prompts else ""  # fmt: skip
        console.print(
            f"[bold green]done[/]: mean reward {final_metrics.get('reward/mean', float('nan')):.3f}"
            f"{held_out}; policy in {final}"
        )
        return final_metrics
    finally:
        tracker.finish()
