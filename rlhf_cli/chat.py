"""Chat conversations: message checks, ShareGPT rows, the chat template, and where the assistant
turns are in the rendered text (the SFT loss mask).

    chat.configure(tokenizer, config.model)            # template, its variables, merge_system
    text = chat.render(tokenizer, messages, add_generation_prompt=True)
    text, spans = chat.assistant_spans(tokenizer, messages)   # character spans to train on

Every rendering goes through `render`, so the template's variables (`model.chat_template_kwargs`,
e.g. Qwen3's enable_thinking or Llama 3.2's date_string) and `model.merge_system` apply the same
way in training, in generation and in scoring.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jinja2

from rlhf_cli.schema import ROLES, ModelConfig, UserError

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# ShareGPT's speakers (LLaMA-Factory's sharegpt format) -> roles
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "observation": "tool",
    "tool": "tool",
}


@dataclass
class ChatSettings:
    """How this run renders conversations (kept on the tokenizer: `configure`)."""

    template_kwargs: dict[str, Any] = field(default_factory=dict)
    merge_system: bool = False


def configure(tokenizer, model_cfg: ModelConfig) -> None:
    """Give the tokenizer the chat template and rendering settings `model` asks for."""
    if model_cfg.chat_template:
        tokenizer.chat_template = (
            CHATML_TEMPLATE if model_cfg.chat_template == "chatml" else model_cfg.chat_template
        )
    tokenizer.rlhf_chat = ChatSettings(
        dict(model_cfg.chat_template_kwargs or {}), bool(model_cfg.merge_system)
    )


def settings(tokenizer) -> ChatSettings:
    return getattr(tokenizer, "rlhf_chat", None) or ChatSettings()


# ---------------------------------------------------------------- messages
def check_messages(value: Any, where: str, roles: tuple[str, ...] = ROLES) -> list[dict]:
    """A non-empty list of {role, content} messages whose roles the template takes."""
    if not isinstance(value, list) or not value:
        raise UserError(
            f"{where} must be a non-empty list of {{role, content}} messages, got {type(value).__name__}."
        )
    for i, message in enumerate(value):
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or not isinstance(message.get("content"), str)
        ):
            raise UserError(
                f"{where} message {i} must be an object with string `role` and `content`."
            )
        if message["role"] not in roles:
            raise UserError(
                f"{where} message {i} has the role {message['role']!r}; the roles accepted are "
                f"{', '.join(roles)} (a template that takes more: data.extra_roles=[...])."
            )
    return value


def from_sharegpt(value: Any, where: str, roles: tuple[str, ...] = ROLES) -> list[dict]:
    """ShareGPT turns ({from, value}, speakers human/gpt/system) as {role, content} messages."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise UserError(
            f"{where} must be a non-empty list of {{from, value}} turns, got {type(value).__name__}."
        )
    messages = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise UserError(f"{where} turn {i} must be an object with string `from` and `value`.")
        speaker = turn.get("from")
        role = None
        if isinstance(speaker, str):
            role = SHAREGPT_ROLES.get(speaker, speaker if speaker in roles else None)
        if role is None:
            raise UserError(
                f"{where} turn {i} is from {speaker!r}; the speakers accepted are "
                f"{', '.join(SHAREGPT_ROLES)} (or a role of data.extra_roles)."
            )
        messages.append({"role": role, "content": turn["value"]})
    return check_messages(messages, where, roles)


def _merged_system(messages: list[dict]) -> list[dict]:
    """A leading system message folded into the first user turn ("<system>\\n\\n<user>"), for
    templates that take no system role (Gemma 2) or place it where training cannot follow
    (Mistral v0.3 writes it only into a final user turn)."""
    if len(messages) > 1 and messages[0]["role"] == "system" and messages[1]["role"] == "user":
        first = {**messages[1], "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}
        return [first, *messages[2:]]
    return messages


# ---------------------------------------------------------------- rendering
def render(
    tokenizer, messages: list[dict], add_generation_prompt: bool = False,
    tools: list[dict] | None = None,
) -> str:  # fmt: skip
    """The conversation as the chat template writes it (with this run's template variables), with
    the JSON schemas of `tools` where the template renders them (`takes_tools`)."""
    if not tokenizer.chat_template:
        raise UserError(
            "the data is in chat format but the tokenizer has no chat template; set model.chat_template=chatml "
            "(or a Jinja template string)."
        )
    chat = settings(tokenizer)
    if chat.merge_system:
        messages = _merged_system(messages)
    try:
        text = tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **({"tools": tools} if tools else {}),
            **chat.template_kwargs,
        )
    except jinja2.TemplateError as err:
        hint = (
            " This template may take no system role: set model.merge_system=true to fold a system "
            "message into the first user turn."
            if any(m["role"] == "system" for m in messages) and not chat.merge_system
            else ""
        )
        raise UserError(
            f"the chat template failed to render ({type(err).__name__}: {err}); fix model.chat_template "
            f"or the data.{hint}"
        ) from None
    return text if isinstance(text, str) else str(text)


def turn_end_id(tokenizer) -> int | None:
    """The special token the chat template closes an assistant turn with (ChatML's <|im_end|>,
    Llama 3's <|eot_id|>, Gemma's <end_of_turn>, Mistral's </s>): where generation must stop,
    whatever the model's own EOS is (a base model given model.chat_template=chatml keeps
    <|endoftext|> as EOS). None without a template, or where the turn closes in plain text."""
    if not tokenizer.chat_template:
        return None
    reply = _marker(0)
    try:
        text = render(
            tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}]
        )
    except UserError:
        return None
    after = text.split(reply, 1)[1].lstrip() if reply in text else ""
    specials = set(tokenizer.all_special_tokens) | set(
        getattr(tokenizer, "added_tokens_encoder", {})
    )
    closing = [token for token in specials if token and after.startswith(token)]
    if not closing:
        return None
    return tokenizer.convert_tokens_to_ids(max(closing, key=len))


# ---------------------------------------------------------------- episodes, turn by turn
def takes_tools(tokenizer) -> bool:
    """The chat template renders `tools=` itself (Qwen2.5, Qwen3, Llama 3.1/3.2, Mistral v0.3);
    other templates are told about tools in a system message (rlhf_cli.envs.tools)."""
    return "tools" in (tokenizer.chat_template or "")


def takes_tool_role(tokenizer) -> bool:
    """The template renders a `tool` message (ChatML writes any role; Gemma 2 raises on roles that
    do not alternate user/assistant, and its tool results then go back as a user message)."""
    content = _marker(7)
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": _marker(1)},
        {"role": "tool", "content": content},
    ]
    try:
        return content in render(tokenizer, messages, add_generation_prompt=True)
    except (UserError, jinja2.TemplateError, TypeError, KeyError):
        return False


def continuation(
    tokenizer, history: list[dict], new: list[dict], sampled_end: str, tools: list[dict] | None
) -> str:
    """The text that follows the policy's last turn when the environment answers with `new`: the
    rest of the template's closing of that turn (after `sampled_end`, the text of the stop token
    the policy sampled, which is already in the episode), the new messages, and the generation
    prompt of the next assistant turn. Found by rendering the conversation with the last turn's
    content replaced by a marker and taking what follows the marker, so that neither the policy's
    tokens nor earlier turns are ever re-rendered (a template that rewrites earlier turns, as
    Qwen3 drops their reasoning, changes nothing here)."""
    marked = [*history[:-1], {"role": "assistant", "content": _marker(0)}, *new]
    text = render(tokenizer, marked, add_generation_prompt=True, tools=tools)
    if _marker(0) not in text:
        raise UserError(
            "the chat template leaves out the assistant's turn once an environment message "
            "follows it; use model.chat_template=chatml."
        )
    after = text.split(_marker(0), 1)[1]
    if sampled_end and after.startswith(sampled_end):
        after = after[len(sampled_end) :]
    return after


# ---------------------------------------------------------------- assistant spans
def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn (its content and the
    text that closes the turn, e.g. `<|im_end|>\\n`), in order: what SFT trains on.

    First by prefixes: turn i spans from the end of render(messages[:i], generation prompt) to the
    end of render(messages[:i+1]), where both are prefixes of the whole rendering (ChatML, Llama 3,
    Gemma 2, Mistral without a system message). Templates that render earlier turns differently
    once later turns follow (Qwen3 drops reasoning from past turns; Phi-3.5 closes a last turn
    differently) are located with markers instead (`_marked_spans`)."""
    full = render(tokenizer, messages)
    spans = _prefix_spans(tokenizer, messages, full)
    return full, spans if spans is not None else _marked_spans(tokenizer, messages, full)


def _prefix_spans(tokenizer, messages: list[dict], full: str) -> list[tuple[int, int]] | None:
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        end = render(tokenizer, messages[: i + 1])
        if not (full.startswith(start) and full.startswith(end)) or len(end) < len(start):
            return None
        spans.append((len(start), len(end)))
    return spans


def _marker(i: int) -> str:
    """A placeholder no template changes and no data contains (Unicode private-use characters)."""
    return f"\ue000{i}\ue001"


def _trimmed(content: str) -> list[str]:
    """The content with some of its leading and trailing whitespace removed, longest first: what a
    template that trims (Llama 3, Gemma 2, Mistral) or strips newlines (Qwen3) writes of it."""
    lead = len(content) - len(content.lstrip())
    trail = len(content) - len(content.rstrip())
    cuts = {content[a : len(content) - b] for a in range(lead + 1) for b in range(trail + 1)}
    return sorted(cuts, key=len, reverse=True)


def _marked_spans(tokenizer, messages: list[dict], full: str) -> list[tuple[int, int]]:
    """Assistant spans from a rendering with every message's content replaced by a marker: the
    markers show where each content sits between the template's own text; the real rendering must
    be that text with each content (possibly trimmed) in place of its marker, or we refuse. An
    assistant span runs from its content (plus the text a final turn's generation prompt leaves to
    the model, e.g. Qwen3's empty think block) to the end of the text closing the turn, cut back
    so that it ends on a special token's boundary."""
    refuse = UserError(
        "the chat template renders earlier turns differently once later turns are added, and its "
        "output could not be matched message by message, so the assistant tokens cannot be located; "
        "use model.chat_template=chatml or the prompt/completion format."
    )
    marked = [{**m, "content": _marker(i)} for i, m in enumerate(messages)]
    skeleton = render(tokenizer, marked)
    dropped = [i for i in range(len(messages)) if _marker(i) not in skeleton]
    if dropped:
        role = messages[dropped[0]]["role"]
        hint = " set model.merge_system=true, or" if role == "system" else ""
        raise UserError(
            f"the chat template leaves out message {dropped[0]} ({role}) of this conversation, "
            f"so the model would never see it in training;{hint} use model.chat_template=chatml."
        )
    order = sorted(range(len(messages)), key=lambda i: skeleton.index(_marker(i)))
    pieces, place = [], 0  # the template's own text before each message
    for i in order:
        at = skeleton.index(_marker(i))
        pieces.append(skeleton[place:at])
        place = at + len(_marker(i))
    pieces.append(skeleton[place:])
    position, spans = 0, {}
    for k, i in enumerate(order):
        if not full.startswith(pieces[k], position):
            raise refuse
        position += len(pieces[k])
        following = pieces[k + 1]
        content = next(
            (
                c
                for c in _trimmed(messages[i]["content"])
                if full.startswith(c, position) and full.startswith(following, position + len(c))
            ),
            None,
        )
        if content is None:
            raise refuse
        if messages[i]["role"] == "assistant":
            spans[i] = _turn_span(tokenizer, marked, i, full, position, position + len(content))
        position += len(content)
    if full[position:] != pieces[-1]:
        raise refuse
    return [spans[i] for i in sorted(spans)]


def _turn_span(
    tokenizer, marked: list[dict], i: int, full: str, start: int, end: int
) -> tuple[int, int]:
    """The span of assistant turn i whose content is full[start:end]."""
    alone = render(tokenizer, marked[: i + 1])  # the turn as the last one
    before, after = alone.split(_marker(i), 1)
    prompt = render(tokenizer, marked[:i], add_generation_prompt=True) if i else ""
    opening = before[len(prompt) :] if before.startswith(prompt) else ""
    if opening and full[:start].endswith(opening):  # text the model itself writes first
        start -= len(opening)
    closing = 0  # the longest start of the closing text that follows here too
    while (
        closing < len(after) and end + closing < len(full) and after[closing] == full[end + closing]
    ):
        closing += 1
    return start, _special_token_boundary(tokenizer, full, end + closing)


def _special_token_boundary(tokenizer, text: str, cut: int) -> int:
    """`cut`, moved back to the start of a special token it would split (e.g. Phi-3.5 closes a last
    turn with <|end|>\\n<|endoftext|> and other turns with <|end|>\\n<|user|>: the common part
    ends inside `<|`)."""
    for token in tokenizer.all_special_tokens + list(
        getattr(tokenizer, "added_tokens_encoder", {})
    ):
        if not token:
            continue
        first = max(0, cut - len(token) + 1)
        at = text.find(token, first, cut + len(token) - 1)
        while at != -1 and at < cut:
            if at + len(token) > cut:
                return _special_token_boundary(tokenizer, text, at)
            at = text.find(token, at + 1, cut + len(token) - 1)
    return cut
