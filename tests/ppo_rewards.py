"""Programmatic rewards for the PPO tests (imported by `rlhf ppo reward.fn=ppo_rewards:<name>` with
tests/ on PYTHONPATH)."""

COLOURS = {"blue", "green", "red", "yellow"}


def colour_share(prompts, responses):
    """The share of a response's words that are colour words (the target tokens)."""
    scores = []
    for response in responses:
        words = response.replace(":", " ").split()
        scores.append(sum(word in COLOURS for word in words) / max(1, len(words)))
    return scores


def one_too_few(prompts, responses):
    return [0.0] * (len(responses) - 1)


def not_finite(prompts, responses):
    return [float("nan")] * len(responses)


def text_not_numbers(prompts, responses):
    return ["good"] * len(responses)
