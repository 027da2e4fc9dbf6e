"""Every config-level check, before Hydra starts a run (no torch, no model): compose the config the
way Hydra will for every value of a sweep, type and validate it (schema.build_config), check the
launcher/sweeper plugins and the output folders. A mistake raises `UserError` (one sentence)."""

from __future__ import annotations

import math
from pathlib import Path

from omegaconf import DictConfig

from rlhf_cli import checkpoint
from rlhf_cli.compose import compose
from rlhf_cli.schema import ConfigError, MissingValue, UserError, build_config

# The stages whose run returns an `objective` metric (what sweeper=optuna optimises).
STAGES_WITH_OBJECTIVE = ("sft", "reward", "dpo", "kto", "ppo", "grpo")


def _sweep_variants(overrides: list[str], multirun: bool, sweeper: str | None) -> list[list[str]]:
    """One override list per value of each sweep (others at their first value): enough to check
    every value the sweep will use without composing the whole cross product. An Optuna range
    (interval(a,b)) is checked at both ends."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import IntervalSweep

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as err:
        raise ConfigError(f"could not parse the command line: {_first_line(err)}.") from None
    firsts, choices = [], []
    for item in parsed:
        key = item.get_key_element()
        if item.is_sweep_override() and not multirun:
            raise ConfigError(
                f"{item.input_line.lstrip('+')} is a sweep; add -m to run one job per value "
                "(or quote a value that contains commas)."
            )
        if (
            item.is_sweep_override()
            and sweeper == "optuna"
            and isinstance(item.value(), IntervalSweep)
        ):
            values = [f"{key}={item.value().start}", f"{key}={item.value().end}"]
        elif item.is_sweep_override():
            try:
                values = [f"{key}={v}" for v in item.sweep_string_iterator()]
            except Exception as err:  # e.g. interval(...) needs a sweeper plugin
                raise ConfigError(
                    f"{item.input_line.lstrip('+')}: {_first_line(err)}; the basic sweeper takes value "
                    "lists (ranges need sweeper=optuna)."
                ) from None
        else:
            values = [item.input_line]
        firsts.append(values[0])
        choices.append(values)
    variants = [firsts]
    for i, values in enumerate(choices):
        for value in values[1:]:
            variants.append(firsts[:i] + [value] + firsts[i + 1 :])
    return variants


# Config groups served by Hydra plugins (the `cluster` extra): (group, option) -> plugin package.
PLUGIN_GROUPS = {
    ("launcher", "slurm"): ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    ("launcher", "local"): ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
    ("sweeper", "optuna"): ("hydra_plugins.hydra_optuna_sweeper", "hydra-optuna-sweeper"),
}


def _chosen_plugins(stage: str, overrides: list[str], multirun: bool) -> dict[str, str]:
    """{group: option} for the launcher/sweeper chosen on the command line, after checking that the
    plugin behind each is installed and that it is used the way it can be."""
    import importlib.util

    chosen = {}
    for override in overrides:
        group, _, option = override.partition("=")
        if (group, option) in PLUGIN_GROUPS:
            module, package = PLUGIN_GROUPS[group, option]
            if importlib.util.find_spec(module) is None:
                raise ConfigError(
                    f"{group}={option} needs the {package} plugin, which is not installed; install it "
                    "with: pip install 'rlhf-cli[cluster]'."
                )
            chosen[group] = option
    if chosen and not multirun:
        names = " ".join(f"{g}={o}" for g, o in chosen.items())
        raise ConfigError(f"{names} applies to a sweep; add -m (e.g. rlhf {stage} -m {names} ...).")
    if chosen.get("sweeper") and stage not in STAGES_WITH_OBJECTIVE:
        raise ConfigError(
            f"sweeper=optuna optimises a training run's objective; the {stage} stage has none "
            f"(use it with {', '.join(STAGES_WITH_OBJECTIVE)})."
        )
    return chosen


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0].rstrip(".") if text else type(err).__name__


def validate_overrides(
    stage: str, overrides: list[str], multirun: bool = False, printing: bool = False
) -> tuple[list[str], list[str]]:
    """Check every value the run (or sweep) will use, then the output folder: it can be created, and
    it does not hold a finished run (nor, for a sweep, all of its jobs finished). All of this before
    Hydra creates the folder and writes its .hydra/ record into it. Returns the overrides to give
    Hydra (a swept key that the config already has loses its `++`, so that a sweeper reports it by
    its plain name: `optim.lr`, not `++optim.lr`) and the values a run would need that the config
    leaves unset. `printing` (--cfg: nothing runs): an unset value is reported, not an error."""
    plugins = _chosen_plugins(stage, overrides, multirun or printing)
    variants = _sweep_variants(overrides, multirun, plugins.get("sweeper"))
    composed = [compose(stage, variant) for variant in variants]
    if printing:
        return overrides, missing_values(stage, composed[0])
    configs = [build_config(stage, cfg) for cfg in composed]
    jobs = _job_count(stage, overrides, variants[0], plugins.get("sweeper")) if multirun else 1
    for config in configs:  # every value is checked before the output folders are
        if plugins.get("sweeper"):
            config.objective.check_measured(config.data)
        checkpoint.check_can_create(config.output_dir)
        if stage == "export":  # its folder is the model itself: its own rule
            from rlhf_cli.stages.export import check_output_dir

            check_output_dir(Path(config.output_dir), config.overwrite)
        else:
            checkpoint.refuse_finished_run(config.output_dir, config.overwrite)
        if multirun:
            checkpoint.refuse_finished_sweep(config.output_dir, config.overwrite, jobs)
    return [_plain_sweep_key(o, composed[0]) for o in overrides], []


def missing_values(stage: str, cfg: DictConfig) -> list[str]:
    """For --cfg and --help, which print a config without running it: the sentence saying what a
    run would still need (empty when nothing is missing). Other mistakes stay errors."""
    try:
        build_config(stage, cfg)
    except MissingValue as missing:
        return [str(missing)]
    return []


def _job_count(stage: str, overrides: list[str], first: list[str], sweeper: str | None) -> int:
    """How many jobs a sweep runs: Optuna's n_trials, or the product of the value lists."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if sweeper == "optuna":  # `first`: the sweep's first job, which carries the sweeper settings
        return int(compose(stage, first, hydra_node=True).hydra.sweeper.n_trials)
    parsed = OverridesParser.create().parse_overrides(overrides)
    return math.prod(len(list(o.sweep_string_iterator())) for o in parsed if o.is_sweep_override())


def _plain_sweep_key(override: str, cfg: DictConfig) -> str:
    if not override.startswith("++") or "=" not in override:
        return override
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    key = override[2:].split("=", 1)[0]
    parsed = OverridesParser.create().parse_override(override)
    exists = OmegaConf.select(cfg, key, default=_ABSENT) is not _ABSENT
    return override[2:] if parsed.is_sweep_override() and exists else override


_ABSENT = object()


def missing_for_help(stage: str, overrides: list[str]) -> list[str]:
    """--help prints the stage's config whatever the command line holds; a value a run would still
    need is named after it. A command line that does not compose is left to Hydra's help."""
    try:
        return missing_values(stage, compose(stage, overrides))
    except UserError:
        return []
