"""`rlhf chat`: talk to a policy (or the raw base) with its chat template, tokens streamed.

    rlhf chat policy=runs/dpo/final                               # interactive, multi-turn
    rlhf chat policy=runs/dpo/final prompt="Capital of Kenya?"    # one answer to stdout
    echo "Capital of Kenya?" | rlhf chat policy=runs/dpo/final     # the prompt from stdin

The conversation is rendered exactly as training rendered it (chat.render: the template, its
variables, merge_system, as the checkpoint saved them) and sampled as `rlhf eval` and `rlhf sample`
sample (softmax(logits / T), top_k 0, top_p 1; greedy at temperature 0; stop at the model's
end-of-turn tokens). Not a Hydra stage: it writes nothing.
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


def reply(model, tokenizer, messages: list[dict], config: ChatConfig, out) -> str:
    """Generate the assistant's next turn, writing its text to `out` as it comes; returns it."""
    from transformers.generation.streamers import BaseStreamer

    from rlhf_cli.data import encode_prompt
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

    ids = torch.tensor([encode_prompt(tokenizer, messages)], device=next(model.parameters()).device)
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


def opening(config: ChatConfig) -> list[dict]:
    return [{"role": "system", "content": config.system}] if config.system else []


def interactive(model, tokenizer, config: ChatConfig) -> None:
    """The terminal chat: a line a turn, commands starting with /."""
    import readline  # noqa: F401  (line editing and history for input())

    print(f"chatting with {config.policy or config.model.name_or_path}; {COMMANDS_HELP}")
    messages = opening(config)
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
                messages = opening(config)
                print("(the conversation starts over)")
            elif command == "/system":
                config.system = argument.strip() or None
                messages = opening(config)
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
        messages.append(
            {"role": "assistant", "content": reply(model, tokenizer, messages, config, sys.stdout)}
        )


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
    except UserError as err:
        print(f"rlhf chat: error: {err}", file=sys.stderr)
        sys.exit(2)
    try:
        if one_shot:
            messages = [*opening(config), {"role": "user", "content": prompt.strip()}]
            reply(model, tokenizer, messages, config, sys.stdout)
        else:
            interactive(model, tokenizer, config)
    except KeyboardInterrupt:
        print()
        sys.exit(130)
