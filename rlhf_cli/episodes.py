"""The rollout layer: a batch of episodes, one turn at a time, token in and token out.

    episodes = start(prompts, tokenizer, setup)          # one per prompt (or per environment row)
    run(model, tokenizer, episodes, setup, temperature)  # sample, step the environments, repeat
    rollout = to_rollout(episodes, tokenizer.pad_token_id, device)   # tensors for the losses

An episode is its prompt's token ids, then every token after it in order: the policy's turns
(exactly the ids it sampled) and the environment's messages between them (exactly the ids
appended, `chat.continuation`); `policy` marks which are the policy's. Nothing is re-tokenised
from text, so the ids trained on are the ids sampled.

Each turn samples every episode still running in batches of `setup.batch_size` (episodes at
different turns share a batch: their contexts are left-padded), then steps their environments.
Without an environment (`setup.env is None`) an episode is the one-step case of today's stages:
the prompt, one sampled response, done; rewards then come from the stage's reward functions.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from rlhf_cli import chat, data, envs, files
from rlhf_cli.envs import tools as toolkit
from rlhf_cli.rollout import Rollout, decode_response, left_pad, sample

FINISHES = ("done", "max_turns", "max_tokens", "truncated")  # why an episode ended


@dataclass
class Setup:
    """How episodes are played: the environment (None: one turn) and the limits."""

    env: Callable | None = None  # makes an episode's environment (envs.for_run) | None: one turn
    spec: str = ""  # as the user wrote it, for messages
    kwargs: dict[str, Any] = field(default_factory=dict)  # env.kwargs, for `env` (envs.for_run)
    max_turns: int = 1  # policy turns per episode
    max_new_tokens: int = 512  # tokens per policy turn
    max_tokens: int | None = None  # all tokens after the prompt | None: no limit
    tool_timeout: float = 10.0  # seconds a tool may run before its call is an error
    batch_size: int | None = 32  # sequences per generate() call | None: every running episode
    seed: int = 0


@dataclass
class Episode:
    prompt: Any  # the prompt as the data (or the environment's reset) gave it
    prompt_ids: list[int]
    row: dict | None
    env: Any = None  # the environment instance | None: one turn
    tool_schemas: list[dict] | None = None  # the tools' schemas, rendered by the template
    messages: list[dict] = field(default_factory=list)  # the conversation so far, prompt included
    prompt_messages: int = 0  # how many of `messages` are the prompt
    ids: list[int] = field(default_factory=list)  # every token after the prompt
    policy: list[int] = field(default_factory=list)  # 1 where the policy sampled ids[t]
    turn_rewards: list[float] = field(default_factory=list)  # the environment's, per policy turn
    turn_tokens: list[int] = field(default_factory=list)  # policy tokens of each turn
    responses: list[str] = field(default_factory=list)  # the policy's turns as text
    tool_calls: int = 0
    tool_errors: int = 0
    finish: str = ""  # one of FINISHES once ended
    ended: bool = False  # the last policy turn closed with a stop token
    multi_turn: bool = False  # played in an environment (else: one turn)

    @property
    def response(self) -> str:
        """The policy's last turn: what reward functions score."""
        return self.responses[-1] if self.responses else ""

    @property
    def env_reward(self) -> float:
        return sum(self.turn_rewards)

    @property
    def turns(self) -> int:
        return len(self.responses)


def setup_for(config, rollout=None) -> Setup:
    """The episode settings of a stage's config: its `env` (absent or env.name unset: one turn)
    and `rollout` (or the given section with max_new_tokens and batch_size: eval's
    `generation`)."""
    env = getattr(config, "env", None)
    rollout = rollout or config.rollout
    common = dict(
        max_new_tokens=rollout.max_new_tokens,
        batch_size=getattr(rollout, "batch_size", None),  # PPO: the step's episodes at once
        seed=config.seed,
    )
    if env is None or env.name is None:
        return Setup(**common)
    factory, kwargs = envs.for_run(envs.load(env.name), dict(env.kwargs or {}), env.name)
    return Setup(
        factory, env.name, kwargs, env.max_turns, max_tokens=env.max_tokens,
        tool_timeout=env.tool_timeout, **common,
    )  # fmt: skip


def load_prompts(config, tokenizer, console, stage: str, setup: Setup):
    """An RL stage's (train, held out, train stats, held-out stats) of `config.data`: prompts
    tokenised to generate from, or, with an environment, the rows its reset builds prompts from."""
    if setup.env is None:
        return data.load_examples(
            config, tokenizer, console, stage, data.tokenize_prompts, "prompts"
        )
    what = f"rows for {setup.spec}"
    return data.load_examples(config, tokenizer, console, stage, data.environment_rows, what)


def describe(setup: Setup) -> str:
    """The episodes a run plays, for the log."""
    if setup.env is None:
        return "episodes: one turn"
    limit = f", {setup.max_tokens} tokens" if setup.max_tokens else ""
    return (
        f"episodes: {setup.spec}, at most {setup.max_turns} turns of {setup.max_new_tokens} "
        f"tokens{limit}"
    )


def start(prompts: list, tokenizer, setup: Setup, first_seed: str = "") -> list[Episode]:
    """One episode per item of `prompts` (data.PromptExample: a prompt already tokenised, or a row
    for the environment to reset from). Each environment instance gets `rng`, a random.Random
    seeded from the run's seed, `first_seed` (e.g. the step) and the episode's place, so that a
    resumed run replays its episodes exactly."""
    if setup.env is None:
        return [Episode(p.prompt, list(p.input_ids), p.row) for p in prompts]
    episodes = []
    for k, example in enumerate(prompts):
        env = envs.make(setup.env, setup.kwargs, setup.spec)
        env.rng = random.Random(f"{setup.seed}/{first_seed}/{k}")
        env.tool_timeout = setup.tool_timeout
        reset = envs.call(env.reset, f"{setup.spec}.reset", dict(example.row or {}))
        messages = envs.messages_of(reset, f"{setup.spec}.reset")
        schemas = getattr(env, "tool_schemas", None) or None  # tools the environment runs
        if getattr(env, "tools", None):
            schemas = toolkit.tool_schemas(list(env.tools), f"{setup.spec}.tools")
        if schemas and not chat.takes_tools(tokenizer):
            messages = with_instructions(messages, toolkit.tool_instructions(schemas))
            schemas = None  # told in the system message instead
        text = chat.render(tokenizer, messages, add_generation_prompt=True, tools=schemas)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        episodes.append(
            Episode(
                messages,
                ids,
                example.row,
                env,
                schemas,
                list(messages),
                len(messages),
                multi_turn=True,
            )  # fmt: skip
        )
    return episodes


def with_instructions(messages: list[dict], instructions: str) -> list[dict]:
    """The tool instructions as the system message (after the environment's own, if any)."""
    if messages and messages[0]["role"] == "system":
        first = {**messages[0], "content": f"{messages[0]['content']}\n\n{instructions}"}
        return [first, *messages[1:]]
    return [{"role": "system", "content": instructions}, *messages]


@torch.no_grad()
def run(
    model, tokenizer, episodes: list[Episode], setup: Setup, temperature: float,
    stops: list[int], watch=None,
) -> list[Episode]:  # fmt: skip
    """Play every episode to its end: each turn samples all running episodes (in order, in
    batches of setup.batch_size, or all at once) and then steps their environments. `watch` (a Stopwatch) times
    "generate" and "environment"."""
    tool_role = chat.takes_tool_role(tokenizer) if setup.env is not None else False
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        while running := [e for e in episodes if not e.finish]:
            with _timed(watch, "generate"):
                turns = _sample_turn(model, tokenizer, running, setup, temperature, stops)
            with _timed(watch, "environment"):
                for episode, (tokens, ended) in zip(running, turns, strict=True):
                    _advance(episode, tokens, ended, tokenizer, setup, stops, tool_role, pool)
            files.kill_point("episode-turn")
        pool.shutdown(wait=False, cancel_futures=True)  # a hung tool keeps only its own thread
    return episodes


def _sample_turn(model, tokenizer, running: list[Episode], setup: Setup, temperature, stops):
    """[(sampled ids, ended)] for each running episode: its next turn, cut to what its token
    budget leaves."""
    out, size = [], setup.batch_size or len(running)
    for first in range(0, len(running), size):
        chunk = running[first : first + size]
        budgets = [_budget(e, setup) for e in chunk]
        rollout = sample(
            model, tokenizer, [e.prompt_ids + e.ids for e in chunk], max(budgets), temperature,
            stops,
        )  # fmt: skip
        for i, budget in enumerate(budgets):
            kept = rollout.response[i][rollout.response_mask[i].bool()].tolist()
            ended = bool(rollout.ended[i])
            if len(kept) > budget:  # another episode of the batch had more room
                kept, ended = kept[:budget], False
            out.append((kept, ended))
    return out


def _budget(episode: Episode, setup: Setup) -> int:
    if setup.max_tokens is None:
        return setup.max_new_tokens
    return max(1, min(setup.max_new_tokens, setup.max_tokens - len(episode.ids)))


def _advance(
    episode: Episode, tokens: list[int], ended: bool, tokenizer, setup: Setup, stops, tool_role,
    pool,
) -> None:  # fmt: skip
    """Append the policy's turn; end the episode or append the environment's answer."""
    episode.ids += tokens
    episode.policy += [1] * len(tokens)
    episode.turn_tokens.append(len(tokens))
    episode.ended = ended
    text = decode_response(tokenizer, tokens, ended)
    episode.responses.append(text)
    episode.messages.append({"role": "assistant", "content": text})
    if not ended:
        full = setup.max_tokens is not None and len(episode.ids) >= setup.max_tokens
        episode.turn_rewards.append(0.0)
        _end(episode, "max_tokens" if full else "truncated", setup)
        return
    if episode.env is None:
        episode.finish = "done"
        episode.turn_rewards.append(0.0)
        return
    calls = toolkit.parse_tool_calls(text) if getattr(episode.env, "tools", None) else []
    if calls:
        tools = {t.__name__: t for t in episode.env.tools}
        results = [toolkit.run_tool(tools, call, setup.tool_timeout, pool) for call in calls]
        episode.tool_calls += len(results)
        episode.tool_errors += sum(r.error for r in results)
        new, reward, done = tool_messages(results, tool_role), 0.0, False
    else:
        result = envs.call(episode.env.step, f"{setup.spec}.step", text)
        new, reward, done, info = envs.step_result(result, setup.spec)
        episode.tool_calls += int(info.get("tool_calls", 0))
        episode.tool_errors += int(info.get("tool_errors", 0))
        if not tool_role:  # the environment's own tool results, as this template takes them
            new = _wrap_tool_results(new)
    episode.turn_rewards.append(reward)
    if done or episode.turns >= setup.max_turns:
        _end(episode, "done" if done else "max_turns", setup)
        return
    end_text = tokenizer.convert_ids_to_tokens(tokens[-1]) if tokens[-1] in stops else ""
    follow = chat.continuation(tokenizer, episode.messages, new, end_text, episode.tool_schemas)
    follow_ids = tokenizer(follow, add_special_tokens=False)["input_ids"]
    if setup.max_tokens is not None and len(episode.ids) + len(follow_ids) >= setup.max_tokens:
        _end(episode, "max_tokens", setup)  # no room left for the environment's answer and a reply
        return
    episode.ids += follow_ids
    episode.policy += [0] * len(follow_ids)
    episode.messages += new


def _end(episode: Episode, reason: str, setup: Setup) -> None:
    """The episode is over: why, and its environment's `close()` if it has one."""
    episode.finish = reason
    close = getattr(episode.env, "close", None)
    if callable(close):
        envs.call(close, f"{setup.spec}.close")


def tool_messages(results: list[toolkit.ToolResult], tool_role: bool) -> list[dict]:
    """Tool results as the template takes them: `tool` messages, or one user message."""
    messages = [{"role": "tool", "content": r.text} for r in results]
    return messages if tool_role else _wrap_tool_results(messages)


def _wrap_tool_results(messages: list[dict]) -> list[dict]:
    """For a template without a `tool` role: each run of tool messages as one user message that
    wraps each result in <tool_response></tool_response>."""
    out: list[dict] = []
    for m in messages:
        if m["role"] != "tool":
            out.append(m)
            continue
        wrapped = f"<tool_response>\n{m['content']}\n</tool_response>"
        if out and out[-1].get("tool_results"):
            out[-1] = {**out[-1], "content": f"{out[-1]['content']}\n{wrapped}"}
        else:
            out.append({"role": "user", "content": wrapped, "tool_results": True})
    return [{"role": m["role"], "content": m["content"]} for m in out]


def _timed(watch, name: str):
    """watch(name) when there is a watch (a Stopwatch), else nothing."""
    return watch(name) if watch is not None else contextlib.nullcontext()


def turn_reward_tensor(played: list[Episode], width: int) -> torch.Tensor:
    """(B, width) float32: each turn's environment reward on that turn's last policy token, with
    the policy tokens counted from the episode's first (the coordinates of `losses.pack`)."""
    out = torch.zeros(len(played), width)
    for i, episode in enumerate(played):
        end = 0
        for tokens, reward in zip(episode.turn_tokens, episode.turn_rewards, strict=True):
            end += tokens
            if tokens:
                out[i, end - 1] += reward
    return out


def to_rollout(episodes: list[Episode], pad_id: int, device) -> Rollout:
    """The episodes as tensors: left-padded prompts, then each episode's tokens right-padded;
    `policy_mask` marks the policy's tokens. For one-turn episodes this is exactly the Rollout
    that batched sampling returns (the same widths and padding)."""
    query, query_mask = left_pad([e.prompt_ids for e in episodes], pad_id)
    width = max(len(e.ids) for e in episodes)
    response = torch.full((len(episodes), width), pad_id, dtype=torch.long)
    response_mask = torch.zeros_like(response)
    policy_mask = torch.zeros_like(response)
    for i, e in enumerate(episodes):
        n = len(e.ids)
        response[i, :n] = torch.tensor(e.ids, dtype=torch.long)
        response_mask[i, :n] = 1
        policy_mask[i, :n] = torch.tensor(e.policy, dtype=torch.long)
    ended = torch.tensor([e.ended for e in episodes], dtype=torch.bool)
    return Rollout(
        *(t.to(device) for t in (query, query_mask, response, response_mask, ended, policy_mask))
    )


COUNTS = ("turns", "tool_calls", "tool_errors", "env_reward", "turn_reward", *FINISHES)


def counts(episodes: list[Episode]) -> torch.Tensor:
    """(N, len(COUNTS)) float64 per episode: turns, tool calls, tool errors, the environment's
    reward, its mean per turn, and a one-hot of why it ended; gathered over the processes and
    summed up by `summary`."""
    return torch.tensor(
        [
            [e.turns, e.tool_calls, e.tool_errors, e.env_reward, e.env_reward / max(e.turns, 1)]
            + [float(e.finish == reason) for reason in FINISHES]
            for e in episodes
        ],
        dtype=torch.float64,
    ).reshape(len(episodes), len(COUNTS))


def summary(table: torch.Tensor, prefix: str = "episode") -> dict[str, float]:
    """Means over the episodes of `counts` (every process's), with tool errors as a share of the
    tool calls."""
    n = max(table.size(0), 1)
    total = dict(zip(COUNTS, table.sum(dim=0).tolist(), strict=True))
    out = {
        f"{prefix}/turns": total["turns"] / n,
        f"{prefix}/tool_calls": total["tool_calls"] / n,
        f"{prefix}/tool_error_fraction": total["tool_errors"] / max(total["tool_calls"], 1),
        f"{prefix}/env_reward": total["env_reward"] / n,
        f"{prefix}/turn_reward": total["turn_reward"] / n,
    }
    return out | {f"{prefix}/finish_{reason}": total[reason] / n for reason in FINISHES}


def detached(episode: Episode) -> Episode:
    """The episode without its environment instance (which may not pickle), for gathering the
    episodes of several processes."""
    return dataclasses.replace(episode, env=None)


def transcript(episode: Episode) -> str:
    """The conversation after the prompt, one `role: content` paragraph per message (a one-turn
    episode: its response)."""
    if not episode.multi_turn:
        return episode.response
    shown = episode.messages[episode.prompt_messages :]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in shown)
