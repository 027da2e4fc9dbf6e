"""Gymnasium environments as multi-turn text episodes (`env=gymnasium`, the installed package).

    rlhf grpo env=gymnasium env.kwargs='{id: FrozenLake-v1, make: {is_slippery: false},
              actions: [left, down, right, up]}' env.max_turns=12 data=seeds.jsonl

Each turn the model reads the observation as text and replies with an action; the environment's
`step` gives the reward, and `terminated or truncated` ends the episode. The observation's text is
the environment's own `render()` in `ansi` mode where it has one (FrozenLake, CliffWalking, Taxi:
a highlighted cell, the agent's, is written `[x]`), else `Observation: <value>` (Blackjack's
tuple), or what your `observe` function writes. The action is the last integer of the reply for
a `Discrete` space, or the last of `actions` (names, in the space's order) the reply mentions; a
reply with no valid action is answered with the valid ones and costs a turn. Rows may give `seed`
(the reset's seed); otherwise it is drawn from the episode's seeded rng, so a run replays exactly.
"""

from __future__ import annotations

import re
from typing import Any

from rlhf_cli.envs import Environment
from rlhf_cli.schema import UserError

HIGHLIGHT = re.compile(r"\x1b\[(?:4\d|10\d)(?:;\d+)*m(.*?)\x1b\[0m")  # a background colour
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def ansi_to_text(text: str) -> str:
    """An `ansi` rendering as plain text: highlighted cells in brackets, other colour codes gone."""
    return ANSI.sub("", HIGHLIGHT.sub(r"[\1]", text)).strip("\n")


class Gymnasium(Environment):
    """One Gymnasium environment per episode, `gymnasium.make(id, render_mode=..., **make)`."""

    def __init__(
        self, id: str, make: dict | None = None, actions: list[str] | None = None,
        instructions: str | None = None, observe: str | None = None,
    ):  # fmt: skip
        try:
            import gymnasium
        except ImportError:
            raise UserError(
                "env=gymnasium needs the gymnasium package: pip install 'rlhf[gym]' (make install "
                "installs it)."
            ) from None
        self.id, self.actions = id, [a.lower() for a in actions] if actions else None
        try:
            probe = gymnasium.make(id, **(make or {}))
        except gymnasium.error.Error as err:
            raise UserError(f"env.kwargs.id={id}: {err}") from None
        self.ansi = "ansi" in probe.metadata.get("render_modes", [])
        probe.close()
        self.env = gymnasium.make(
            id, **({"render_mode": "ansi"} if self.ansi else {}), **(make or {})
        )
        space = self.env.action_space
        if not isinstance(space, gymnasium.spaces.Discrete):
            raise UserError(
                f"env.kwargs.id={id} has the action space {space}; env=gymnasium takes Discrete "
                "action spaces (one action a turn, written as an integer or a name)."
            )
        self.n, self.start = int(space.n), int(space.start)
        if self.actions is not None and len(self.actions) != self.n:
            raise UserError(
                f"env.kwargs.actions names {len(self.actions)} actions, but {id} has {self.n}; "
                "name each action in the space's order."
            )
        self.instructions = instructions
        self.observe = None
        if observe:
            from rlhf_cli.scoring import load_reward_fn

            self.observe = load_reward_fn(observe, "env.kwargs.observe")

    def describe_actions(self) -> str:
        if self.actions:
            return "Reply with one action: " + ", ".join(self.actions) + "."
        return f"Reply with one action, an integer from {self.start} to {self.start + self.n - 1}."

    def text(self, observation: Any) -> str:
        if self.observe is not None:
            return str(self.observe(observation, self.env))
        if self.ansi:
            return ansi_to_text(str(self.env.render()))
        return f"Observation: {observation}"

    def reset(self, row: dict) -> list[dict]:
        seed = row.get("seed")
        observation, _ = self.env.reset(
            seed=int(seed) if seed is not None else self.rng.randrange(2**31)
        )
        intro = self.instructions or f"You are playing the Gymnasium environment {self.id}."
        return [
            {
                "role": "user",
                "content": f"{intro}\n\n{self.text(observation)}\n\n{self.describe_actions()}",
            }
        ]

    def action(self, message: str) -> int | None:
        """The action a reply names: its last integer in the space, or the last action name in it."""
        if self.actions:
            words = re.findall(r"[a-z_]+", message.lower())
            named = [w for w in words if w in self.actions]
            return self.start + self.actions.index(named[-1]) if named else None
        found = [int(x) for x in re.findall(r"-?\d+", message)]
        if found and self.start <= found[-1] < self.start + self.n:
            return found[-1]
        return None

    def step(self, message: str):
        action = self.action(message)
        if action is None:
            return f"That is not a valid action. {self.describe_actions()}", 0.0, False
        observation, reward, terminated, truncated, _ = self.env.step(action)
        if terminated or truncated:
            return [], float(reward), True
        return f"{self.text(observation)}\n\n{self.describe_actions()}", float(reward), False

    def close(self) -> None:
        self.env.close()
