"""What every stage's Hydra entry point does around its own loop.

`run_stage` turns the composed config into the typed schema, fixes the output folder to the one
Hydra made for this job, and turns user mistakes (`UserError`) into one sentence and exit code 2.
`validate_overrides` composes the config the way Hydra will, so the CLI can refuse a bad command
line before Hydra starts (and before any model is loaded).
"""

from __future__ import annotations

import gc
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from rlhf_cli.checkpoint import refuse_finished_run
from rlhf_cli.schema import ConfigError, OptimConfig, StageConfig, UserError, build_config


def _sweep_variants(overrides: list[str]) -> list[list[str]]:
    """One override list per value of each sweep (others at their first value): enough to check
    every value the sweep will use without composing the whole cross product."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as err:
        raise ConfigError(f"could not parse the command line: {_first_line(err)}") from None
    firsts, choices = [], []
    for item in parsed:
        key = item.get_key_element()
        if item.is_sweep_override():
            values = [f"{key}={v}" for v in item.sweep_string_iterator()]
        else:
            values = [item.input_line]
        firsts.append(values[0])
        choices.append(values)
    variants = [firsts]
    for i, values in enumerate(choices):
        for value in values[1:]:
            variants.append(firsts[:i] + [value] + firsts[i + 1 :])
    return variants


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0].rstrip(".") if text else type(err).__name__


def compose(stage: str, overrides: list[str]) -> DictConfig:
    """Compose a stage's config as Hydra would (used by the CLI check and by tests)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("rlhf_cli.configs", version_base=None):
            return hydra_compose(config_name=stage, overrides=overrides)
    except Exception as err:
        message = str(err).strip()
        if "Could not find" in message and "Available options" in message:
            lines = [line.strip() for line in message.splitlines() if line.strip()]
            options = ", ".join(line for line in lines[2:] if line)
            raise ConfigError(f"{lines[0]}; available options are: {options}.") from None
        raise ConfigError(f"invalid override: {_first_line(err)}.") from None
    finally:
        GlobalHydra.instance().clear()


def validate_overrides(stage: str, overrides: list[str], multirun: bool = False) -> None:
    """Check every value the run (or sweep) will use; for a single run, also refuse to write over a
    finished run now, before Hydra writes its .hydra/ record into that folder."""
    for variant in _sweep_variants(overrides):
        config = build_config(stage, compose(stage, variant))
        if not multirun:
            refuse_finished_run(config.output_dir, config.overwrite)


def run_stage(stage: str, cfg: DictConfig, train: Callable[[Any], float | None]) -> float | None:
    """Typed config -> the stage's `train`; user mistakes -> one sentence, exit code 2."""
    from hydra.core.hydra_config import HydraConfig

    try:
        config: StageConfig = build_config(stage, cfg)
        if HydraConfig.initialized():
            config.output_dir = HydraConfig.get().runtime.output_dir
        return train(config)
    except UserError as err:
        print(f"rlhf {stage}: error: {err}", file=sys.stderr)
        sys.exit(2)
    finally:
        release_memory()


def release_memory() -> None:
    """Between the jobs of a sweep (which share one process): free Python and CUDA memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def lr_schedule(
    optimizer, optim: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0, then cosine / linear decay to lr * min_lr_ratio, or constant."""
    warmup = int(optim.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if optim.scheduler == "cosine":
            decay = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        elif optim.scheduler == "linear":
            decay = max(0.0, 1 - progress)
        else:
            decay = 1.0
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * decay

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def run_name(stage: str, config: StageConfig) -> str:
    """{stage}__{model}__{seed}__{time}, as CleanRL names runs."""
    model = Path(config.model.name_or_path.replace(":", "-")).name
    return f"{stage}__{model}__{config.seed}__{int(time.time())}"


CRASH_ENV = "RLHF_TEST_CRASH_AFTER_STEP"


def crash_if_requested(step: int) -> None:
    """Test hook: die abruptly (no cleanup, like a SIGKILL) after `step` when RLHF_TEST_CRASH_AFTER_STEP
    names it; resume tests use it to interrupt a real run."""
    if os.environ.get(CRASH_ENV) == str(step):
        sys.stdout.flush()
        os._exit(86)
