"""Gold judges: programmatic scores of responses against the truth, for `rlhf eval` (`judge=`) and
for PPO with a verifiable reward (`reward.fn=`).

A judge has the signature of a PPO reward function: (prompts, responses, *columns) -> one float per
response, where parameters after the first two name dataset columns, passed as lists aligned with
the responses.
"""

from __future__ import annotations

import re

_ANSWER = re.compile(r"Answer: (?P<value>[^\n]+)")


def demo_gold(prompts: list, responses: list[str], answer: list) -> list[float]:
    """The embedded demo task's judge: 1.0 when the whole response is exactly `Answer: <value>` with
    the right value (compared case-insensitively, surrounding whitespace ignored), else 0.0. A right
    value in another form ("The answer is 42.", "Answer: 42. Because ...") scores 0: following the
    requested format is part of the task."""
    return [
        float(_value(response) == str(truth).strip().lower())
        for response, truth in zip(responses, answer, strict=True)
    ]


def demo_format(prompts: list, responses: list[str]) -> list[float]:
    """1.0 when the response has the requested form `Answer: <value>` (right or wrong value)."""
    return [float(_value(response) is not None) for response in responses]


def _value(response: str) -> str | None:
    match = _ANSWER.fullmatch(response.strip())
    return match.group("value").strip().lower() if match else None
