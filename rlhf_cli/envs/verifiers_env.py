"""verifiers environments (the installed `verifiers` package) as multi-turn episodes.

    rlhf grpo env=verifiers env.kwargs='{id: my_env, args: {max_turns: 4}}' data=train.jsonl
    python -m rlhf_cli.envs.verifiers_env my_env train.jsonl      # its data set as rows

`id` is what `verifiers.load_environment` takes: an installed environment module (one from the
Environments Hub, or your own module with a `load_environment(**args)` function). It is loaded
once per run, and each episode runs that environment's own code unchanged: `setup_state`,
`env_response` (a `ToolEnv`'s tool calls, a `MultiTurnEnv`'s replies), its stop conditions (its
`max_turns`, `final_env_response`, errors) and its rubric, which gives the episode's reward when
it stops. Only the model is ours: where verifiers would ask a client for a reply, the policy's
sampled turn is the assistant message (its `<tool_call>` blocks read as the message's tool calls,
as a tool-call parser of a serving engine would). The classic verifiers API is the one driven
(`vf.MultiTurnEnv` and its subclasses: `SingleTurnEnv`, `ToolEnv`, `StatefulToolEnv`); an
environment that replaces `rollout` itself, or a rubric that scores whole groups, is refused.

Rows are what the environment's data set holds (`prompt` messages or a `question`, `answer`,
`info`, `task`); `python -m rlhf_cli.envs.verifiers_env ID FILE [--eval] [--args JSON]` writes them
as JSON lines. The environment's coroutines run on one event loop thread per run; a call that
does not return within `env.tool_timeout` seconds ends the episode (verifiers' "timeout_reached",
counted as a tool error), and the next episodes get a fresh loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from rlhf_cli.envs import Environment
from rlhf_cli.envs import tools as toolkit
from rlhf_cli.schema import UserCodeError, UserError


def _import_verifiers():
    try:
        import verifiers.legacy as vf
    except ImportError:
        raise UserError(
            "env=verifiers needs the verifiers package (0.3, its classic environments): "
            "pip install 'rlhf[verifiers]' (make install installs it)."
        ) from None
    return vf


class _Loop:
    """An event loop on its own daemon thread, for the environment's coroutines; replaced by a
    fresh one when a call hangs (the hung thread is left behind)."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def run(self, coroutine, timeout: float | None = None):
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout)


class Run:
    """What every episode of a run shares: the loaded environment, its tools' schemas, the loop."""

    def __init__(self, vf, env, spec: str):
        self.vf, self.env, self.spec = vf, env, spec
        self.loop = _Loop()
        self.client = _policy_client(vf)
        defs = env.tool_defs or []
        self.schemas = [
            {"type": "function", "function": {"name": t.name, "description": t.description,
                                              "parameters": t.parameters}}
            for t in defs
        ] or None  # fmt: skip

    def run(self, coroutine, what: str, timeout: float | None = None):
        """The coroutine's result; an exception in the environment's code is the user's bug (their
        traceback); a verifiers.Error is returned, for the caller to record as verifiers does."""
        try:
            return self.loop.run(coroutine, timeout)
        except concurrent.futures.TimeoutError:
            self.loop = _Loop()
            raise
        except self.vf.Error as err:
            return err
        except Exception as err:
            raise UserCodeError(
                f"{self.spec}: {what} raised {type(err).__name__}: {err}", err
            ) from err


class Verifiers(Environment):
    """One episode of a verifiers environment (its `Run` loaded once by `for_run`)."""

    @classmethod
    def for_run(cls, id: str, args: dict | None = None):
        vf = _import_verifiers()
        env = load_environment(id, args)
        if not isinstance(env, vf.MultiTurnEnv) or type(env).rollout is not vf.MultiTurnEnv.rollout:
            raise UserError(
                f"env.kwargs.id={id} loads a {type(env).__name__}; env=verifiers plays "
                "vf.MultiTurnEnv environments (SingleTurnEnv, ToolEnv, StatefulToolEnv, your own "
                "MultiTurnEnv) whose rollout is verifiers' own."
            )
        if env.rubric.has_group_rewards:
            raise UserError(
                f"env.kwargs.id={id} has a rubric with group reward functions; env=verifiers "
                "scores each episode by itself (Rubric.score_rollout)."
            )
        run = Run(vf, env, f"verifiers:{id}")

        def episode() -> Verifiers:
            return cls(run)

        return episode

    def __init__(self, run: Run):
        self.shared = run
        self.tool_schemas = run.schemas  # rendered for the model; the environment runs the calls
        self.state: Any = None  # verifiers' State of this episode
        self.context: list = []
        self.over = False  # cleanup has run

    # ------------------------------------------------------------------ Gym side
    def reset(self, row: dict) -> list[dict]:
        run, env = self.shared, self.shared.env
        prompt = row.get("prompt")
        if prompt is None:
            if "question" not in row:
                raise UserError(
                    f"a row for {run.spec} has neither `prompt` nor `question` (its columns: "
                    f"{sorted(row)}); write the environment's data set with python -m "
                    "rlhf_cli.envs.verifiers_env."
                )
            system = [{"role": "system", "content": env.system_prompt}] if env.system_prompt else []
            prompt = [*system, *(env.few_shot or []), {"role": "user", "content": row["question"]}]
        task = {"prompt": prompt, "example_id": row.get("example_id", 0)}
        task |= {k: row[k] for k in ("answer", "info", "task") if row.get(k) is not None}
        state = run.run(env.init_state(task, run.client, "rlhf-policy", {}), "init_state")
        setup = run.run(env.setup_state(state), "setup_state")
        if isinstance(setup, run.vf.Error):
            state["error"] = setup
        elif setup is not None:
            state = setup
        self.state, self.context = state, list(state["prompt"])  # what the model sees next
        return [as_message(m) for m in state["prompt"]]

    def step(self, message: str):
        run, env, state = self.shared, self.shared.env, self.state
        reply = assistant_message(run.vf, message, len(state["trajectory"]))
        step = {"prompt": self.context, "completion": [reply], "response": None, "tokens": None,
                "reward": None, "advantage": None, "is_truncated": False,
                "trajectory_id": state["trajectory_id"], "extras": {}}  # fmt: skip
        run.run(env.add_trajectory_step(state, step), "add_trajectory_step")
        info = {"tool_calls": len(reply.tool_calls or [])}
        if not self.completed():
            try:  # env_response: the environment's answer (a ToolEnv runs the calls here)
                following = run.run(
                    env.get_prompt_messages(state), "env_response", self.tool_timeout
                )
            except concurrent.futures.TimeoutError:
                env.mark_timed_out(state)
                self.close()
                return [], 0.0, True, info | {"tool_errors": max(info["tool_calls"], 1)}
            if isinstance(following, run.vf.Error):  # verifiers' loop records it: has_error stops
                state["error"] = following
            elif not self.completed():  # (a final_env_response is one of its stop conditions)
                new = [as_message(m) for m in following[len(self.context) + 1 :]]
                self.context = list(following)
                return new, 0.0, False, info
        return [], self.score(), True, info

    def close(self) -> None:
        """An episode that our limits ended (turns, tokens) still runs its cleanup handlers."""
        if self.state is not None and not self.over:
            self.over = True
            self.shared.run(self.shared.env.cleanup(self.state), "cleanup")

    # ------------------------------------------------------------------ verifiers side
    def completed(self) -> bool:
        return bool(self.shared.run(self.shared.env.is_completed(self.state), "a stop condition"))

    def score(self) -> float:
        """Its rubric's reward, after its cleanup handlers (which render the completion), as
        verifiers' own rollout-then-score does."""
        run, env, state = self.shared, self.shared.env, self.state
        self.over = True
        run.run(env.cleanup(state), "cleanup")
        run.run(env.rubric.score_rollout(state), "the rubric")
        run.run(env.rubric.cleanup(state), "the rubric's cleanup")
        return float(state.get("reward") or 0.0)


def as_message(message) -> dict:
    """A verifiers message (pydantic, or a dict) as {role, content}; content parts are joined."""
    if hasattr(message, "model_dump"):
        message = message.model_dump()
    content = message.get("content") or ""
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return {"role": message["role"], "content": str(content)}


def assistant_message(vf, text: str, turn: int):
    """The policy's turn as verifiers' AssistantMessage: the text around its tool calls, and the
    calls that could be read (a call that cannot be read is left in the text, as a serving
    engine's tool parser leaves it)."""
    calls = [c for c in toolkit.parse_tool_calls(text) if isinstance(c, toolkit.ToolCall)]
    content = toolkit.CALL.sub("", text).strip() if calls else text
    if calls and content.startswith("{") and not toolkit.CALL.search(text):
        content = ""  # the whole reply was one bare JSON call
    tool_calls = [
        vf.ToolCall(id=f"call_{turn}_{k}", name=c.name, arguments=json.dumps(c.arguments))
        for k, c in enumerate(calls)
    ]
    return vf.AssistantMessage(content=content, tool_calls=tool_calls or None)


def _policy_client(vf):
    """What stands where verifiers keeps a model client: rlhf samples the policy itself, so a
    request for a model response outside the turn loop is an error that says so."""

    def refuse(*args, **kwargs):
        raise RuntimeError(
            "env=verifiers: the policy's turns are sampled by rlhf; this environment asked its "
            "client for a model response, which env=verifiers does not serve."
        )

    async def close(self) -> None:
        return None

    methods = ("setup_client", "to_native_tool", "to_native_prompt", "get_native_response",
               "raise_from_native_response", "from_native_response")  # fmt: skip
    client = type("PolicyClient", (vf.Client,), {m: refuse for m in methods} | {"close": close})
    return client(None)


def load_environment(id: str, args: dict | None):
    """The environment `id` loads (its module's load_environment(**args), as
    verifiers.load_environment calls it; the current folder is importable)."""
    import inspect

    import datasets

    from rlhf_cli.scoring import import_object

    _import_verifiers()
    module = id.replace("-", "_")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        found = False
    if not found:
        raise UserError(
            f"env.kwargs.id={id}: no module {module} is installed or in the current folder; a "
            "verifiers environment is a module with load_environment(**args) (pip install it, "
            "or put its folder on PYTHONPATH)."
        )
    loader = import_object(f"{module}:load_environment", "env.kwargs.id")
    try:
        inspect.signature(loader).bind(**(args or {}))
    except TypeError as err:
        raise UserError(
            f"env.kwargs.args={args} do not fit {module}.load_environment ({err}); give the "
            "keyword arguments it takes."
        ) from None
    # verifiers' Environment installs SIGINT and SIGTERM handlers of its own (tear down, then
    # exit); the run's handlers (a checkpoint on SIGTERM, docs/resume.md) are put back, and the
    # environment's teardown still runs at exit (it registers that with atexit too)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # its data set's map() bars are not the run's progress
    try:
        env = loader(**(args or {}))
    except Exception as err:
        raise UserCodeError(
            f"{module}.load_environment raised {type(err).__name__}: {err}", err
        ) from err
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if bars:
            datasets.enable_progress_bars()
    env.env_id, env.env_args = env.env_id or id, env.env_args or (args or {})
    return env


def write_rows(id: str, path: str, eval_split: bool = False, args: dict | None = None) -> int:
    """The environment's data set (or its eval set) as JSON lines at `path`; returns the count."""
    env = load_environment(id, args)
    dataset = env.get_eval_dataset() if eval_split else env.get_dataset()
    with open(path, "w") as handle:
        for row in dataset:
            handle.write(json.dumps(dict(row), default=str) + "\n")
    return len(dataset)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m rlhf_cli.envs.verifiers_env",
        description="Write a verifiers environment's data set as rows for env=verifiers.",
    )
    parser.add_argument("id", help="the environment, as verifiers.load_environment takes it")
    parser.add_argument("path", help="the JSON lines file to write")
    parser.add_argument("--eval", action="store_true", help="its eval set instead")
    parser.add_argument("--args", default="{}", help="load_environment's arguments, as JSON")
    options = parser.parse_args(argv)
    try:
        args = json.loads(options.args)
        count = write_rows(options.id, options.path, options.eval, args)
    except json.JSONDecodeError as err:
        print(
            f"error: --args is not JSON ({err}); e.g. --args '{{\"max_turns\": 4}}'.",
            file=sys.stderr,
        )
        return 2
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except UserCodeError as err:
        print(err.report(), file=sys.stderr)
        return 1
    print(f"wrote {count} rows to {options.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
