"""A calculator tool for arithmetic a small model cannot do in its head (`env=calculator`).

Rows: `question` (the task, as text) and `answer` (a number). The model may call
`calculate(expression)` as often as the turn limit allows; its first reply without a tool call is
its answer, scored 1 when the last number in it equals `answer` (to 1e-6 relative), else 0.

    rlhf grpo env=calculator data=arithmetic.jsonl policy.init_from=runs/sft/final env.max_turns=3
"""

from __future__ import annotations

import ast
import math
import operator
import re

from rlhf_cli.envs import Environment

OPERATORS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos,
}  # fmt: skip
NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def evaluate(expression: str) -> float | int:
    """The value of an arithmetic expression of numbers, + - * / // % ** and parentheses (no names,
    no calls: nothing else is evaluated). Raises ValueError on anything else."""

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError("exponents above 64 are refused")
            return OPERATORS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in OPERATORS:
            return OPERATORS[type(node.op)](value(node.operand))
        raise ValueError(
            f"only numbers and + - * / // % ** ( ) are allowed, not {ast.unparse(node)!r}"
        )

    try:
        tree = ast.parse(expression.replace("^", "**").replace("×", "*"), mode="eval")
    except SyntaxError:
        raise ValueError(f"{expression!r} is not an arithmetic expression") from None
    return value(tree.body)


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression exactly.

    Args:
        expression: numbers with + - * / // % ** and parentheses, e.g. "(17 + 5) * 123"
    """
    result = evaluate(expression)
    if isinstance(result, float) and result.is_integer():
        result = int(result)
    return str(result)


def last_number(text: str) -> float | None:
    """The last number written in `text` (thousands separators allowed), or None."""
    found = NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def correct(text: str, answer) -> bool:
    got = last_number(text)
    return got is not None and math.isclose(got, float(answer), rel_tol=1e-6, abs_tol=1e-9)


class Calculator(Environment):
    """One question; the calculator tool; reward 1 for the right final answer."""

    tools = [calculate]

    def __init__(self, system: str | None = None):
        self.system = system

    def reset(self, row: dict) -> list[dict]:
        self.answer = row["answer"]
        question = {"role": "user", "content": str(row["question"])}
        return [{"role": "system", "content": self.system}, question] if self.system else [question]

    def step(self, message: str):
        return [], float(correct(message, self.answer)), True
