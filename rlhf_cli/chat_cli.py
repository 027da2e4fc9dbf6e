"""`rlhf chat`: talk to a policy (or the raw base) with its chat template, tokens streamed.

    rlhf chat policy=runs/dpo/final                               # interactive, multi-turn
    rlhf chat policy=runs/dpo/final prompt="Capital of Kenya?"    # one answer to stdout
    echo "Capital of Kenya?" | rlhf chat policy=runs/dpo/final     # the prompt from stdin
    rlhf chat policy=runs/grpo/final tools=[rlhf_cli.envs.calculator:calculate]   # tool mode

The conversation is rendered exactly as training rendered it (chat.render: the template, its
variables, merge_system, as the checkpoint saved them) and sampled as `rlhf eval` and `rlhf sample`
sample (softmax(logits / T), top_k 0, top_p 1; greedy at temperature 0; stop at the model's
end-of-turn tokens). In tool mode (`tools=`) the model's tool calls are read, run and answered
as in an RL environment (rlhf_cli.envs.tools: the same schemas, call protocol, result messages,
errors and timeouts), until a reply without a call answers the user. Not a Hydra stage: it writes
nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from rlhf_cli.schema import ChatConfig, UserError

COMMANDS_HELP = "/system TEXT (a new system message; starts over), /reset, /temperature X, /quit"
PROMPT = "you> "
VERBATIM = ("prompt", "system")


def parse_command_line(argv: list[str]) -> ChatConfig:
    """key=value (and config=FILE or a preset) as for the stages, composed with configs/chat.yaml."""
    from rlhf_cli.cli.args import build_overrides, group_options, split_argv
    from rlhf_cli.compose import stage_config

    # free text is taken as typed, not through Hydra's override grammar (quotes, colons, commas)
    verbatim = {k: a.split("=", 1)[1] for a in argv for k in VERBATIM if a.startswith(f"{k}=")}
    rest = [a for a in argv if not a.startswith(tuple(f"{k}=" for k in VERBATIM))]
    flags, overrides, config_file = split_argv(rest)
    if flags:
        raise UserError(f"rlhf chat takes key=value settings only, not {' '.join(flags)}.")
    config = stage_config("chat", build_overrides(config_file, overrides, group_options()))
    for key, value in verbatim.items():
        setattr(config, key, value)
    return config


def load(config: ChatConfig):
    """(model, tokenizer): the policy's adapter on its base (or the raw base), frozen."""
    from rich.console import Console

    from rlhf_cli import checkpoint, modeling
    from rlhf_cli.lineage import POLICY_STAGES, check_same_base, inherit_base_model
    from rlhf_cli.policies import load_model

    console = Console(stderr=True, highlight=False)  # stdout is the answer
    manifest = None
    if config.policy:
        manifest = checkpoint.check_parent(config.policy, "chat", POLICY_STAGES, "policy")
        inherit_base_model(config, manifest, console, "policy")
    device = modeling.resolve_device(config.device)
    tokenizer = modeling.load_tokenizer(config.model, path=config.policy)
    if manifest:
        check_same_base(config, manifest, tokenizer, config.policy, "policy")
    model, _ = load_model(config, tokenizer, device, None)
    return model, tokenizer


class Tools:
    """Tool mode: the functions, their schemas and how this template takes them."""

    def __init__(self, config: ChatConfig, tokenizer):
        from rlhf_cli import chat
        from rlhf_cli.envs import tools as toolkit
        from rlhf_cli.scoring import load_reward_fn

        self.functions = {}
        for spec in config.tools:
            fn = load_reward_fn(spec, "tools")
            self.functions[fn.__name__] = fn
        self.schemas = toolkit.tool_schemas(list(self.functions.values()), "tools")
        self.in_template = chat.takes_tools(tokenizer)  # else: told in the system message
        self.tool_role = chat.takes_tool_role(tokenizer)
        self.timeout = config.tool_timeout

    def opening(self, messages: list[dict]) -> list[dict]:
        from rlhf_cli import episodes
        from rlhf_cli.envs import tools as toolkit

        if self.in_template:
            return messages
        return episodes.with_instructions(messages, toolkit.tool_instructions(self.schemas))

    def answer(self, text: str, out) -> list[dict]:
        """The tool messages answering the calls in `text` ([] when it calls nothing); each call
        and its result shown on `out`."""
        import concurrent.futures

        from rlhf_cli import episodes
        from rlhf_cli.envs import tools as toolkit

        calls = toolkit.parse_tool_calls(text)
        if not calls:
            return []
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            results = [toolkit.run_tool(self.functions, c, self.timeout, pool) for c in calls]
            pool.shutdown(wait=False, cancel_futures=True)
        for result in results:
            out.write(f"[tool {result.name}] {result.text}\n")
        return episodes.tool_messages(results, self.tool_role)


def respond(model, tokenizer, messages: list[dict], config: ChatConfig, out, tools) -> None:
    """The assistant's answer appended to `messages`: one reply, or in tool mode replies and
    tool results until a reply calls nothing (at most config.tool_rounds rounds of calls)."""
    for _ in range(config.tool_rounds + 1):
        text = reply(model, tokenizer, messages, config, out, tools)
        messages.append({"role": "assistant", "content": text})
        answers = tools.answer(text, out) if tools else []
        if not answers:
            return
        messages += answers
    out.write(f"(stopped after {config.tool_rounds} rounds of tool calls: tool_rounds)\n")


def reply(model, tokenizer, messages: list[dict], config: ChatConfig, out, tools=None) -> str:
    """Generate the assistant's next turn, writing its text to `out` as it comes; returns it."""
    from transformers.generation.streamers import BaseStreamer

    from rlhf_cli import chat
    from rlhf_cli.rollout import plain_generate, stop_token_ids

    class Printer(BaseStreamer):
        """Writes the decoded text as tokens arrive (the whole reply decoded each time, the new
        characters written: a word split over tokens comes out whole)."""

        def __init__(self):
            self.tokens: list[int] = []
            self.shown = ""
            self.prompt_seen = False

        def put(self, value):
            if not self.prompt_seen:  # generate() first hands over the prompt
                self.prompt_seen = True
                return
            self.tokens += value.flatten().tolist()
            text = tokenizer.decode(self.tokens, skip_special_tokens=True)
            if text.startswith(self.shown) and not text.endswith("\ufffd"):
                out.write(text[len(self.shown) :])
                out.flush()
                self.shown = text

        def end(self):
            pass

    schemas = tools.schemas if tools and tools.in_template else None
    text = chat.render(tokenizer, messages, add_generation_prompt=True, tools=schemas)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids], device=next(model.parameters()).device)
    printer = Printer()
    output = plain_generate(
        model, tokenizer, ids, torch.ones_like(ids), config.max_new_tokens, config.temperature,
        stop_token_ids(model, tokenizer), streamer=printer,
    )  # fmt: skip
    text = tokenizer.decode(output[0, ids.size(1) :], skip_special_tokens=True)
    if text.startswith(printer.shown):
        out.write(text[len(printer.shown) :])
    out.write("\n")
    out.flush()
    return text.strip()


def opening(config: ChatConfig, tools=None) -> list[dict]:
    messages = [{"role": "system", "content": config.system}] if config.system else []
    return tools.opening(messages) if tools else messages


def interactive(model, tokenizer, config: ChatConfig, tools=None) -> None:
    """The terminal chat: a line a turn, commands starting with /."""
    import readline  # noqa: F401  (line editing and history for input())

    print(f"chatting with {config.policy or config.model.name_or_path}; {COMMANDS_HELP}")
    messages = opening(config, tools)
    while True:
        try:
            line = input(PROMPT)
        except EOFError:
            print()
            return
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, argument = text.partition(" ")
            if command in ("/quit", "/exit"):
                return
            if command == "/reset":
                messages = opening(config, tools)
                print("(the conversation starts over)")
            elif command == "/system":
                config.system = argument.strip() or None
                messages = opening(config, tools)
                print(f"(system message {'set' if config.system else 'removed'}; starting over)")
            elif command == "/temperature":
                try:
                    value = float(argument)
                    if value < 0:
                        raise ValueError
                except ValueError:
                    print(f"(/temperature takes a number >= 0, not {argument.strip()!r})")
                    continue
                config.temperature = value
                print(f"(temperature {value:g}{': greedy' if value == 0 else ''})")
            else:
                print(f"(unknown command {command}; {COMMANDS_HELP})")
            continue
        messages.append({"role": "user", "content": text})
        respond(model, tokenizer, messages, config, sys.stdout, tools)


def main(argv: list[str]) -> None:
    """`rlhf chat ...`: exit 0 when done, 2 on bad input, 130 on Ctrl-C."""
    if {"--help", "-h"} & set(argv):
        from importlib import resources

        defaults = Path(str(resources.files("rlhf_cli.configs"))) / "chat.yaml"
        print(f"{__doc__.strip()}\n\nsettings (defaults):\n{defaults.read_text()}")
        return
    try:
        config = parse_command_line(argv)
        torch.manual_seed(config.seed)
        one_shot = config.prompt is not None or not sys.stdin.isatty()
        prompt = (
            config.prompt if config.prompt is not None else (sys.stdin.read() if one_shot else "")
        )
        if one_shot and not prompt.strip():
            raise UserError("the prompt is empty; give prompt=TEXT or text on stdin.")
        model, tokenizer = load(config)
        tools = Tools(config, tokenizer) if config.tools else None
    except UserError as err:
        print(f"rlhf chat: error: {err}", file=sys.stderr)
        sys.exit(2)
    try:
        if one_shot:
            messages = [*opening(config, tools), {"role": "user", "content": prompt.strip()}]
            respond(model, tokenizer, messages, config, sys.stdout, tools)
        else:
            interactive(model, tokenizer, config, tools)
    except KeyboardInterrupt:
        print()
        sys.exit(130)
