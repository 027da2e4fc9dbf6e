"""The `rlhf` command: argv -> stage, validation, then Hydra runs the stage.

    rlhf --help
    rlhf sft [config=FILE|PRESET] [key=value ...] [-m|--multirun] [--cfg job] [--help]

Everything up to Hydra's start is torch-free (`cli.args`, `cli.validate`): a mistake in the command
line or a config file is one sentence and exit code 2 before any model library is imported. Then
one Hydra app (`task`) runs whichever stage the job is, through `cli.run.run_stage`; the stage's
module (and torch) is imported only then.
"""

from __future__ import annotations

import importlib
import os
import shlex
import signal
import sys

from rlhf_cli.cli.args import (
    COMMANDS,
    NO_VALIDATION_FLAGS,
    PLANNED,
    STAGES,
    build_overrides,
    group_options,
    print_help,
    split_argv,
)
from rlhf_cli.cli.run import COMMAND_ENV
from rlhf_cli.schema import UserError

CONFIG_PATH = "pkg://rlhf_cli.configs"


def task(cfg) -> float | None:
    """The Hydra task of every stage: the job's name is the stage (`launch` sets it)."""
    from hydra.core.hydra_config import HydraConfig

    from rlhf_cli.cli.run import run_stage

    stage = HydraConfig.get().job.name
    module = importlib.import_module(f"rlhf_cli.stages.{stage}")
    return run_stage(stage, cfg, module.train)


def launch(stage: str, flags: list[str], overrides: list[str]) -> None:
    """Hand the validated command line to Hydra (a run, a sweep, --cfg or --help)."""
    import hydra

    sys.argv = [f"rlhf-{stage}", *flags, *overrides, f"hydra.job.name={stage}"]
    hydra.main(config_path=CONFIG_PATH, config_name=stage, version_base=None)(task)()


def versions() -> str:
    """rlhf's version and those of the packages that change its numbers (no import of them)."""
    from importlib import metadata

    found = []
    for name in ("rlhf-cli", "torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found) + "\n(`make versions` compares them with the locked set)"


def _fail(message: str) -> None:
    print(f"rlhf: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    if hasattr(signal, "SIGPIPE"):  # `rlhf sft --help | head` ends quietly
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print_help()
        return
    if argv[0] in ("--version", "-V"):
        print(versions())
        return
    stage, rest = argv[0], argv[1:]
    if stage in COMMANDS:
        importlib.import_module(COMMANDS[stage][0]).main(rest)
        return
    if stage not in STAGES:
        later = f" ({stage} is planned but not yet available)" if stage in PLANNED else ""
        _fail(
            f"unknown stage '{stage}'{later}; available stages: {', '.join([*STAGES, *COMMANDS])}."
        )

    groups = group_options()
    flags, overrides, config = split_argv(rest)
    multirun = bool({"-m", "--multirun"} & set(flags))
    missing: list[str] = []  # what --cfg / --help print a config without (a run needs it)
    try:
        if multirun and {"--cfg", "-c"} & set(flags):
            raise UserError("--cfg prints one composed config; drop -m/--multirun to see it.")
        overrides = build_overrides(config, overrides, groups)
        from rlhf_cli.cli.validate import missing_for_help, validate_overrides

        if not NO_VALIDATION_FLAGS.intersection(flags):
            printing = bool({"--cfg", "-c"} & set(flags))
            overrides, missing = validate_overrides(stage, overrides, multirun, printing)
        elif {"--help", "-h"} & set(flags):
            missing = missing_for_help(stage, overrides)
    except UserError as err:
        _fail(str(err))

    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # internal errors keep their traceback
    # the command as typed, for the resume command printed when a run stops (a launcher's
    # processes inherit it)
    os.environ[COMMAND_ENV] = shlex.join(["rlhf", stage, *rest])
    if os.environ.get("RANK", "0") != "0":  # under torchrun: only rank 0 writes Hydra's record
        overrides.append("hydra.output_subdir=null")
    try:
        launch(stage, flags, overrides)
    finally:  # after the config (Hydra's --help exits), where it is read
        for sentence in missing:
            print(f"rlhf: note: a run needs a value this config leaves unset: {sentence}", file=sys.stderr)  # fmt: skip
