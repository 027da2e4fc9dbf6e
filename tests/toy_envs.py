"""Environments for the tests (imported as `env=toy_envs:<Name>` with tests/ on PYTHONPATH)."""

import time

from ppo_rewards import colour_share

from rlhf_cli.envs import Environment


class ColoursOnSecondTurn(Environment):
    """Two turns: any first reply is answered "Now name colours."; the second reply's reward is its
    share of colour words (what tests/ppo_rewards.py:colour_share rewards in one turn)."""

    def reset(self, row):
        return [m for m in row["messages"] if m["role"] == "user"][:1]

    def step(self, message):
        if not getattr(self, "asked", False):
            self.asked = True
            return [{"role": "user", "content": "Now name colours."}], 0.0, False
        return [], colour_share([None], [message])[0], True


class Echo(Environment):
    """Replies "again" to every message with reward 0.1 per turn; never done (limits end it)."""

    def reset(self, row):
        return f"say something {row.get('n', '')}".strip()

    def step(self, message):
        return "again", 0.1, False


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first
        b: the second
    """
    return a + b


def fails(x: int) -> int:
    """Always raises.

    Args:
        x: anything
    """
    raise RuntimeError("broken tool")


def hangs(seconds: float) -> str:
    """Sleeps.

    Args:
        seconds: how long
    """
    time.sleep(seconds)
    return "late"


class WithTools(Environment):
    tools = [add, fails, hangs]

    def reset(self, row):
        return "add 2 and 3"

    def step(self, message):
        return [], 1.0, True


class WrongStep(Environment):
    def reset(self, row):
        return "hi"

    def step(self, message):
        return 1.0  # not (messages, reward, done)


class WrongReset(Environment):
    def reset(self, row):
        return 42  # not messages

    def step(self, message):
        return [], 0.0, True


class Buggy(Environment):
    def reset(self, row):
        return {}["missing"]  # the user's bug: their traceback, exit 1

    def step(self, message):
        return [], 0.0, True


def undocumented(x):
    return x


class BadTool(Environment):
    tools = [undocumented]

    def reset(self, row):
        return "hi"

    def step(self, message):
        return [], 0.0, True


class RecordedEcho(Echo):
    """Echo whose every reset appends the row's `n` to $RLHF_TEST_SCORES/env-rank-<RANK>.jsonl
    (which process played which rows, in order)."""

    def reset(self, row):
        import json
        import os
        from pathlib import Path

        path = (
            Path(os.environ["RLHF_TEST_SCORES"]) / f"env-rank-{os.environ.get('RANK', '0')}.jsonl"
        )
        with path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row["n"]) + "\n")
        return super().reset(row)
