"""`rlhf ppo`: PPO with policy, reference, value and reward as adapters on one base, one readable loop.

    rlhf ppo policy.init_from=runs/sft/final reward.from=runs/reward/final
    rlhf ppo policy.init_from=runs/sft/final reward.fn=my_rewards:exact_match data=prompts.jsonl

One base model in memory (4-bit on CUDA) carries four LoRA adapters: "policy" (trainable, starts as
the SFT adapter), "reference" (the SFT adapter, frozen; or the bare base when there is no SFT
adapter), "reward" (the reward model's adapter and head, frozen) and "value" (trainable, starts as
the reward adapter and head). A reward model trained on another base is loaded as a second model.

Each step: rollout (sample one response per prompt with the KV cache; log-probs of the policy and
the reference, values, scores) -> rewards (score at the last token, -beta * KL per token) -> GAE
-> `ppo.epochs` passes of `ppo.minibatches` clipped policy + value updates -> KL controller.
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
from rlhf_cli.rollout import (
    Rollout,
    response_logprobs,
    stop_token_ids,
)
from rlhf_cli.schema import KLConfig, PPOConfig, UserError, to_container
from rlhf_cli.scoring import ProgrammaticReward, RewardScorer
from rlhf_cli.tracking import Stopwatch, Tracker, make_console, run_name

POLICY, REFERENCE, REWARD, VALUE = "policy", "reference", "reward", "value"
VALUE_HEAD = "value_head"
TRAINABLE = (POLICY, VALUE)
# where each trainable adapter lives in checkpoints and final/ (the policy at the top: the next
# stage, `rlhf eval` or `rlhf export` start from it like from any other stage's final/)
ADAPTER_DIRS = {".": POLICY, "value": VALUE}


class KLController:
    """The KL coefficient beta: fixed, or adaptive (Ziegler et al. 2019): after each batch,
    beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * episodes / horizon."""

    def __init__(self, kl: KLConfig, coef: float | None = None):
        self.config = kl
        self.coef = kl.coef if coef is None else coef

    def update(self, kl_per_response: float, episodes: int) -> None:
        if not self.config.adaptive:
            return
        error = min(max(kl_per_response / self.config.target - 1, -0.2), 0.2)
        self.coef *= 1 + error * episodes / self.config.horizon


# ---------------------------------------------------------------- the roles on one base
@dataclass
class Roles:
    model: torch.nn.Module  # the peft model: policy, value (+ reference, reward) adapters
    value_head: modeling.ScalarHead
    reference: str | None  # the reference adapter, or None: the bare base
    reward: RewardScorer | ProgrammaticReward | None  # None: only the environment rewards
    reward_kind: str  # "shared base" | "second model" | "function" | "environment"
    value_start: str  # what the value adapter started from, for the log
    device: torch.device
    dtype: torch.dtype
    quant: str


def build_roles(
    config: PPOConfig, tokenizer, device, rm_manifest: dict | None, reward_fn, console
) -> Roles:
    """Load the base once and put every role on it (or the RM on a second model when its base
    differs; `reward_fn`: the programmatic reward instead). Only the policy and value adapters (and
    the value head) are trainable."""
    init_from = config.policy.init_from
    if init_from:
        model, quant = modeling.load_trainable_adapter(
            config, tokenizer, device, Path(init_from), POLICY
        )
        modeling.add_frozen_adapter(model, Path(init_from), REFERENCE)
        reference = REFERENCE
    else:
        base, quant = modeling.load_base_model(config, tokenizer, device)
        model = modeling.add_lora(
            base, config.lora, quant, modeling.gradient_checkpointing(config.model, device), POLICY
        )
        reference = None
    dtype = modeling.compute_dtype(config.quant, device)
    reward: RewardScorer | ProgrammaticReward | None
    shared = False
    if reward_fn is not None:
        reward, kind = reward_fn, "function"
    elif config.reward.from_ is None:  # the environment's steps are the only reward
        reward, kind = None, "environment"
    else:
        reward, shared = RewardScorer.beside(
            model, config.reward.from_, rm_manifest, tokenizer, config, console, REWARD
        )
        kind = "shared base" if shared else "second model"

    value_init = config.value.init
    if value_init == "reward" and not shared:
        raise UserError(
            "value.init=reward needs a reward model on the policy's base (reward.from with the same "
            "base model); use value.init=new."
        )
    value_head = modeling.ScalarHead(modeling.hidden_size(model), "zero").to(device)
    value_start = "a new adapter + zero head"
    if value_init in ("auto", "reward") and shared:
        value_start = "the reward adapter + head"
        model.load_adapter(str(config.reward.from_), adapter_name=VALUE, is_trainable=True)
        value_head.load_state_dict(reward.head.state_dict())
        if config.reward.normalize:  # predict the normalised score from the start
            mean, std = reward.normalization()
            with torch.no_grad():
                value_head.linear.weight /= std
                value_head.linear.bias.sub_(mean).div_(std)
    else:
        model.add_adapter(VALUE, modeling.peft_lora_config(config.lora))
    model.set_adapter(POLICY)
    for name, param in model.named_parameters():
        param.requires_grad_(any(f".{role}." in name for role in TRAINABLE))
    value_head.requires_grad_(True)
    modeling.disable_dropout(model)
    return Roles(model, value_head, reference, reward, kind, value_start, device, dtype, quant)


# ---------------------------------------------------------------- forward passes
def policy_logprobs(
    roles: Roles, rollout: Rollout, temperature: float, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, R) log-probs of the response tokens under the active adapter (see rollout.py)."""
    return response_logprobs(
        roles.model, rollout, temperature, roles.device, roles.dtype, with_entropy
    )


def token_values(roles: Roles, rollout: Rollout) -> torch.Tensor:
    """(B, R) value estimates under the active adapter: V(t) from the state before response token t."""
    width = rollout.response.size(1)
    with modeling.autocast(roles.device, roles.dtype):
        values = modeling.token_scores(
            roles.model, roles.value_head, rollout.input_ids, rollout.attention_mask,
            rollout.position_ids,
        )  # fmt: skip
    return values[:, -width - 1 : -1].float()


# ---------------------------------------------------------------- rollout phase
@dataclass
class Batch:
    """One rollout batch with everything the update needs (all (B, R) unless noted)."""

    rollout: Rollout
    prompts: list
    responses: list[str]  # the last policy turn
    transcripts: list[str]  # every turn after the prompt (one turn: the response)
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor  # (B,) after normalisation and the missing-EOS penalty
    kl: torch.Tensor  # per-token KL estimate (0 on padding)
    advantages: torch.Tensor
    returns: torch.Tensor
    entropy: torch.Tensor


@torch.no_grad()
def collect(
    roles: Roles, prompts: list[data.PromptExample], config: PPOConfig, kl_coef: float, tokenizer,
    step: int = 0,
) -> tuple[Batch, dict[str, float]]:  # fmt: skip
    """Sample, score and evaluate one batch of episodes (this process's share of the step's
    episodes); compute rewards and advantages. Score whitening, advantage whitening and the
    statistics are over every process's episodes."""
    started = time.perf_counter()
    model, micro = roles.model, config.train.batch_size
    watch = Stopwatch()
    setup = episodes.setup_for(config)
    played = episodes.start(prompts, tokenizer, setup, f"step {step}/rank {distributed.rank()}")
    with modeling.frozen_role(model, POLICY):
        episodes.run(
            model, tokenizer, played, setup, config.rollout.temperature,
            stop_token_ids(model, tokenizer), watch,
        )  # fmt: skip
    rollout = episodes.to_rollout(played, tokenizer.pad_token_id, roles.device)
    responses = [e.response for e in played]  # the last turn
    raw = [e.prompt for e in played]
    rows = [e.row for e in played]
    cut_before = getattr(roles.reward, "truncated", 0)
    with watch("score"):
        scores = torch.tensor(
            _score(roles, config, raw, responses, rows, rollout.ended.tolist()), dtype=torch.float32
        )
    cut = getattr(roles.reward, "truncated", 0) - cut_before  # RM inputs cut to its max_length
    scores = losses.missing_eos_penalty(
        scores, rollout.ended.cpu(), config.reward.missing_eos_penalty
    )
    scores = scores.to(roles.device)
    if config.reward.whiten:
        scores = losses.masked_whiten(scores, torch.ones_like(scores), reduce=distributed.all_sum)

    parts: dict[str, list[torch.Tensor]] = {"logprobs": [], "entropy": [], "ref": [], "values": []}
    for start in range(0, len(prompts), micro):
        chunk = rollout.select(torch.arange(start, min(start + micro, len(prompts))))
        with watch("policy_forward"), modeling.frozen_role(model, POLICY):
            logprobs, entropy = policy_logprobs(roles, chunk, config.rollout.temperature, True)
        with watch("reference_forward"), modeling.frozen_role(model, roles.reference):
            ref_logprobs, _ = policy_logprobs(roles, chunk, config.rollout.temperature)
        with watch("value_forward"), modeling.frozen_role(model, VALUE):
            values = token_values(roles, chunk)
        for key, value in zip(parts, (logprobs, entropy, ref_logprobs, values), strict=True):
            parts[key].append(value)
    logprobs, entropy, ref_logprobs, values = (torch.cat(parts[k]) for k in parts)

    # only the policy's tokens are actions: an environment's messages between turns are context,
    # left out of the KL, the advantages and the losses
    mask = rollout.policy_mask.float()
    kl = losses.masked(losses.kl_penalty(logprobs, ref_logprobs, config.kl.estimator), mask)
    # GAE over each episode's policy tokens as one sequence (losses.pack: the identity for one
    # turn); the environment's reward of each turn on that turn's last token
    packed_mask = losses.pack(mask, mask)
    rewards = losses.shaped_rewards(scores, losses.pack(kl, mask), packed_mask, kl_coef)
    if setup.env is not None:
        rewards = rewards + episodes.turn_reward_tensor(played, rewards.size(1)).to(rewards)
    advantages, returns = losses.gae(
        rewards, losses.pack(values, mask), packed_mask, config.ppo.gamma, config.ppo.lam
    )
    advantages, returns = losses.unpack(advantages, mask), losses.unpack(returns, mask)
    if config.ppo.whiten_advantages:
        advantages = losses.masked_whiten(advantages, mask, reduce=distributed.all_sum)
    batch = Batch(
        rollout, raw, responses, [episodes.transcript(e) for e in played], logprobs, ref_logprobs, losses.masked(values, mask), scores, kl, advantages,
        returns, entropy,
    )  # fmt: skip
    # per-episode values of every process's episodes, in rank order
    lengths, ended, episode_scores, kl_sum = (
        distributed.gather(v.to(roles.device).float())
        for v in (rollout.lengths, rollout.ended, scores, kl.sum(dim=1))
    )
    seconds = time.perf_counter() - started
    stats = {
        "objective/kl": kl_sum.mean().item(),
        "objective/kl_coef": kl_coef,
        "objective/scores": episode_scores.mean().item(),
        "objective/rlhf_reward": (episode_scores - kl_coef * kl_sum).mean().item(),
        "objective/entropy": losses.masked_mean(entropy, mask, distributed.all_sum).item(),
        "value/explained_variance": losses.explained_variance(
            values, returns, mask, distributed.all_sum
        ),
        "rollout/response_length": lengths.mean().item(),
        "rollout/eos_rate": ended.mean().item(),
        "perf/rollout_s": seconds,
        "perf/tokens_per_s": lengths.sum().item() / max(watch.seconds["generate"], 1e-9),
        **watch.metrics(),
        "ppo/episodes": len(episode_scores),
    }
    if isinstance(roles.reward, RewardScorer):
        stats["rollout/rm_inputs_truncated"] = distributed.total(cut)
    if setup.env is not None:
        stats |= episodes.summary(
            distributed.gather(episodes.counts(played).to(roles.device)).cpu()
        )
    return batch, stats


def _score(
    roles: Roles, config: PPOConfig, prompts: list, responses: list[str], rows: list[dict],
    ended: list[bool],
) -> list[float]:  # fmt: skip
    """The reward of each response: the user's function, or the reward model (which scores a
    response cut at max_new_tokens as cut, without a closing EOS); 0 when only an environment
    rewards."""
    if roles.reward is None:
        return [0.0] * len(responses)
    if isinstance(roles.reward, ProgrammaticReward):
        return roles.reward.score(prompts, responses, rows)
    return roles.reward.score(prompts, responses, normalize=config.reward.normalize, ended=ended)


# ---------------------------------------------------------------- update phase
def update(
    roles: Roles, batch: Batch, optimizer, config: PPOConfig, policy_params, value_params,
    guard: NonFiniteGuard, step: int, watch: Stopwatch | None = None,
) -> list[dict[str, float]]:  # fmt: skip
    """`ppo.epochs` passes over the batch in `ppo.minibatches` shuffled minibatches, one optimizer
    step each (skipped by `guard` when a loss or gradient is not finite); returns each update's
    statistics. Losses are token means over the minibatch: the micro-batches of a minibatch, on
    every process, are weighted by their share of its tokens, and the gradients are summed over the
    processes before clipping (each process shuffles and splits its own episodes). A minibatch is
    train.grad_accum micro-batches of train.batch_size episodes."""
    model, ppo, watch = roles.model, config.ppo, watch or Stopwatch()
    size = len(batch.responses)
    per_minibatch = config.episodes_per_update
    per_micro = config.train.batch_size
    mask = batch.rollout.policy_mask.float()
    updates: list[dict[str, float]] = []
    for _ in range(ppo.epochs):
        order = torch.randperm(size)
        epoch_updates = []
        for first in range(0, size, per_minibatch):
            minibatch = order[first : first + per_minibatch]
            tokens = distributed.all_sum(mask[minibatch].sum()).clamp(min=1)
            sums = {"policy/loss": 0.0, "value/loss": 0.0, "policy/clipfrac": 0.0,
                    "policy/approxkl": 0.0, "policy/ratio": 0.0, "value/clipfrac": 0.0}  # fmt: skip
            for m in range(0, per_minibatch, per_micro):
                idx = minibatch[m : m + per_micro].to(roles.device)
                chunk, chunk_mask = batch.rollout.select(idx), mask[idx]
                weight = chunk_mask.sum() / tokens  # this micro-batch's share of the tokens
                with watch("policy_update"), modeling.adapter_role(model, POLICY):
                    logprobs, _ = policy_logprobs(roles, chunk, config.rollout.temperature)
                    pg_loss, pg_stats = losses.ppo_policy_loss(
                        logprobs, batch.logprobs[idx], batch.advantages[idx], chunk_mask,
                        ppo.clip_range,
                    )  # fmt: skip
                    (pg_loss * weight).backward()
                with watch("value_update"), modeling.adapter_role(model, VALUE):
                    values = token_values(roles, chunk)
                    vf_loss, vf_stats = losses.ppo_value_loss(
                        values, batch.values[idx], batch.returns[idx], chunk_mask,
                        ppo.vf_clip_range,
                    )  # fmt: skip
                    (vf_loss * weight).backward()
                w = weight.item()
                sums["policy/loss"] += pg_loss.item() * w
                sums["value/loss"] += vf_loss.item() * w
                for key in ("clipfrac", "approxkl", "ratio"):
                    sums[f"policy/{key}"] += pg_stats[key].item() * w
                sums["value/clipfrac"] += vf_stats["clipfrac"].item() * w
            with watch("optimizer"):
                totals = distributed.all_sum(torch.tensor(list(sums.values()), dtype=torch.float64))
                sums = dict(zip(sums, totals.tolist(), strict=True))
                distributed.sum_gradients(policy_params + value_params)
                policy_norm = config.optim.max_grad_norm or float("inf")
                value_norm = config.value.max_grad_norm
                value_norm = (config.optim.max_grad_norm if value_norm is None else value_norm) or float("inf")  # fmt: skip
                sums["policy/grad_norm"] = torch.nn.utils.clip_grad_norm_(
                    policy_params, policy_norm
                ).item()
                sums["value/grad_norm"] = torch.nn.utils.clip_grad_norm_(
                    value_params, value_norm
                ).item()
                loss = sums["policy/loss"] + sums["value/loss"]
                applied = guard.finite(
                    step, loss, sums["policy/grad_norm"] + sums["value/grad_norm"]
                )
                if applied:
                    files.kill_point("update")
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            sums["applied"] = float(applied)
            epoch_updates.append(sums)
        updates += epoch_updates
        approxkl = sum(u["policy/approxkl"] for u in epoch_updates) / len(epoch_updates)
        if ppo.target_kl is not None and approxkl > ppo.target_kl:
            break  # the policy moved far enough from the one that sampled this batch
    return updates


# ---------------------------------------------------------------- held-out scores and samples
@torch.no_grad()
def evaluate(roles: Roles, prompts: list[data.PromptExample], config: PPOConfig, tokenizer) -> dict:
    """Greedy responses to the held-out prompts: mean score, length and EOS rate. With several
    processes each answers its share of the batches (`distributed.map_batches`, as in eval), so
    the numbers are those of one process."""

    setup = episodes.setup_for(config)
    stops = stop_token_ids(roles.model, tokenizer)

    def one_batch(index: int, chunk: list) -> list[tuple]:
        played = episodes.start(chunk, tokenizer, setup, f"eval {index}")
        with modeling.frozen_role(roles.model, POLICY):
            episodes.run(roles.model, tokenizer, played, setup, 0.0, stops)
        scores = _score(
            roles, config, [e.prompt for e in played], [e.response for e in played],
            [e.row for e in played], [e.ended for e in played],
        )  # fmt: skip
        table = episodes.counts(played)
        return [
            (scores[i] + e.env_reward, sum(e.policy), e.ended, *table[i].tolist())
            for i, e in enumerate(played)
        ]

    answers = distributed.map_batches(prompts, config.episodes_per_step, one_batch)
    n = max(len(answers), 1)
    out = {
        "eval/scores": sum(a[0] for a in answers) / n,
        "eval/response_length": sum(a[1] for a in answers) / n,
        "eval/eos_rate": sum(a[2] for a in answers) / n,
    }
    if setup.env is not None:
        table = torch.tensor([a[3:] for a in answers], dtype=torch.float64)
        out |= episodes.summary(table.reshape(len(answers), len(episodes.COUNTS)), "eval")
    return out


def sample_table(tracker: Tracker, batch: Batch, step: int, rows: int) -> None:
    """A few of this step's episodes: prompt, response (every turn after the prompt in an
    environment), score, KL."""
    kl = batch.kl.sum(dim=1).tolist()
    table = [
        [data.prompt_text(batch.prompts[i]), batch.transcripts[i], f"{batch.scores[i].item():.3f}",
         f"{kl[i]:.3f}"]
        for i in range(min(rows, len(batch.responses)))
    ]  # fmt: skip
    tracker.table(f"step {step}: sampled responses", ["prompt", "response", "score", "kl"], table)


# ---------------------------------------------------------------- the stage
def train(config: PPOConfig, signals: StopOnSignal | None = None) -> dict[str, float]:
    console = make_console()
    # ------------------------------------------------------------ setup
    # a function that cannot be imported stops the run before any model loads
    reward_fn = ProgrammaticReward(config.reward.fn) if config.reward.fn else None
    setup = episodes.setup_for(config)  # so does an environment that cannot be imported
    rm_manifest = None
    if config.reward.from_:
        rm_manifest = checkpoint.check_parent(
            config.reward.from_, "ppo", ("reward",), "reward.from"
        )
    resume_from, parent, device, tokenizer = begin(
        config, "ppo", console, POLICY_STAGES, config.policy.init_from, "policy.init_from",
        (rm_manifest, config.reward.from_, "reward.from") if rm_manifest else None,
    )  # fmt: skip
    prompts, eval_prompts, prompt_stats, eval_stats = episodes.load_prompts(
        config, tokenizer, console, "ppo", setup
    )
    if reward_fn is not None:  # the dataset columns the function asks for
        reward_fn.check_columns(prompts[0].row if prompts else {}, config.data.path)
    world = distributed.world()
    per_step = config.episodes_per_step * world  # per PPO step, over all processes
    if len(prompts) < per_step:
        per_process = f" x {world} processes" if world > 1 else ""
        raise UserError(
            f"{config.data.path} has {len(prompts)} usable training prompts, fewer than the "
            f"{per_step} episodes of one PPO step (train.batch_size={config.train.batch_size} x "
            f"train.grad_accum={config.train.grad_accum} x ppo.minibatches="
            f"{config.ppo.minibatches}{per_process}); lower one of them or give more prompts."
        )

    roles = build_roles(config, tokenizer, device, rm_manifest, reward_fn, console)
    model = roles.model
    policy_params = [p for n, p in model.named_parameters() if f".{POLICY}." in n]
    value_params = [p for n, p in model.named_parameters() if f".{VALUE}." in n]
    value_params += list(roles.value_head.parameters())
    trainable, total = modeling.parameter_counts(model)
    describe = {
        "function": f"the function {config.reward.fn}",
        "shared base": f"{config.reward.from_} as a frozen adapter + head on the same base",
        "second model": f"{config.reward.from_} on a second model (another base)",
        "environment": f"the environment {config.env.name}",
    }
    console.print(
        f"model: {config.model.name_or_path} on {device} (quant={roles.quant}), one base; policy: "
        f"{'the adapter of ' + config.policy.init_from if config.policy.init_from else 'a new adapter'}; "
        f"reference: {'that adapter, frozen' if roles.reference else 'the base with adapters disabled'}; "
        f"reward: {describe[roles.reward_kind]}{' and the environment' if setup.env and roles.reward else ''}; "
        f"{episodes.describe(setup)}; value: {roles.value_start}; "
        f"{trainable + sum(p.numel() for p in roles.value_head.parameters()):,} trainable of {total:,} parameters"
    )
    optimizer = build_optimizer(policy_params, config.optim, value_params, config.value.lr)
    # one PPO step = one rollout of `per_step` prompts
    total_steps = config.train.max_steps or max(
        1, math.ceil(config.train.epochs * (len(prompts) // per_step))
    )
    scheduler = lr_schedule(optimizer, config.optim, total_steps)
    processes = f" x {world} processes" if world > 1 else ""
    console.print(
        f"training: {total_steps} PPO steps x {per_step} episodes ({config.train.batch_size} per "
        f"micro-batch x {config.train.grad_accum} accumulation x {config.ppo.minibatches} "
        f"minibatches{processes}); {config.ppo.epochs} epochs x {config.ppo.minibatches} updates "
        f"per step; kl.coef={config.kl.coef} ({'adaptive' if config.kl.adaptive else 'fixed'}), "
        f"{len(prompts)} prompts per epoch"
    )
    heads = {VALUE_HEAD: roles.value_head}
    start_step, progress = resume_position(
        resume_from, model, optimizer, scheduler, config, console, heads, ADAPTER_DIRS
    )
    kl_ctl = KLController(config.kl, progress.get("kl_coef"))
    guard = nonfinite_guard(config, progress)
    stream = data.BatchStream(  # every process walks it and samples its own share of each batch
        prompts, per_step, config.seed, **progress["stream"], drop_last=True
    )
    tracker = Tracker(
        config.output_dir, "ppo", config.logger, to_container(config), run_name("ppo", config),
        total_steps, start_step, console,
    )  # fmt: skip

    # ------------------------------------------------------------ train
    model.train()
    monitor = health.Monitor()  # the signs of a run going wrong (rlhf_cli/health.py)
    metrics: dict[str, float] = {}
    try:
        for step in range(start_step + 1, total_steps + 1):
            batch, metrics = collect(
                roles, distributed.shard(stream.next()), config, kl_ctl.coef, tokenizer, step
            )
            started, watch = time.perf_counter(), Stopwatch()
            updates = update(
                roles, batch, optimizer, config, policy_params, value_params, guard, step, watch
            )
            lr = optimizer.param_groups[0]["lr"]
            applied = [u.pop("applied") for u in updates]
            if any(applied):  # a step whose updates were all skipped leaves the schedule where
                scheduler.step()  # it was, as a skipped update does in the other stages
            metrics |= {k: sum(u[k] for u in updates) / len(updates) for k in updates[0]}
            metrics |= {
                "ppo/updates": len(updates),
                "skipped_updates": guard.skipped,
                "lr": lr,
                "epoch": stream.progress(),
                "perf/update_s": time.perf_counter() - started,
                **watch.metrics(),
            }
            kl_ctl.update(metrics["objective/kl"], per_step)
            if eval_prompts and due(step, config.train.eval_every, total_steps):
                metrics |= evaluate(roles, eval_prompts, config, tokenizer)
            metrics |= monitor.check(step, metrics, console)
            tracker.log(step, metrics, show=step % config.train.log_every == 0)
            if config.samples.every and step % config.samples.every == 0:
                sample_table(tracker, batch, step, config.samples.num_prompts)
            end_of_step(
                config, step, total_steps, model, optimizer, scheduler, stream, heads, ADAPTER_DIRS,
                guard, signals, kl_coef=kl_ctl.coef,
            )  # fmt: skip
        # ------------------------------------------------------------ save
        final_metrics = {
            k: metrics[k] for k in ("objective/scores", "objective/kl", "objective/rlhf_reward")
        } | {"steps": total_steps, "kl_coef": kl_ctl.coef}
        if eval_prompts:
            final_metrics |= evaluate(roles, eval_prompts, config, tokenizer)
            tracker.log(
                total_steps, {k: v for k, v in final_metrics.items() if k.startswith("eval/")}
            )
        manifest = stage_manifest(
            "ppo", config, model, tokenizer, parent, "policy", final_metrics,
            (prompt_stats, eval_stats), init_from=config.policy.init_from,
            adapters={"default": {"role": "policy", "path": "."},
                      VALUE: {"role": "value", "path": "value"}},
            heads={VALUE_HEAD: {"file": checkpoint.head_file(VALUE_HEAD), "adapter": VALUE,
                                "hidden_size": modeling.hidden_size(model)}},
            reward={"kind": roles.reward_kind, "from": config.reward.from_, "fn": config.reward.fn},
        )  # fmt: skip
        final = checkpoint.save_final(
            config.output_dir, model, tokenizer, manifest, heads=heads, adapters=ADAPTER_DIRS
        )
        held_out = (
            f", held-out greedy score {final_metrics['eval/scores']:.3f}" if eval_prompts else ""
        )
        console.print(
            f"[bold green]done[/]: mean score {final_metrics['objective/scores']:.3f}, KL "
            f"{final_metrics['objective/kl']:.3f}{held_out}; policy in {final}"
        )
        return final_metrics
    finally:
        tracker.finish()
