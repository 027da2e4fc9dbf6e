"""Lineage: which base model and parent checkpoint a run comes from, and what its manifest
(final/rlhf_stage.json) records of it. A stage started from a parent takes the parent's base
model and must tokenize as it did (`check_same_base`, by fingerprint)."""

from __future__ import annotations

from pathlib import Path

from rlhf_cli import modeling
from rlhf_cli.schema import DEFAULT_MODEL, StageConfig, UserError, to_container

# the stages whose final/ is a policy (an adapter that answers prompts): what eval, sample and the
# RL stages start from
POLICY_STAGES = ("sft", "dpo", "kto", "ppo", "grpo")


def inherit_base_model(config: StageConfig, parent: dict, console, key: str = "init_from") -> None:
    """A stage started from a checkpoint uses that checkpoint's base model unless the command line
    named another one (which must then have the same fingerprint)."""
    parent_model = parent["config"]["model"]
    if config.model.name_or_path == DEFAULT_MODEL != parent_model["name_or_path"]:
        for name, value in parent_model.items():
            setattr(config.model, name, value)
        console.print(f"model: {config.model.name_or_path} (the base of {key})")


def check_same_base(
    config: StageConfig, parent: dict, tokenizer, init_from: str, key: str = "init_from"
) -> None:
    """Refuse a parent checkpoint trained on another base model or tokenizer, before loading weights."""
    ours = modeling.base_fingerprint(config.model, tokenizer)
    if ours != parent["base_fingerprint"]:
        raise UserError(
            f"{key}={init_from} was trained on {parent['base_model']} (fingerprint "
            f"{parent['base_fingerprint']}), but this run's model is {config.model.name_or_path} "
            f"(fingerprint {ours}): a different architecture or tokenizer; use model.name_or_path="
            f"{parent['base_model']}."
        )


def stage_manifest(
    stage: str,
    config: StageConfig,
    model,
    tokenizer,
    parent: dict | None,
    role: str,
    final_metrics: dict,
    stats: tuple,
    init_from: str | None = None,
    **extra,
) -> dict:
    """The rlhf_stage.json fields every stage writes (checkpoint.save_final adds versions and time)."""
    init_from = init_from or getattr(config, "init_from", None)
    return {
        "stage": stage,
        "base_model": config.model.name_or_path,
        "base_fingerprint": modeling.fingerprint(model.config, tokenizer),
        "parent": {"path": str(Path(init_from).resolve()), "stage": parent["stage"]} if parent else None,
        "adapters": extra.pop("adapters", {"default": {"role": role, "path": "."}}),
        "heads": extra.pop("heads", {}),
        **extra,
        "config": to_container(config),
        "final_metrics": final_metrics,
        "data": {"train": vars(stats[0]), "eval": vars(stats[1])},
    }  # fmt: skip
