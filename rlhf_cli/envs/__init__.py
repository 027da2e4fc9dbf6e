"""Environments: what the policy talks to in a multi-turn episode (docs/environments.md).

An environment is a class with two methods, Gym-shaped; one instance plays one episode:

    class GuessNumber(Environment):
        def reset(self, row):                      # the dataset row's columns
            self.secret = int(row["secret"])
            return [{"role": "user", "content": "Guess my number between 1 and 100."}]

        def step(self, message):                   # the policy's reply, as text
            guess = last_integer(message)
            if guess == self.secret:
                return [], 1.0, True               # (new messages, reward, done)
            hint = "higher" if guess is None or guess < self.secret else "lower"
            return [{"role": "user", "content": hint}], 0.0, False

`rlhf grpo env=my_envs:GuessNumber`. An environment may also offer `tools` (plain functions
with type hints and Google-style docstrings): a reply that calls tools is answered by the tools
(rlhf_cli.envs.tools) without a step; a reply without a call goes to `step`. `self.rng` is a
`random.Random` seeded per episode from the run's seed, so an episode replays exactly on resume;
`self.tool_timeout` is env.tool_timeout.
`reset` may return a string (one user message) and `step` a string (one user message) or [].

Optional, as in Gym: `step` may return a fourth item, an info dict whose `tool_calls` and
`tool_errors` (counts) are added to the episode's, for an environment that runs tool calls itself
(its `tool_schemas` are then rendered for the model as a `tools` list's would be); `close()` is
called once when an episode ends, however it ended; a classmethod `for_run(**env.kwargs)` is called
once per run and returns the callable that makes each episode's instance (for a costly setup:
loading a data set or another package's environment).
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable
from typing import Any

from rlhf_cli.schema import SHIPPED_ENVS, UserCodeError, UserError


class Environment:
    """Base class (optional: any class with reset and step works). One instance per episode."""

    tools: list[Callable] = []  # functions the model may call, answered without a step
    rng: random.Random  # seeded per episode by the rollout layer before reset
    tool_timeout: float = 10.0  # env.tool_timeout, set by the rollout layer before reset

    def reset(self, row: dict) -> list[dict] | str:
        raise NotImplementedError

    def step(self, message: str) -> tuple[list[dict] | str, float, bool]:
        raise NotImplementedError


def load(spec: str, key: str = "env.name") -> type:
    """The environment class of `package.module:Name` (the current folder is importable) or of a
    shipped short name (calculator, guess_number)."""
    from rlhf_cli.scoring import import_object

    target = SHIPPED_ENVS.get(spec, spec)
    factory = import_object(target, key, what="environment")
    for method in ("reset", "step"):
        if not callable(getattr(factory, method, None)):
            raise UserError(
                f"{key}={spec} has no `{method}` method; an environment is a class with "
                "reset(row) -> messages and step(message) -> (messages, reward, done) "
                "(docs/environments.md)."
            )
    return factory


def for_run(factory: type, kwargs: dict[str, Any], spec: str) -> tuple[Callable, dict[str, Any]]:
    """(what makes one instance, its keyword arguments): the class and env.kwargs, or, for a class
    with a `for_run` classmethod, what that returns (called once, here) and no arguments."""
    prepare = getattr(factory, "for_run", None)
    if prepare is None:
        return factory, kwargs
    return checked_call(prepare, kwargs, f"{spec}.for_run", f"{spec}.for_run"), {}


def make(factory: Callable, kwargs: dict[str, Any], spec: str) -> Environment:
    """One instance (for one episode). A constructor that does not take `env.kwargs` is bad
    input; a failure inside it is the user's bug (their traceback)."""
    return checked_call(factory, kwargs, f"the constructor of {spec}", f"{spec}()")


def checked_call(fn: Callable, kwargs: dict[str, Any], named: str, what: str):
    """fn(**env.kwargs): arguments it does not take are bad input (one sentence), an exception
    inside it the user's bug (`call`)."""
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as err:
        raise UserError(
            f"env.kwargs={kwargs} do not fit {named} ({err}); give the keyword arguments it takes."
        ) from None
    return call(fn, what, **kwargs)


def call(fn: Callable, what: str, *args, **kwargs):
    """fn(*args, **kwargs); an exception inside it is the user's bug: one line saying which
    method raised, then their traceback (exit 1). A UserError (bad input an environment found,
    e.g. a row without a column it needs) stays one sentence (exit 2)."""
    try:
        return fn(*args, **kwargs)
    except (UserError, UserCodeError):
        raise
    except Exception as err:
        raise UserCodeError(f"{what} raised {type(err).__name__}: {err}", err) from err


def messages_of(value: Any, what: str) -> list[dict]:
    """A reset/step result as messages: a string is one user message; a list must hold
    {role, content} messages of string role and content (other keys are dropped)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    ):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise UserError(
        f"{what} returned {type(value).__name__} {str(value)[:80]!r}; it must return a string (one "
        "user message) or a list of {role, content} messages."
    )


def step_result(value: Any, spec: str) -> tuple[list[dict], float, bool, dict]:
    """`step`'s (messages, reward, done) or (messages, reward, done, info), checked; info is {}
    when not given."""
    if not (isinstance(value, tuple | list) and len(value) in (3, 4)):
        raise UserError(
            f"{spec}.step returned {type(value).__name__} {str(value)[:80]!r}; it must return "
            "(new messages, reward, done) or (new messages, reward, done, info)."
        )
    messages, reward, done, info = (*value, {}) if len(value) == 3 else value
    if not isinstance(info, dict):
        raise UserError(f"{spec}.step returned the info {info!r}; it must be a dict.")
    try:
        reward = float(reward)
    except (TypeError, ValueError):
        raise UserError(
            f"{spec}.step returned the reward {reward!r}; it must be a number."
        ) from None
    if not isinstance(done, bool):
        raise UserError(f"{spec}.step returned done={done!r}; it must be True or False.")
    return messages_of(messages, f"{spec}.step"), reward, done, info
