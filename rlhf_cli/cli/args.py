"""The command line, before anything runs (no torch): argv -> stage, flags and overrides, a
`config=` file or preset turned into overrides, the shipped config groups and presets, `rlhf --help`.

    rlhf <stage> [config=FILE|PRESET] [key=value ...] [-m|--multirun] [--cfg job] [--help]

`config=FILE` is a plain YAML file (or the name of a shipped preset in configs/presets/). It is turned
into Hydra overrides placed before the command-line ones, so the precedence is
stage defaults < config file < command line. Flags may appear anywhere; they are moved to the front.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any

from rlhf_cli.schema import UserError

STAGES: dict[str, str] = {
    "sft": "supervised fine-tuning of a LoRA adapter on demonstrations (messages or prompt/completion)",
    "reward": "a Bradley-Terry reward model (LoRA adapter + scalar head) on preference pairs",
    "dpo": "direct preference optimisation (sigmoid, ipo, hinge, robust, simpo; orpo without SFT)",
    "kto": "KTO on unpaired good/bad feedback (or pairs split into rows) against a frozen reference",
    "ppo": "PPO with policy, reference, value and reward adapters on one base model",
    "grpo": "critic-free RL on groups of samples: GRPO, Dr. GRPO, DAPO, RLOO, REINFORCE++, GSPO",
    "eval": "held-out gold score (95% interval), reward score, KL, length, perplexity, win rates",
    "sample": "k candidate responses per prompt from a checkpoint (or two, A/B) -> a pairs file",
    "export": "a run's adapter merged into its base: a standalone transformers model (policy or reward)",
}


# Commands that are not Hydra stages (no run folder): the module's main(argv) runs them.
COMMANDS: dict[str, tuple[str, str]] = {
    "label": (
        "rlhf_cli.labeling",
        "label a pairs file at the terminal (or with judge=) -> preference pairs; --stats",
    ),
    "plot": ("rlhf_cli.plots", "training curves of runs (metrics.jsonl), overlaid, as a PNG"),
    "chat": (
        "rlhf_cli.chat_cli",
        "talk to a policy (or the base) at the terminal; prompt= for scripts",
    ),
}


PLANNED: dict[str, str] = {}  # commands announced in --help before they exist


# Hydra flags that take a value as the next argument.
_FLAGS_WITH_VALUE = {
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
    "--shell-completion",
    "-sc",
}


_INFO_CHOICES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


NO_VALIDATION_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc"}


# Groups where a value that is not a shipped option is taken as a path / hub id.
_PATH_GROUPS = {"model": "name_or_path", "data": "path", "env": "name"}


def _configs_dir() -> Path:
    return Path(str(resources.files("rlhf_cli.configs")))


def group_options() -> dict[str, list[str]]:
    """Shipped config groups and their options, read from the packaged configs/ folder."""
    groups = {}
    for sub in sorted(_configs_dir().iterdir()):
        if sub.is_dir() and sub.name not in ("presets", "common", "base", "__pycache__"):
            groups[sub.name] = sorted(p.stem for p in sub.glob("*.yaml"))
    return groups


def presets() -> list[str]:
    return sorted(p.stem for p in (_configs_dir() / "presets").glob("*.yaml"))


def _format_value(value: Any) -> str:
    """A Python value as Hydra override syntax."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_format_value(v)}" for k, v in value.items()) + "}"
    # Hydra unescapes a backslash only before a quote or at the end of a quoted string
    text = re.sub(r"(\\+)(?='|$)", lambda run: run.group(1) * 2, str(value)).replace("'", "\\'")
    return f"'{text}'"


def _flatten(node: dict, prefix: str, groups: dict[str, list[str]]) -> list[str]:
    overrides = []
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if not prefix and key in groups and isinstance(value, str):
            overrides.append(_group_override(key, value, groups))
        elif isinstance(value, dict) and value:
            overrides += _flatten(value, f"{dotted}.", groups)
        else:
            overrides.append(f"++{dotted}={_format_value(value)}")
    return overrides


def _group_override(group: str, value: str, groups: dict[str, list[str]]) -> str:
    if value in groups[group] or group not in _PATH_GROUPS:
        return f"{group}={value}"
    return f"++{group}.{_PATH_GROUPS[group]}={_format_value(value)}"


def config_file_overrides(spec: str, groups: dict[str, list[str]]) -> list[str]:
    """`config=SPEC` -> overrides. SPEC is a YAML path (relative to the cwd) or a preset name."""
    import yaml

    path = Path(spec).expanduser()
    if not path.is_file():
        preset = _configs_dir() / "presets" / f"{spec.removesuffix('.yaml')}.yaml"
        if "/" in spec or not preset.is_file():
            raise UserError(
                f"config={spec}: no such file (looked in {Path.cwd()}) and no shipped preset of that "
                f"name; shipped presets are: {', '.join(presets())}."
            )
        path = preset
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"config={spec}: the file is not UTF-8 text; give a YAML file.") from None
    except Exception as err:  # yaml.YAMLError and friends
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"config={spec} is not valid YAML ({first}); give a YAML mapping of keys."
        ) from None
    if loaded is None:
        return []
    if not isinstance(loaded, dict):
        raise UserError(
            f"config={spec} holds a {type(loaded).__name__}, not a mapping; give keys such as `optim: {{lr: 1e-4}}`."
        )
    _refuse_code_keys(loaded, spec)
    if "defaults" in loaded:
        raise UserError(
            f"config={spec} has a `defaults` list; choose groups with top-level keys instead (e.g. `model: smollm2-135m`)."
        )
    return _flatten(loaded, "", groups)


def _refuse_code_keys(node: Any, spec: str, where: str = "") -> None:
    """A config file is data: it may not configure Hydra itself or name callables to instantiate."""
    if isinstance(node, dict):
        for key, value in node.items():
            if (not where and key == "hydra") or key == "_target_":
                raise UserError(
                    f"config={spec} sets `{where}{key}`, which would run code; a config file may only set "
                    "rlhf's own keys (put Hydra settings on the command line if you need them)."
                )
            _refuse_code_keys(value, spec, f"{where}{key}.")
    elif isinstance(node, list):
        for item in node:
            _refuse_code_keys(item, spec, where)


def drop_overridden_groups(
    file_overrides: list[str], cli_overrides: list[str], groups: dict
) -> list[str]:
    """A group the command line chooses (`data=demo-prefs`) beats the file's choice of that group,
    including a file path or model id given for it (`data: my.jsonl`)."""
    chosen = {
        o.split("=", 1)[0] for o in cli_overrides if "=" in o and o.split("=", 1)[0] in groups
    }
    dropped = tuple(f"{g}=" for g in chosen) + tuple(
        f"++{g}.{_PATH_GROUPS[g]}=" for g in chosen if g in _PATH_GROUPS
    )
    return [o for o in file_overrides if not o.startswith(dropped)]


def build_overrides(
    config: str | None, cli_overrides: list[str], groups: dict[str, list[str]]
) -> list[str]:
    """Hydra overrides for `config=FILE key=value ...`: the file's first, the command line's after."""
    file_overrides = config_file_overrides(config, groups) if config else []
    file_overrides = drop_overridden_groups(file_overrides, cli_overrides, groups)
    return file_overrides + [_rewrite_override(o, groups) for o in cli_overrides]


def _rewrite_override(arg: str, groups: dict[str, list[str]]) -> str:
    """A bare `key=value` for a non-group key becomes `++key=value` so that unknown keys reach
    our schema check (with its "did you mean") instead of Hydra's struct error."""
    if arg.startswith(("+", "~")) or "=" not in arg:
        return arg
    key, value = arg.split("=", 1)
    if key in groups:
        sweep = "," in value
        if value in groups[key] or key not in _PATH_GROUPS or sweep:
            return arg
        return f"++{key}.{_PATH_GROUPS[key]}={value}"
    if key.startswith("hydra.") or key.startswith("hydra/"):
        return arg
    return f"++{arg}"


def split_argv(argv: list[str]) -> tuple[list[str], list[str], str | None]:
    """-> (hydra flags, overrides, config spec). Flags are collected from anywhere on the line."""
    flags, overrides, config = [], [], None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-"):
            flags.append(arg)
            takes_value = arg in _FLAGS_WITH_VALUE or (
                arg in ("--info", "-i") and i + 1 < len(argv) and argv[i + 1] in _INFO_CHOICES
            )
            if takes_value and i + 1 < len(argv):
                flags.append(argv[i + 1])
                i += 1
        elif arg.startswith("config="):
            config = arg.split("=", 1)[1]
        else:
            overrides.append(arg)
        i += 1
    return flags, overrides, config


def print_help() -> None:
    from rich.console import Console
    from rich.markup import escape

    console = Console(soft_wrap=True)
    console.print(
        "[bold]rlhf[/] — SFT, reward model, PPO and DPO on LoRA adapters, driven by Hydra configs.\n"
    )
    console.print(
        escape(
            "usage: rlhf <stage> [config=FILE|PRESET] [key=value ...] [-m|--multirun] [--cfg job] [--help]\n"
        )
    )
    console.print("[bold]stages[/]")
    for name, text in STAGES.items():
        console.print(f"  [cyan]{name:<8}[/] {text}")
    for name, (_, text) in COMMANDS.items():
        console.print(f"  [cyan]{name:<8}[/] {text}")
    for name, text in PLANNED.items():
        console.print(f"  [dim]{name:<8} {text} (not yet available)[/]")
    console.print(f"\n[bold]presets[/] (config=NAME): {', '.join(presets())}")
    console.print("\n`rlhf <stage> --help` lists the stage's config groups and defaults;")
    console.print("`rlhf <stage> --cfg job` prints the composed config without running it.")
