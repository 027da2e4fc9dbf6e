"""Programmatic rewards for the PPO and GRPO tests (imported by `rlhf ppo reward.fn=ppo_rewards:<name>`
or `rlhf grpo reward.fns=[ppo_rewards:<name>]` with tests/ on PYTHONPATH)."""

COLOURS = {"blue", "green", "red", "yellow"}


def colour_share(prompts, responses):
    """The share of a response's words that are colour words (the target tokens)."""
    scores = []
    for response in responses:
        words = response.replace(":", " ").split()
        scores.append(sum(word in COLOURS for word in words) / max(1, len(words)))
    return scores


def constant(prompts, responses):
    """The same reward for every response: no group has a learning signal."""
    return [0.5] * len(responses)


def one_too_few(prompts, responses):
    return [0.0] * (len(responses) - 1)


def not_finite(prompts, responses):
    return [float("nan")] * len(responses)


def text_not_numbers(prompts, responses):
    return ["good"] * len(responses)


def recorded_colour_share(prompts, responses):
    """colour_share, and each call's scores appended as one line to
    $RLHF_TEST_SCORES/rank-<RANK>.jsonl (what every process of a torchrun scored, in order)."""
    import json
    import os
    from pathlib import Path

    scores = colour_share(prompts, responses)
    path = Path(os.environ["RLHF_TEST_SCORES"]) / f"rank-{os.environ.get('RANK', '0')}.jsonl"
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(scores) + "\n")
    return scores
