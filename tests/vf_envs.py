"""verifiers environments written against the installed verifiers package's classic API, as a user
(or an Environments Hub package) writes them: `env=verifiers env.kwargs={id: vf_envs}`."""

import time

import verifiers as vf
from datasets import Dataset

PAIRS = [(123456, 654321), (271828, 314159), (161803, 141421), (577215, 662607)]


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first integer.
        b: The second integer.
    """
    return a + b


def divide(a: int, b: int) -> float:
    """Divide one integer by another.

    Args:
        a: The dividend.
        b: The divisor.
    """
    return a / b


def wait(seconds: float) -> str:
    """Wait, then say so.

    Args:
        seconds: How long to wait.
    """
    time.sleep(seconds)
    return "waited"


async def says_answer(completion, answer) -> float:
    """1 when the last assistant message holds the answer."""
    replies = [m for m in completion if m.role == "assistant"]
    return 1.0 if replies and answer in str(replies[-1].content or "") else 0.0


class Relay(vf.MultiTurnEnv):
    """After each reply the environment asks for the next colour; it ends itself (with a final
    environment message) once a reply says "blue"."""

    async def env_response(self, messages, state, **kwargs):
        last = str(messages[-1].content or "").lower()
        if "blue" in last:
            state["final_env_response"] = [vf.UserMessage(content="Done.")]
            return state["final_env_response"]
        state["asked"] = state.get("asked", 0) + 1
        return [vf.UserMessage(content=f"Now say blue ({state['asked']}).")]


async def said_blue(completion) -> float:
    return float(
        any("blue" in str(m.content or "").lower() for m in completion if m.role == "assistant")
    )


def load_environment(kind: str = "tools", max_turns: int = 3):
    rows = [{"question": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in PAIRS]
    if kind == "tools":
        return vf.ToolEnv(
            dataset=Dataset.from_list(rows),
            tools=[add, divide, wait],
            rubric=vf.Rubric(funcs=[says_answer]),
            max_turns=max_turns,
            system_prompt="Use the tools to compute.",
        )
    if kind == "relay":
        prompts = [{"question": "Name a colour.", "answer": "blue"} for _ in range(8)]
        return Relay(
            dataset=Dataset.from_list(prompts),
            rubric=vf.Rubric(funcs=[said_blue]),
            max_turns=max_turns,
        )
    if kind == "broken":
        raise ValueError("the environment's own loader failed")
    if kind == "group":

        async def spread(completions) -> list[float]:
            return [0.0 for _ in completions]

        return vf.SingleTurnEnv(dataset=Dataset.from_list(rows), rubric=vf.Rubric(funcs=[spread]))
    raise ValueError(f"unknown kind {kind}")
