"""A multi-turn game with feedback: guess a number, told "higher" or "lower" (`env=guess_number`).

Rows: `secret` (an integer), optionally `low` and `high` (default 1 and 100); without `secret`
the number is drawn from the episode's seeded `rng`. Each reply's last integer is the guess; the
episode ends when it is right (reward 1, less 0.1 per earlier wrong guess, at least 0.1) or when
the turns run out (env.max_turns; reward 0).

    rlhf grpo env=guess_number env.max_turns=7 data=secrets.jsonl
"""

from __future__ import annotations

import re

from rlhf_cli.envs import Environment

INTEGER = re.compile(r"-?\d+")


def last_integer(text: str) -> int | None:
    found = INTEGER.findall(text)
    return int(found[-1]) if found else None


class GuessNumber(Environment):
    def reset(self, row: dict) -> list[dict]:
        self.low, self.high = int(row.get("low", 1)), int(row.get("high", 100))
        secret = row.get("secret")
        self.secret = int(secret) if secret is not None else self.rng.randint(self.low, self.high)
        self.wrong = 0
        return [
            {
                "role": "user",
                "content": f"I am thinking of a number between {self.low} and {self.high}. "
                "Guess it: reply with one number. I will say higher or lower.",
            }
        ]

    def step(self, message: str):
        guess = last_integer(message)
        if guess == self.secret:
            return [], max(0.1, 1.0 - 0.1 * self.wrong), True
        self.wrong += 1
        if guess is None:
            return "Reply with one number.", 0.0, False
        return ("Higher." if guess < self.secret else "Lower."), 0.0, False
