"""Tools an environment offers the model: their JSON schemas, how the model is told about them,
how its calls are read, and how they run.

    schemas = tool_schemas(env.tools)                  # from signatures + Google-style docstrings
    calls = parse_tool_calls(text)                     # [ToolCall(name, arguments) | a parse error]
    result = run_tool(tools_by_name, call, timeout=10) # ToolResult(text, error)

The call protocol is one for every model: a call is `<tool_call>{"name": ..., "arguments":
{...}}</tool_call>` (the Hermes format Qwen2.5, Qwen3, SmolLM3 and Hermes are trained on; a
message that is only such a JSON object, Llama 3.1's way, is read too). A chat template that
renders `tools=` itself (its source mentions `tools`) gets the schemas that way; any other gets
them in a system message written by `tool_instructions`, which also shows the format. Results go
back as `tool` messages where the template renders that role, else as a user message wrapping
each result in `<tool_response>...</tool_response>`.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlhf_cli.schema import UserError

CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
MAX_RESULT_CHARS = 2000  # a longer tool result is cut (with a note) before it reaches the model


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass
class ToolResult:
    name: str
    text: str  # what the model reads
    error: bool  # the call could not be read, named no tool, raised, or timed out


def tool_schemas(tools: list[Callable], where: str = "the environment's tools") -> list[dict]:
    """OpenAI-style function schemas from each function's signature and Google-style docstring
    (transformers' `get_json_schema`: a type hint per argument, an `Args:` line per argument)."""
    from transformers.utils import get_json_schema

    schemas = []
    for tool in tools:
        if not callable(tool):
            raise UserError(f"{where} must be plain functions; {tool!r} is not callable.")
        try:
            schemas.append(get_json_schema(tool))
        except Exception as err:  # DocstringParsingException, TypeHintParsingException
            name = getattr(tool, "__name__", repr(tool))
            raise UserError(
                f"{where}: no JSON schema could be built for `{name}` ({err}); give it a type hint "
                "per argument and a Google-style docstring with a description and an `Args:` "
                "line per argument."
            ) from None
    names = [s["function"]["name"] for s in schemas]
    if len(set(names)) != len(names):
        raise UserError(f"{where} has two tools of the same name: {names}.")
    return schemas


def tool_instructions(schemas: list[dict]) -> str:
    """The system text that tells a model whose template has no `tools=` support which tools it
    has and how to call them."""
    listed = "\n".join(json.dumps(s["function"]) for s in schemas)
    return (
        "You can call these tools:\n"
        f"{listed}\n"
        'To call one, write <tool_call>{"name": <tool name>, "arguments": {<argument>: '
        "<value>}}</tool_call>; the result comes back in <tool_response></tool_response>. "
        "Answer without a tool call when you are done."
    )


def parse_tool_calls(text: str) -> list[ToolCall | str]:
    """The calls in an assistant message, in order: a ToolCall, or a sentence saying why a call
    could not be read (which goes back to the model as an error). [] when the message calls
    nothing."""
    blocks = CALL.findall(text)
    if not blocks:
        bare = text.strip()
        if not (bare.startswith("{") and bare.endswith("}") and '"name"' in bare):
            return []
        blocks = [bare]
    calls: list[ToolCall | str] = []
    for block in blocks:
        try:
            value = json.loads(block)
        except json.JSONDecodeError as err:
            calls.append(f"the tool call is not valid JSON ({err.msg} at character {err.pos})")
            continue
        arguments = (
            value.get("arguments", value.get("parameters", {})) if isinstance(value, dict) else None
        )
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                arguments = None
        if (
            not isinstance(value, dict)
            or not isinstance(value.get("name"), str)
            or not isinstance(arguments, dict)
        ):
            calls.append('a tool call must be {"name": <tool name>, "arguments": {...}}')
            continue
        calls.append(ToolCall(value["name"], arguments))
    return calls


def run_tool(tools: dict[str, Callable], call: ToolCall | str, timeout: float, pool) -> ToolResult:
    """Run one call in `pool` (a thread pool) and wait at most `timeout` seconds. A call that
    cannot be read, names no tool, has the wrong arguments, raises or runs too long becomes an
    error message to the model, never a crash. (A thread cannot be stopped: a tool that hangs
    keeps its thread until it returns; its result is then ignored.)"""
    if isinstance(call, str):
        return ToolResult("?", f"Error: {call}.", True)
    tool = tools.get(call.name)
    if tool is None:
        return ToolResult(
            call.name,
            f"Error: there is no tool {call.name!r}; the tools are {sorted(tools)}.",
            True,
        )
    try:
        inspect.signature(tool).bind(**call.arguments)
    except TypeError as err:
        return ToolResult(call.name, f"Error: wrong arguments for {call.name}: {err}.", True)
    future = pool.submit(tool, **call.arguments)
    try:
        value = future.result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        return ToolResult(
            call.name, f"Error: {call.name} did not answer within {timeout:g} s.", True
        )
    except Exception as err:  # the tool's own failure is the model's information, not a crash
        return ToolResult(call.name, f"Error: {call.name} raised {type(err).__name__}: {err}", True)
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if len(text) > MAX_RESULT_CHARS:
        text = text[:MAX_RESULT_CHARS] + f"... [cut: {len(text)} characters in all]"
    return ToolResult(call.name, text, False)
