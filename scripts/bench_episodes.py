"""The rollout layer's speed: multi-turn episodes against one-turn ones, and batched across
episodes against one episode at a time, side by side in one process.

    python scripts/bench_episodes.py                           # 32 episodes x 3 rounds
    python scripts/bench_episodes.py --episodes 64 --turns 3 --append docs/benchmarks.md

The embedded SmolLM2-135M-Instruct with a fresh LoRA adapter (as a GRPO step samples), the shipped
demo prompts, temperature 1, `--new-tokens` per turn. Three settings, alternating round by round
so machine noise hits each alike:

- one-turn: each prompt, one response (what `rlhf grpo` without `env=` samples);
- multi-turn: an environment that answers every reply with a short user message until
  `--turns` turns (tests/toy_envs.py's Echo shape, defined here), every running episode sampled
  together each turn (rollout.batch_size = all);
- multi-turn, one at a time: the same episodes with rollout.batch_size=1 (what a loop without
  batching across episodes does).

Reported: episodes/s and policy tokens/s (medians over rounds), and where the time goes
(generate() vs the environment). Nothing is trained.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rlhf_cli import envs, episodes  # noqa: E402


class Again(envs.Environment):
    """Answers every reply "Go on." (reward 0), never done: the turn limit ends the episode."""

    def reset(self, row):
        return row["prompt"] if isinstance(row["prompt"], list) else str(row["prompt"])

    def step(self, message):
        return "Go on.", 0.0, False


def load(args):
    from rlhf_cli import data, modeling
    from rlhf_cli.compose import stage_config

    config = stage_config("grpo", ["reward.fns=[rlhf_cli.judges:demo_gold]", "device=cpu"])
    tokenizer = modeling.load_tokenizer(config.model)
    base, quant = modeling.load_base_model(config, tokenizer, modeling.resolve_device("cpu"))
    model = modeling.add_lora(base, config.lora, quant, False, "policy")
    model.eval()
    rows, _ = data.load_splits(config.data, config.seed)
    prompts, _ = data.tokenize_prompts(rows[: args.episodes], tokenizer, config.data, "demo")
    return model, tokenizer, prompts


def one_run(model, tokenizer, prompts, setting: str, args, seed: int) -> dict:
    import torch

    from rlhf_cli.data import PromptExample
    from rlhf_cli.rollout import stop_token_ids
    from rlhf_cli.tracking import Stopwatch

    if setting == "one-turn":
        setup = episodes.Setup(max_new_tokens=args.new_tokens, batch_size=None, seed=seed)
        items = prompts
    else:
        setup = episodes.Setup(
            Again, "Again", max_turns=args.turns, max_new_tokens=args.new_tokens,
            max_tokens=None, batch_size=None if setting == "multi-turn" else 1, seed=seed,
        )  # fmt: skip
        items = [PromptExample(None, [], p.index, {"prompt": p.prompt}) for p in prompts]
    torch.manual_seed(seed)
    watch = Stopwatch()
    started = time.perf_counter()
    played = episodes.start(items, tokenizer, setup, "bench")
    episodes.run(model, tokenizer, played, setup, 1.0, stop_token_ids(model, tokenizer), watch)
    seconds = time.perf_counter() - started
    tokens = sum(sum(e.policy) for e in played)
    return {
        "episodes_per_s": len(played) / seconds,
        "tokens_per_s": tokens / seconds,
        "turns": sum(e.turns for e in played) / len(played),
        "generate_share": watch.seconds.get("generate", 0.0) / seconds,
        "environment_share": watch.seconds.get("environment", 0.0) / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=32)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--append", type=Path, help="append the table to this Markdown file")
    args = parser.parse_args()
    model, tokenizer, prompts = load(args)
    settings = ("one-turn", "multi-turn", "multi-turn, one at a time")
    results = {s: [] for s in settings}
    for round_ in range(args.rounds):
        for setting in settings:
            results[setting].append(one_run(model, tokenizer, prompts, setting, args, round_))
            print(f"round {round_ + 1} {setting}: {results[setting][-1]}", flush=True)
    median = {s: {k: statistics.median(r[k] for r in results[s]) for k in results[s][0]} for s in settings}  # fmt: skip
    lines = [
        f"## Rollout layer: multi-turn vs one-turn ({time.strftime('%Y-%m-%d')})",
        "",
        f"`python scripts/bench_episodes.py --episodes {args.episodes} --turns {args.turns} "
        f"--new-tokens {args.new_tokens} --rounds {args.rounds}`: the embedded SmolLM2-135M "
        "with a LoRA adapter, float32 on this machine's CPU; medians over the rounds.",
        "",
        "| setting | episodes/s | policy tokens/s | turns | generate share | environment share |",
        "|---|---|---|---|---|---|",
    ]
    for s in settings:
        m = median[s]
        lines.append(
            f"| {s} | {m['episodes_per_s']:.2f} | {m['tokens_per_s']:.1f} | {m['turns']:.2f} | "
            f"{m['generate_share']:.0%} | {m['environment_share']:.1%} |"
        )
    ratio = (
        median["multi-turn"]["tokens_per_s"] / median["multi-turn, one at a time"]["tokens_per_s"]
    )
    lines += [
        "",
        f"Batching across episodes: {ratio:.2f}x the policy tokens/s of one episode at a time.",
        "",
    ]
    print("\n".join(lines))
    if args.append:
        with args.append.open("a", encoding="utf-8") as handle:
            handle.write("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
