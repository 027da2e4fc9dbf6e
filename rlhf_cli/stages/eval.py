"""`rlhf eval`: how good is a policy checkpoint on held-out prompts, and at what cost.

    rlhf eval policy=runs/sft/final output_dir=runs/eval/sft
    rlhf eval policy=runs/ppo/final reward.from=runs/reward/final compare=runs/eval/sft

One base model in memory carries the policy's adapter, the KL reference's adapter and (when it was
trained on the same base) the reward model's adapter. For the held-out prompts of `data`:
greedy responses -> gold-judge scores (mean and 95% bootstrap interval), reward-model scores,
length, EOS rate; one sampled response per prompt -> KL(policy || reference) in nats per response;
the held-out split of `perplexity_data` -> perplexity; another eval's responses (`compare`) -> win
rates. With `env=` the held-out rows play episodes in that environment (docs/environments.md):
the success rate (episodes whose environment reward is positive) and the environment's reward,
each with its 95% interval, turns, tool calls and tool errors; the judge and the reward model
score the last reply. Everything lands in `eval.json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from rlhf_cli import checkpoint, data, distributed, episodes, files, losses, modeling
from rlhf_cli.compose import stage_config
from rlhf_cli.lineage import POLICY_STAGES
from rlhf_cli.loop import StopOnSignal, begin
from rlhf_cli.modeling import mean_token_loss
from rlhf_cli.policies import POLICY, REFERENCE, generate, load_model, play
from rlhf_cli.rollout import response_logprobs
from rlhf_cli.schema import EvalConfig, UserError, to_container
from rlhf_cli.scoring import ProgrammaticReward, RewardScorer
from rlhf_cli.tracking import Tracker, make_console, run_name

REWARD = "reward"  # the reward model's adapter on the shared base


# ---------------------------------------------------------------- statistics (pure functions)
def bootstrap_interval(
    values: list[float], resamples: int, seed: int, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean."""
    if not values:
        return math.nan, math.nan
    x = torch.tensor(values, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(x), (resamples, len(x)), generator=generator)
    means = x[picks].mean(dim=1)
    tail = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return low.item(), high.item()


def mean_and_interval(mean_key: str, ci: str, values: list[float], config: EvalConfig) -> dict:
    """{mean_key: the mean, ci_low / ci_high: its 95% bootstrap interval} (`config.bootstrap`
    resamples, seeded)."""
    low, high = bootstrap_interval(values, config.bootstrap, config.seed)
    return {mean_key: sum(values) / len(values), f"{ci}_low": low, f"{ci}_high": high}


def win_rate(ours: list[float], theirs: list[float]) -> float:
    """Share of prompts where our score beats theirs; ties count one half."""
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(ours, theirs, strict=True))
    return wins / max(len(ours), 1)


def prompt_key(prompt) -> str:
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


# ---------------------------------------------------------------- the model and its roles
def reference_folder(config: EvalConfig, parent: dict | None) -> str | None:
    """The adapter folder of the KL reference; None for the bare base. Raises for `none`."""
    choice = str(config.reference)
    if choice == "base":
        return None
    if choice != "auto":
        checkpoint.check_parent(choice, "eval", POLICY_STAGES, "reference")
        return choice
    started_from = (parent or {}).get("parent") or {}
    folder = started_from.get("path")
    if folder and not Path(folder).is_dir():
        raise UserError(
            f"reference=auto: the policy started from {folder}, which no longer exists; give "
            "reference=<that adapter's final/ folder>, reference=base or reference=none."
        )
    return folder


# ---------------------------------------------------------------- the stage
def train(config: EvalConfig, signals: StopOnSignal | None = None) -> dict[str, float]:
    console = make_console()
    # ------------------------------------------------------------ checks before any model loads
    judge = ProgrammaticReward(config.judge, "judge") if config.judge else None
    setup = episodes.setup_for(config, config.generation)  # an env= that does not import stops here
    rm_manifest = None
    if config.reward.from_:
        rm_manifest = checkpoint.check_parent(
            config.reward.from_, "eval", ("reward",), "reward.from"
        )
    theirs = load_compare(config.compare) if config.compare else None
    _, parent, device, tokenizer = begin(
        config, "eval", console, POLICY_STAGES, config.policy, "policy",
        (rm_manifest, config.reward.from_, "reward.from") if rm_manifest else None,
    )  # fmt: skip
    measure_kl = str(config.reference) != "none" and config.policy is not None
    reference = reference_folder(config, parent) if measure_kl else None
    _, eval_rows = data.load_splits(config.data, config.seed)
    if not eval_rows:
        raise UserError(
            f"{config.data.path} has no held-out prompts to evaluate on; give data.eval_path=FILE, "
            "data.eval_split=SPLIT or data.eval_size=N."
        )
    read = data.environment_rows if setup.env else data.tokenize_prompts
    prompts, prompt_stats = read(
        eval_rows, tokenizer, config.data, f"{config.data.path} (held out)"
    )
    what = f"rows for {config.env.name}" if setup.env else "prompts"
    console.print(f"{what}: held out {prompt_stats.summary()}{data.demo_note(config.data.path)}")
    if judge:
        judge.check_columns(prompts[0].row or {}, f"{config.data.path} (held out)")
    ppl_examples = held_out_sft_examples(config, tokenizer) if config.perplexity_data else []

    model, quant = load_model(config, tokenizer, device, reference)
    dtype = modeling.compute_dtype(config.quant, device)
    policy_role = POLICY if config.policy else None
    reference_role = REFERENCE if reference else None
    scorer = None
    if config.reward.from_:
        scorer, _ = RewardScorer.beside(
            model, config.reward.from_, rm_manifest, tokenizer, config, console, REWARD
        )
    console.print(
        f"model: {config.model.name_or_path} on {device} (quant={quant}); policy: "
        f"{config.policy or 'the raw base'}; KL reference: "
        f"{(reference or 'the base') if measure_kl else 'none'}; judge: {config.judge}; "
        f"reward model: {config.reward.from_}; {len(prompts)} held-out prompts"
    )
    tracker = Tracker(
        config.output_dir, "eval", config.logger, to_container(config), run_name("eval", config),
        1, 0, console,
    )  # fmt: skip
    try:
        # ------------------------------------------------------------ greedy responses and scores
        played = play(model, policy_role, prompts, tokenizer, config)
        texts = [e.prompt for e in played]  # an environment's: the messages its reset gave
        rows = [p.row or {} for p in prompts]
        responses = [e.response for e in played]  # the last turn
        lengths, ended = [sum(e.policy) for e in played], [e.ended for e in played]
        metrics: dict[str, float] = {
            "response_length": sum(lengths) / len(lengths),
            "eos_rate": sum(ended) / len(ended),
        }
        if setup.env:
            metrics |= environment_metrics(played, config)
        gold = judge_all(judge, texts, responses, rows, config) if judge else None
        if gold is not None:
            metrics |= mean_and_interval("gold/mean", "gold/ci", gold, config)
        rm = score_all(scorer, texts, responses, ended, config) if scorer else None
        if rm is not None:
            metrics |= mean_and_interval("rm/mean", "rm/ci", rm, config)
            if scorer.truncated:  # cut as the reward stage cut its training pairs
                console.print(
                    f"reward model: {scorer.truncated} of {len(rm)} prompt + response sequences "
                    f"exceeded its data.max_length={scorer.config.data.max_length}; their "
                    "prompts' starts were cut (its training pairs were cut the same way)"
                )
        # ------------------------------------------------------------ KL, perplexity, win rates
        if measure_kl:  # in an environment: on the first turn's prompts
            first_turns = [data.PromptExample(e.prompt, e.prompt_ids, i, e.row) for i, e in enumerate(played)]  # fmt: skip
            kl_on = first_turns[: config.kl_prompts]
            metrics["kl"] = kl_to_reference(
                model, policy_role, reference_role, kl_on, tokenizer, config, device, dtype
            )
            metrics["kl_prompts"] = len(kl_on)
        if ppl_examples:
            with modeling.frozen_role(model, policy_role):
                loss = mean_token_loss(
                    model, ppl_examples, config.generation.batch_size, tokenizer.pad_token_id,
                    device, dtype,
                )  # fmt: skip
            metrics["perplexity"] = math.exp(loss)
        if theirs is not None:
            metrics |= win_rates(
                theirs, texts, responses, rows, gold, rm, judge, scorer, config, console
            )
        tracker.log(0, metrics)
        shown = [episodes.transcript(e) for e in played]  # one turn: the response
        table_rows = [
            [data.prompt_text(texts[i]), shown[i]]
            + ([f"{gold[i]:.2f}"] if gold is not None else [])
            + ([f"{rm[i]:.3f}"] if rm is not None else [])
            for i in range(min(config.samples, len(prompts)))
        ]
        columns = ["prompt", "response"] + ["gold"] * (gold is not None) + ["rm"] * (rm is not None)
        if table_rows:
            tracker.table("held-out prompts", columns, table_rows)
        result = {
            "stage": "eval",
            "policy": config.policy,
            "base_model": config.model.name_or_path,
            "reference": (reference or "base") if measure_kl else None,
            "reward_from": config.reward.from_,
            "judge": config.judge,
            "compare": config.compare,
            "metrics": metrics,
            "data": {"prompts": vars(prompt_stats), "perplexity_examples": len(ppl_examples)},
            "responses": [
                {
                    "prompt": texts[i],
                    "response": responses[i],
                    "length": lengths[i],
                    "ended": ended[i],
                    "gold": gold[i] if gold is not None else None,
                    "rm": rm[i] if rm is not None else None,
                }
                | (episode_record(played[i]) if setup.env else {})
                for i in range(len(prompts))
            ],  # fmt: skip
            "config": to_container(config),
            "versions": checkpoint.package_versions(),
        }
        out = Path(config.output_dir) / checkpoint.EVAL_FILE
        if distributed.is_main():
            files.write_json_atomic(out, result)
        console.print(f"[bold green]done[/]: {summary(metrics)}; all numbers in {out}")
        return metrics
    finally:
        tracker.finish()


# ---------------------------------------------------------------- the steps
# Every step below runs over batches of `generation.batch_size` prompts; with several processes
# each process takes its share of the batches (`distributed.map_batches`) and all of them get every
# result (the responses too: policies.respond). A batch holds the same prompts however many
# processes there are, so the numbers do too.


def score_all(scorer: RewardScorer, prompts, responses, ended, config: EvalConfig) -> list[float]:
    """The reward model's score of every response (one cut at max_new_tokens scored as cut:
    `ended`), a batch of `generation.batch_size` per process in turn."""
    size = config.generation.batch_size
    return distributed.map_batches(
        list(zip(prompts, responses, ended, strict=True)), size,
        lambda _, batch: scorer.score([p for p, _, _ in batch], [r for _, r, _ in batch], size,
                                      normalize=config.reward.normalize,
                                      ended=[e for _, _, e in batch]),
    )  # fmt: skip


def judge_all(judge, prompts, responses, rows, config: EvalConfig) -> list[float]:
    """The judge's score of every response, a batch of `generation.batch_size` per call, each
    process judging its share (a judge that calls a paid model is not asked N times over)."""
    return distributed.map_batches(
        list(zip(prompts, responses, rows, strict=True)), config.generation.batch_size,
        lambda _, batch: judge.score(*(list(column) for column in zip(*batch, strict=True))),
    )  # fmt: skip


def kl_to_reference(model, policy_role, reference_role, prompts, tokenizer, config, device, dtype):
    """KL(policy || reference) per response in nats: one response per prompt sampled from the policy
    at temperature 1, summed log-ratios (the unbiased k1 estimate), averaged over prompts. Each
    batch's samples are seeded (seed + batch index), so they do not depend on what loading consumed
    from the RNG, nor on which process draws them."""

    @torch.no_grad()
    def one_batch(index: int, batch: list) -> list[float]:
        torch.manual_seed(config.seed + index)
        rollout = generate(model, policy_role, batch, tokenizer, config, 1.0)
        with modeling.frozen_role(model, policy_role):
            logprobs, _ = response_logprobs(model, rollout, 1.0, device, dtype)
        with modeling.frozen_role(model, reference_role):
            ref_logprobs, _ = response_logprobs(model, rollout, 1.0, device, dtype)
        mask = rollout.response_mask.float()
        return [losses.masked(logprobs - ref_logprobs, mask).sum().item()]

    totals = distributed.map_batches(prompts, config.generation.batch_size, one_batch)
    return sum(totals) / len(prompts)


def environment_metrics(played: list[episodes.Episode], config: EvalConfig) -> dict[str, float]:
    """The success rate (environment reward > 0) and the environment's reward with their 95%
    intervals; turns, tool calls, tool errors and why episodes ended."""
    rewards = [e.env_reward for e in played]
    success = [float(r > 0) for r in rewards]
    table = episodes.summary(episodes.counts(played), "env")
    return (
        mean_and_interval("env/success", "env/success_ci", success, config)
        | mean_and_interval("env/reward", "env/reward_ci", rewards, config)
        | {k: v for k, v in table.items() if k != "env/env_reward"}
    )


def episode_record(episode: episodes.Episode) -> dict:
    """What eval.json keeps of an episode beside its last reply."""
    return {
        "transcript": episode.messages[episode.prompt_messages :],
        "turns": episode.turns,
        "finish": episode.finish,
        "env_reward": episode.env_reward,
        "turn_rewards": episode.turn_rewards,
        "tool_calls": episode.tool_calls,
        "tool_errors": episode.tool_errors,
    }


def held_out_sft_examples(config: EvalConfig, tokenizer) -> list[data.Example]:
    # read as `rlhf sft data=<perplexity_data>` reads it (its defaults: columns, max_length, ...)
    source = dataclasses.replace(stage_config("sft").data, path=config.perplexity_data)
    _, rows = data.load_splits(source, config.seed)
    if not rows:
        raise UserError(
            f"perplexity_data={config.perplexity_data} has no held-out split; give a dataset with "
            "one, or perplexity_data=null."
        )
    examples, _ = data.tokenize_sft(rows, tokenizer, source, f"{config.perplexity_data} (held out)")
    return examples


def load_compare(path: str) -> dict:
    """Another eval's responses, by prompt."""
    file = Path(path)
    file = file / checkpoint.EVAL_FILE if file.is_dir() else file
    if not file.is_file():
        raise UserError(
            f"compare={path} holds no {checkpoint.EVAL_FILE}; point it at the output_dir of a "
            "finished rlhf eval."
        )
    try:
        result = checkpoint.read_json(file)
        return {prompt_key(r["prompt"]): r for r in result["responses"]} | {
            "__name__": result.get("policy") or "the raw base"
        }
    except (ValueError, KeyError, TypeError):
        raise UserError(
            f"compare={path}: {file} is not an rlhf eval result; point it at a finished eval."
        ) from None


def win_rates(theirs, texts, responses, rows, gold, rm, judge, scorer, config, console) -> dict:
    """Win rates of our responses against the compared eval's, on the prompts both answered."""
    shared = [i for i, t in enumerate(texts) if prompt_key(t) in theirs]
    if not shared:
        raise UserError(
            f"compare={config.compare} answered none of these held-out prompts; compare evals of "
            "the same data."
        )
    other = [theirs[prompt_key(texts[i])]["response"] for i in shared]
    other_ended = [theirs[prompt_key(texts[i])].get("ended", True) for i in shared]
    prompts = [texts[i] for i in shared]
    result = {"compare/prompts": len(shared)}
    if judge:
        their_gold = judge_all(judge, prompts, other, [rows[i] for i in shared], config)
        ours = [gold[i] for i in shared]
        result["win_rate/gold"] = win_rate(ours, their_gold)
        # paired: the same prompts answered twice, so the difference has its own, tighter interval
        diffs = [a - b for a, b in zip(ours, their_gold, strict=True)]
        result |= mean_and_interval("compare/gold_diff", "compare/gold_diff_ci", diffs, config)
    if scorer:
        their_rm = score_all(scorer, prompts, other, other_ended, config)
        result["win_rate/rm"] = win_rate([rm[i] for i in shared], their_rm)
    console.print(f"compared with {theirs['__name__']} on {len(shared)} prompts")
    return result


def summary(metrics: dict) -> str:
    parts = []
    if "env/success" in metrics:
        parts.append(
            f"success {metrics['env/success']:.3f} [{metrics['env/success_ci_low']:.3f}, "
            f"{metrics['env/success_ci_high']:.3f}], {metrics['env/turns']:.2f} turns, "
            f"{metrics['env/tool_calls']:.2f} tool calls ({metrics['env/tool_error_fraction']:.0%} failed)"
        )
    if "gold/mean" in metrics:
        parts.append(
            f"gold {metrics['gold/mean']:.3f} [{metrics['gold/ci_low']:.3f}, {metrics['gold/ci_high']:.3f}]"
        )
    if "rm/mean" in metrics:
        parts.append(f"RM {metrics['rm/mean']:.3f}")
    if "kl" in metrics:
        parts.append(f"KL {metrics['kl']:.3f}")
    parts.append(f"length {metrics['response_length']:.1f}, EOS rate {metrics['eos_rate']:.2f}")
    if "perplexity" in metrics:
        parts.append(f"perplexity {metrics['perplexity']:.3f}")
    if "compare/gold_diff" in metrics:
        parts.append(
            f"gold difference {metrics['compare/gold_diff']:+.3f} [{metrics['compare/gold_diff_ci_low']:+.3f}, "
            f"{metrics['compare/gold_diff_ci_high']:+.3f}]"
        )
    for key in ("win_rate/gold", "win_rate/rm"):
        if key in metrics:
            parts.append(f"{key} {metrics[key]:.3f}")
    return "; ".join(parts)
