"""Composing a stage's config the way Hydra does, without running the stage (and without torch).

    compose("sft", ["optim.lr=1e-4"])         # the DictConfig Hydra would hand the stage
    stage_config("dpo", ["dpo.beta=0.2"])     # the same, typed and validated (schema.build_config)
    saved_config("reward", manifest["config"])  # a checkpoint's settings, typed

Every default lives in the shipped YAML (configs/), so these are the way to get a stage's
defaults in code: the schema's dataclasses hold none.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from rlhf_cli.schema import ConfigError, StageConfig, build_config

CONFIG_MODULE = "rlhf_cli.configs"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0].rstrip(".") if text else type(err).__name__


def compose(stage: str, overrides: list[str], hydra_node: bool = False) -> DictConfig:
    """A stage's composed config, as Hydra would compose it (used by the CLI check, by code that
    needs a stage's defaults, and by tests); with `hydra_node`, Hydra's own settings (launcher,
    sweeper) are included under `hydra`. Inside a running stage (Hydra already initialised with
    the shipped configs) Hydra's state is used as it is; otherwise it is set up and cleared."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    running = GlobalHydra.instance().is_initialized()
    try:
        if running:
            return hydra_compose(stage, overrides=overrides, return_hydra_config=hydra_node)
        with initialize_config_module(CONFIG_MODULE, version_base=None):
            return hydra_compose(
                config_name=stage, overrides=overrides, return_hydra_config=hydra_node
            )
    except Exception as err:
        message = str(err).strip()
        if "Could not find" in message and "Available options" in message:
            head = message.split("Config search path")[0]
            lines = [line.strip() for line in head.splitlines() if line.strip()]
            options = ", ".join(line for line in lines[2:] if line)
            raise ConfigError(f"{lines[0]}; available options are: {options}.") from None
        raise ConfigError(f"invalid override: {_first_line(err)}.") from None
    finally:
        if not running:
            GlobalHydra.instance().clear()


def stage_config(stage: str, overrides: list[str] | tuple[str, ...] = ()) -> StageConfig:
    """The typed config of `rlhf <stage> OVERRIDES` (the shipped defaults under the overrides)."""
    return build_config(stage, compose(stage, list(overrides)))


def saved_config(stage: str, saved: dict[str, Any]) -> StageConfig:
    """The typed config a checkpoint was made with (its manifest's `config`). Keys that a newer
    version added are filled in from today's defaults, so older checkpoints keep loading."""
    defaults = compose(stage, [])
    OmegaConf.set_struct(defaults, False)  # free-form values (chat_template_kwargs) may add keys
    return build_config(stage, OmegaConf.merge(defaults, OmegaConf.create(saved)))
