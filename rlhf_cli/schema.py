"""Typed configuration for every stage, and the checks that turn bad values into one sentence.

Each stage's composed Hydra config is merged onto its dataclass here (`build_config`) before any
model is loaded. An unknown key (with a "did you mean"), a value of the wrong type or a value out of
range raises `ConfigError`, which the CLI prints as one sentence and exits with code 2.
"""

from __future__ import annotations

import difflib
import re
import typing
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class UserError(Exception):
    """A mistake the user can fix; printed as one sentence, exit code 2."""


class UserCodeError(Exception):
    """The user's own code (a reward function, a judge) raised: one line saying which, then their
    traceback (their file and line), exit code 1. Not a UserError: the input was fine."""

    def __init__(self, message: str, error: BaseException):
        super().__init__(message)
        self.error = error

    def report(self) -> str:
        """The traceback of the user's code alone: our frames and importlib's are left out."""
        import traceback
        from pathlib import Path

        ours = str(Path(__file__).parent)
        frames = [
            frame
            for frame in traceback.extract_tb(self.error.__traceback__)
            if not frame.filename.startswith((ours, "<frozen"))
        ]
        lines = traceback.format_list(frames)
        lines += traceback.format_exception_only(type(self.error), self.error)
        return "Traceback of your code (most recent call last):\n" + "".join(lines).rstrip()


USER_CODE_EXIT = 1


class ConfigError(UserError):
    """A bad configuration value."""


class MissingValue(ConfigError):
    """A value a run needs and the config leaves unset (`--cfg job` and `--help` still print)."""


_FUNCTION_SPEC = r"[A-Za-z_][\w.]*:[A-Za-z_]\w*"  # package.module:function
SHIPPED_ENVS = {  # env=<name>: the environments that ship with rlhf (rlhf_cli.envs)
    "calculator": "rlhf_cli.envs.calculator:Calculator",
    "guess_number": "rlhf_cli.envs.guess:GuessNumber",
    "gymnasium": "rlhf_cli.envs.gymnasium_env:Gymnasium",
    "verifiers": "rlhf_cli.envs.verifiers_env:Verifiers",
}


def _check(ok: bool, key: str, value: Any, valid: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not valid: {valid}.")


def _a(noun: str) -> str:
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def _one_of(key: str, value: Any, choices: tuple[str, ...]) -> None:
    _check(value in choices, key, value, "choose one of " + ", ".join(choices))


# The dataclasses below declare each key's type and its checks, and hold no values: every default
# lives in the shipped YAML (configs/<stage>.yaml and its groups), the one place a user reads them
# (`rlhf <stage> --cfg job`). A key the YAML forgets is a "missing mandatory value" when the stage
# composes, which tests/test_config.py catches for every stage.

DEFAULT_MODEL = "embedded:smollm2-135m"  # what every stage's YAML picks (test_config checks it)
ROLES = ("system", "user", "assistant", "tool")  # message roles every chat template takes


@dataclass
class ModelConfig:
    name_or_path: str  # hub id, local folder, or embedded:<name>
    revision: str | None  # hub revision (branch, tag or commit)
    trust_remote_code: bool  # runs code from the model repo: turn on only if you trust it
    gradient_checkpointing: Any  # auto (on with CUDA, off on CPU) | true | false
    attn_implementation: str | None  # None = transformers' default (sdpa, or eager for Gemma 2)
    chat_template: str | None  # None = the tokenizer's; "chatml" or a Jinja string replaces it
    chat_template_kwargs: dict[str, Any]  # extra template variables (enable_thinking, date_string)
    merge_system: bool  # fold a system message into the first user turn (templates without one)

    def validate(self, prefix: str) -> None:
        _check(
            bool(self.name_or_path),
            f"{prefix}.name_or_path",
            self.name_or_path,
            "give a hub id or a local folder",
        )
        _check(
            self.gradient_checkpointing in (True, False, "auto"),
            f"{prefix}.gradient_checkpointing",
            self.gradient_checkpointing,
            "use auto (on with CUDA), true or false",
        )


@dataclass
class QuantConfig:
    mode: str  # auto = nf4 on CUDA, none on CPU
    double_quant: bool  # quantize the quantization constants too (~0.4 bit/param saved)
    compute_dtype: str  # auto = bfloat16 on CUDA, float32 on CPU

    def validate(self, prefix: str) -> None:
        _one_of(f"{prefix}.mode", self.mode, ("auto", "nf4", "int8", "none"))
        _one_of(
            f"{prefix}.compute_dtype",
            self.compute_dtype,
            ("auto", "bfloat16", "float16", "float32"),
        )


@dataclass
class LoraConfig:
    r: int
    alpha: float
    dropout: float
    target_modules: Any  # "all-linear" or a list of module names

    def validate(self, prefix: str) -> None:
        _check(self.r >= 1, f"{prefix}.r", self.r, "the LoRA rank must be a positive integer")
        _check(self.alpha > 0, f"{prefix}.alpha", self.alpha, "it must be greater than 0")
        _check(0 <= self.dropout < 1, f"{prefix}.dropout", self.dropout, "it must be in [0, 1)")
        tm = self.target_modules
        ok = tm == "all-linear" or (
            isinstance(tm, (list, tuple, ListConfig))
            and len(tm) > 0
            and all(isinstance(x, str) for x in tm)
        )
        _check(
            ok,
            f"{prefix}.target_modules",
            tm,
            'use "all-linear" or a list of module names such as [q_proj, v_proj]',
        )


@dataclass
class ColumnsConfig:
    messages: str
    conversations: str  # ShareGPT: a list of {from, value}
    prompt: str
    completion: str
    chosen: str
    rejected: str
    margin: str  # optional per-pair margin for the reward loss
    label: str  # unpaired feedback (rlhf kto): true = desirable, false = undesirable


@dataclass
class DataConfig:
    path: str  # shipped name, local .json/.jsonl/.parquet file, or hub dataset id
    subset: str | None  # hub dataset configuration name
    split: str
    eval_path: str | None  # a separate local file for the held-out split
    eval_split: str | None  # a hub split for the held-out set; None = hold out eval_size
    eval_size: float  # fraction (<1) or number of rows held out when no eval split is given
    format: str  # auto | messages | sharegpt | prompt_completion
    columns: ColumnsConfig
    extra_roles: list[
        str
    ]  # message roles beyond system/user/assistant/tool that the template takes
    max_length: int  # tokens per example (and per packed row)
    truncation: str  # truncate: cut to max_length | drop: skip longer examples
    packing: bool  # several examples per row; no attention across them
    group_by_length: bool  # batches of similar-length rows (less padding); false = random
    max_rows: int | None  # use only the first N training rows (quick experiments)

    @property
    def held_out(self) -> bool:
        return bool(self.eval_path or self.eval_split or self.eval_size > 0)

    @property
    def roles(self) -> tuple[str, ...]:
        return (*ROLES, *self.extra_roles)

    def validate(self, prefix: str) -> None:
        _check(
            bool(self.path),
            f"{prefix}.path",
            self.path,
            "give a shipped name, a local file or a hub id",
        )
        _one_of(
            f"{prefix}.format", self.format, ("auto", "messages", "sharegpt", "prompt_completion")
        )
        _one_of(f"{prefix}.truncation", self.truncation, ("truncate", "drop"))
        _check(
            self.max_length >= 8,
            f"{prefix}.max_length",
            self.max_length,
            "it must be at least 8 tokens",
        )
        _check(
            self.eval_size >= 0,
            f"{prefix}.eval_size",
            self.eval_size,
            "use a fraction in [0, 1) or a row count",
        )
        _check(
            self.eval_size < 1 or float(self.eval_size).is_integer(),
            f"{prefix}.eval_size",
            self.eval_size,
            "use a fraction in [0, 1) or a whole number of rows",
        )
        _check(
            self.max_rows is None or self.max_rows > 0,
            f"{prefix}.max_rows",
            self.max_rows,
            "it must be positive",
        )
        _check(
            all(isinstance(r, str) and r.strip() for r in self.extra_roles),
            f"{prefix}.extra_roles",
            list(self.extra_roles),
            "give a list of role names, e.g. [ipython]",
        )


@dataclass
class OptimConfig:
    lr: float
    weight_decay: float
    betas: list[float]
    eps: float
    scheduler: str  # cosine | linear | constant (all after warmup)
    warmup_ratio: float  # share of the steps spent warming up linearly from 0
    min_lr_ratio: float  # the schedule decays to lr * min_lr_ratio
    max_grad_norm: float  # clip the global gradient norm; 0 = no clipping

    def validate(self, prefix: str) -> None:
        _check(self.lr > 0, f"{prefix}.lr", self.lr, "the learning rate must be greater than 0")
        _check(
            self.weight_decay >= 0, f"{prefix}.weight_decay", self.weight_decay, "it must be >= 0"
        )
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"{prefix}.betas",
            list(self.betas),
            "give two numbers in [0, 1), e.g. [0.9, 0.999]",
        )
        _check(self.eps > 0, f"{prefix}.eps", self.eps, "it must be greater than 0")
        _one_of(f"{prefix}.scheduler", self.scheduler, ("cosine", "linear", "constant"))
        _check(
            0 <= self.warmup_ratio < 1,
            f"{prefix}.warmup_ratio",
            self.warmup_ratio,
            "it must be in [0, 1)",
        )
        _check(
            0 <= self.min_lr_ratio <= 1,
            f"{prefix}.min_lr_ratio",
            self.min_lr_ratio,
            "it must be in [0, 1]",
        )
        _check(
            self.max_grad_norm >= 0,
            f"{prefix}.max_grad_norm",
            self.max_grad_norm,
            "it must be >= 0 (0 = off)",
        )


@dataclass
class TrainConfig:
    batch_size: int  # rows per micro-batch (one forward pass)
    grad_accum: int  # micro-batches per optimizer step
    epochs: float  # passes over the training rows (ignored when max_steps is set)
    max_steps: int | None  # optimizer steps; overrides epochs
    log_every: int  # optimizer steps between metric lines
    eval_every: int  # optimizer steps between eval losses (0 = only at the end)
    save_every: int  # optimizer steps between resume checkpoints (0 = never)
    keep_last: int  # resume checkpoints kept on disk
    max_nonfinite: int  # updates in a row with a non-finite loss or gradient before the run stops

    def validate(self, prefix: str) -> None:
        for name in ("batch_size", "grad_accum", "log_every", "max_nonfinite"):
            value = getattr(self, name)
            _check(value >= 1, f"{prefix}.{name}", value, "it must be a positive integer")
        for name in ("eval_every", "save_every"):
            value = getattr(self, name)
            _check(value >= 0, f"{prefix}.{name}", value, "it must be >= 0 (0 = off)")
        _check(
            self.keep_last >= 1, f"{prefix}.keep_last", self.keep_last, "keep at least 1 checkpoint"
        )
        _check(self.epochs > 0, f"{prefix}.epochs", self.epochs, "it must be greater than 0")
        _check(
            self.max_steps is None or self.max_steps >= 1,
            f"{prefix}.max_steps",
            self.max_steps,
            "it must be >= 1",
        )


@dataclass
class WandbConfig:
    project: str
    entity: str | None
    name: str | None  # None = {stage}__{model}__{seed}__{time}
    mode: str  # online | offline | disabled
    tags: list[str]

    def validate(self, prefix: str) -> None:
        _one_of(f"{prefix}.mode", self.mode, ("online", "offline", "disabled"))


@dataclass
class LoggerConfig:
    backend: str  # console | wandb | tensorboard (metrics.jsonl is always written)
    wandb: WandbConfig | None  # logger=wandb's settings (null for the other backends)

    def validate(self, prefix: str) -> None:
        _one_of(f"{prefix}.backend", self.backend, ("console", "wandb", "tensorboard"))
        if self.backend == "wandb" and self.wandb is None:
            raise ConfigError(
                f"{prefix}.backend=wandb needs the {prefix}.wandb settings; choose logger=wandb "
                "(the group) rather than setting logger.backend alone."
            )
        if self.wandb is not None:
            self.wandb.validate(f"{prefix}.wandb")


@dataclass
class SamplesConfig:
    num_prompts: int  # held-out prompts generated before and after training (0 = off)
    max_new_tokens: int
    temperature: float  # 0 = greedy

    def validate(self, prefix: str) -> None:
        _check(self.num_prompts >= 0, f"{prefix}.num_prompts", self.num_prompts, "it must be >= 0")
        _check(
            self.max_new_tokens >= 1,
            f"{prefix}.max_new_tokens",
            self.max_new_tokens,
            "it must be >= 1",
        )
        _check(self.temperature >= 0, f"{prefix}.temperature", self.temperature, "it must be >= 0")


@dataclass
class ObjectiveConfig:
    """The final metric (a key of final/rlhf_stage.json's final_metrics) that a stage's run returns to
    Hydra, which a sweeper such as `sweeper=optuna` optimises."""

    metric: str
    direction: str  # minimize | maximize

    def validate(self, prefix: str) -> None:
        _check(bool(self.metric), f"{prefix}.metric", self.metric, "name a final metric")
        _one_of(f"{prefix}.direction", self.direction, ("minimize", "maximize"))

    def check_measured(self, data: DataConfig) -> None:
        """Before a sweep that optimises this metric: an eval/ metric needs held-out data."""
        if self.metric.startswith("eval/") and not data.held_out:
            raise ConfigError(
                f"objective.metric={self.metric} is measured on held-out data, but data.eval_size=0 "
                "holds none out; set data.eval_size (or data.eval_path) or pick a train/ metric."
            )


def _validate_fields(config: Any) -> None:
    """Validate every sub-config; a value left unset is reported after every other mistake (so
    `--cfg job`, which prints a config with an unset value, still refuses a wrong one)."""
    missing = None
    for f in fields(config):
        value = getattr(config, f.name)
        if is_dataclass(value):
            try:
                value.validate(f.name)
            except MissingValue as err:
                missing = missing or err
    if missing is not None:
        raise missing


@dataclass
class StageConfig:
    """Keys every stage has."""

    output_dir: str  # the CLI replaces it with the folder Hydra made for this job
    overwrite: bool  # allow replacing a finished run (or output file) in output_dir
    device: str  # auto | cuda | cpu
    seed: int
    model: ModelConfig
    quant: QuantConfig

    def validate(self, prefix: str = "") -> None:
        _one_of("device", self.device, ("auto", "cuda", "cpu"))
        _check(bool(self.output_dir), "output_dir", self.output_dir, "give a folder path")
        _validate_fields(self)

    @property
    def resume_mode(self) -> str | None:
        """'auto', None (never resume) or an explicit checkpoint path; stages that do not train
        never resume."""
        resume = getattr(self, "resume", None)
        if resume is None:
            return None
        text = str(resume).strip()
        if text.lower() in ("false", "no", "none", "never", "0", ""):
            return None
        return "auto" if text.lower() in ("auto", "true", "yes") else text


@dataclass
class TrainingStageConfig(StageConfig):
    """Keys every training stage (sft, reward, dpo, ppo) has."""

    resume: str  # auto: newest complete checkpoint in output_dir | false | a checkpoint path
    lora: LoraConfig
    logger: LoggerConfig
    data: DataConfig
    optim: OptimConfig
    train: TrainConfig
    objective: ObjectiveConfig

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        # float16 gradients underflow to zero unless the loss is scaled up first (a GradScaler)
        _check(
            self.quant.compute_dtype != "float16", "quant.compute_dtype", self.quant.compute_dtype,
            "training in float16 needs loss scaling, which rlhf's loops do not do; use bfloat16 "
            "(GPUs since Ampere), float32 or auto (float16 stays available to eval, sample and chat)",
        )  # fmt: skip


@dataclass
class SFTConfig(TrainingStageConfig):
    samples: SamplesConfig


@dataclass
class RewardLossConfig:
    center_rewards_coefficient: float  # c * mean((r_c + r_r)^2) keeps scores near 0; 0.01 is common
    head_init: str  # zero: every score starts at 0 (loss ln 2) | normal
    norm_samples: int  # training pairs whose responses (both) give the stored mean/std

    def validate(self, prefix: str) -> None:
        _check(
            self.center_rewards_coefficient >= 0,
            f"{prefix}.center_rewards_coefficient",
            self.center_rewards_coefficient,
            "it must be >= 0 (0 = off)",
        )
        _one_of(f"{prefix}.head_init", self.head_init, ("zero", "normal"))
        _check(
            self.norm_samples >= 2, f"{prefix}.norm_samples", self.norm_samples, "use at least 2"
        )


@dataclass
class RewardConfig(TrainingStageConfig):
    init_from: str | None  # an sft final/ folder (its adapter is the start) | None: the raw base
    reward: RewardLossConfig


DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")  # dpo.loss values that load no reference at all


@dataclass
class DPOLossConfig:
    loss: str  # sigmoid | ipo | hinge | robust | simpo, orpo (reference-free)
    beta: float  # strength of the implicit KL to the reference; higher: stay closer
    label_smoothing: float  # conservative DPO / robust DPO: assumed share of flipped labels
    simpo_gamma: float  # SimPO's target reward margin
    precompute_reference: bool  # reference log-probs once before training, cached with the run

    def validate(self, prefix: str) -> None:
        _one_of(f"{prefix}.loss", self.loss, DPO_LOSS_TYPES)
        _check(self.beta > 0, f"{prefix}.beta", self.beta, "beta must be greater than 0")
        _check(
            0 <= self.label_smoothing < 0.5,
            f"{prefix}.label_smoothing",
            self.label_smoothing,
            "it must be in [0, 0.5)",
        )
        _check(self.simpo_gamma >= 0, f"{prefix}.simpo_gamma", self.simpo_gamma, "it must be >= 0")


@dataclass
class DPOConfig(TrainingStageConfig):
    init_from: str | None  # an sft final/ folder: policy and reference start from its adapter
    dpo: DPOLossConfig


KTO_LOSSES = ("kto", "apo_zero_unpaired")


@dataclass
class KTOLossConfig:
    loss: str  # kto (with the KL reference point) | apo_zero_unpaired (none)
    beta: float  # strength of the implicit KL to the reference; higher: stay closer
    desirable_weight: float  # weight of a desirable row's loss
    undesirable_weight: float  # weight of an undesirable row's loss
    balance: bool  # true: the rarer kind's weight is raised until weight x count of the two match

    def validate(self, prefix: str) -> None:
        _one_of(f"{prefix}.loss", self.loss, KTO_LOSSES)
        _check(self.beta > 0, f"{prefix}.beta", self.beta, "beta must be greater than 0")
        for name in ("desirable_weight", "undesirable_weight"):
            value = getattr(self, name)
            _check(value > 0, f"{prefix}.{name}", value, "it must be greater than 0")


def kto_weight_ranges(
    n_desirable: int, n_undesirable: int, w_d: float, w_u: float
) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """The KTO paper's advice for unbalanced feedback (Ethayarajh et al. 2024, eq. 8): keep
    w_D n_D / (w_U n_U) within [1, 4/3]. None when it holds (or one kind is absent); else the range
    of desirable_weight that satisfies it with w_U kept, and of undesirable_weight with w_D kept."""
    if not n_desirable or not n_undesirable:
        return None
    if 1 <= (w_d * n_desirable) / (w_u * n_undesirable) <= 4 / 3:
        return None
    d = w_u * n_undesirable / n_desirable  # desirable_weight giving a ratio of exactly 1
    u = w_d * n_desirable / n_undesirable  # undesirable_weight giving a ratio of exactly 1
    return (d, 4 / 3 * d), (0.75 * u, u)


@dataclass
class KTOConfig(TrainingStageConfig):
    init_from: str | None  # a policy final/ folder: policy and reference start from its adapter
    kto: KTOLossConfig

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        # the KL reference point pairs each prompt with another row's completion of the batch
        if self.kto.loss == "kto" and self.train.batch_size < 2:
            raise ConfigError(
                f"train.batch_size={self.train.batch_size}: kto.loss=kto estimates its KL reference "
                "point from each prompt paired with another row's completion, which needs at least 2 "
                "rows per micro-batch; use train.batch_size=2 or more (or kto.loss=apo_zero_unpaired)."
            )


@dataclass
class PolicyConfig:
    init_from: str | None  # an sft final/: policy and reference start from its adapter

    def validate(self, prefix: str) -> None:
        pass  # checked when the stage starts (checkpoint.check_parent)


@dataclass
class EnvConfig:
    """Multi-turn episodes (rlhf_cli.episodes): the environment and the limits of an episode."""

    name: str | None  # package.module:Class, or a shipped one (calculator, guess_number) | None
    max_turns: int  # policy turns per episode
    max_tokens: int | None  # every token after the prompt | None: no limit but max_turns
    tool_timeout: float  # seconds a tool call may run before it is an error to the model
    kwargs: dict[str, Any]  # the environment's constructor's keyword arguments

    def validate(self, prefix: str) -> None:
        if self.name is not None:
            _check(
                self.name in SHIPPED_ENVS or bool(re.fullmatch(_FUNCTION_SPEC, str(self.name))),
                f"{prefix}.name", self.name,
                f"write it as package.module:Class, or one of {', '.join(SHIPPED_ENVS)}",
            )  # fmt: skip
        _check(self.max_turns >= 1, f"{prefix}.max_turns", self.max_turns, "it must be >= 1")
        if self.max_tokens is not None:
            _check(self.max_tokens >= 2, f"{prefix}.max_tokens", self.max_tokens, "it must be >= 2")
        _check(self.tool_timeout > 0, f"{prefix}.tool_timeout", self.tool_timeout, "it must be > 0")


@dataclass
class PPORewardConfig:
    from_: str | None  # written `reward.from`: a reward final/ folder
    fn: str | None  # or package.module:function taking (prompts, responses) -> floats
    normalize: bool  # RM scores -> (score - mean) / std with the RM's stored statistics
    missing_eos_penalty: float  # subtracted from the score of a response that never ended
    whiten: bool  # whiten the scores over each rollout batch

    def validate(self, prefix: str) -> None:
        if self.from_ is not None and self.fn is not None:
            raise ConfigError(
                f"{prefix}.from and {prefix}.fn: both are set; give exactly one: {prefix}.from=<a "
                f"reward final/ folder> or {prefix}.fn=package.module:function."
            )
        if self.fn is not None:
            _check(
                bool(re.fullmatch(_FUNCTION_SPEC, self.fn)),
                f"{prefix}.fn",
                self.fn,
                "write it as package.module:function",
            )
        _check(
            self.missing_eos_penalty >= 0,
            f"{prefix}.missing_eos_penalty",
            self.missing_eos_penalty,
            "it must be >= 0 (0 = off)",
        )


@dataclass
class ValueConfig:
    init: (
        str  # auto: the reward adapter + head when the RM shares the base, else new | reward | new
    )
    lr: float | None  # the value adapter's and head's learning rate | None: optim.lr
    max_grad_norm: float | None  # clip the value's gradient norm (0 = off) | None: optim's

    def validate(self, prefix: str) -> None:
        _one_of(f"{prefix}.init", self.init, ("auto", "reward", "new"))
        _check(
            self.max_grad_norm is None or self.max_grad_norm >= 0,
            f"{prefix}.max_grad_norm",
            self.max_grad_norm,
            "it must be >= 0 (0 = off), or null for optim.max_grad_norm",
        )
        _check(
            self.lr is None or self.lr > 0,
            f"{prefix}.lr",
            self.lr,
            "it must be > 0, or null for optim.lr",
        )


@dataclass
class RolloutConfig:
    max_new_tokens: int
    temperature: float  # sampling temperature; log-probs are computed from logits / T

    def validate(self, prefix: str) -> None:
        _check(
            self.max_new_tokens >= 1,
            f"{prefix}.max_new_tokens",
            self.max_new_tokens,
            "it must be >= 1",
        )
        _check(
            self.temperature > 0,
            f"{prefix}.temperature",
            self.temperature,
            "the rollouts are sampled, so it must be > 0",
        )


@dataclass
class KLConfig:
    estimator: str  # k1: logp - ref (unbiased) | k3: (r - 1) - log r, always >= 0
    coef: float  # beta of the per-token penalty -beta * kl (the initial value when adaptive)
    adaptive: bool  # adjust beta towards `target` (Ziegler et al. 2019)
    target: float  # adaptive: target KL per response, in nats
    horizon: int  # adaptive: episodes over which beta moves by at most ~20%

    def validate(self, prefix: str) -> None:
        _one_of(f"{prefix}.estimator", self.estimator, ("k1", "k3"))
        _check(self.coef >= 0, f"{prefix}.coef", self.coef, "it must be >= 0")
        _check(self.target > 0, f"{prefix}.target", self.target, "it must be > 0")
        _check(self.horizon >= 1, f"{prefix}.horizon", self.horizon, "it must be >= 1")


@dataclass
class PPOLossConfig:
    epochs: int  # passes over each rollout batch
    minibatches: int  # optimizer updates per pass
    clip_range: float  # policy ratio clip epsilon
    vf_clip_range: float  # value clip around the rollout's values
    gamma: float
    lam: float  # GAE lambda
    whiten_advantages: bool
    target_kl: float | None  # stop a rollout's epochs early when approxkl exceeds it

    def validate(self, prefix: str) -> None:
        for name in ("epochs", "minibatches"):
            value = getattr(self, name)
            _check(value >= 1, f"{prefix}.{name}", value, "it must be a positive integer")
        for name in ("clip_range", "vf_clip_range"):
            value = getattr(self, name)
            _check(value > 0, f"{prefix}.{name}", value, "it must be > 0")
        for name in ("gamma", "lam"):
            value = getattr(self, name)
            _check(0 <= value <= 1, f"{prefix}.{name}", value, "it must be in [0, 1]")
        _check(
            self.target_kl is None or self.target_kl > 0,
            f"{prefix}.target_kl",
            self.target_kl,
            "it must be > 0, or null for no early stop",
        )


@dataclass
class PPOSamplesConfig:
    every: int  # steps between tables of sampled prompts and responses (0 = off)
    num_prompts: int  # rows per table

    def validate(self, prefix: str) -> None:
        _check(self.every >= 0, f"{prefix}.every", self.every, "it must be >= 0 (0 = off)")
        _check(self.num_prompts >= 1, f"{prefix}.num_prompts", self.num_prompts, "it must be >= 1")


@dataclass
class PPOConfig(TrainingStageConfig):
    policy: PolicyConfig
    reward: PPORewardConfig
    value: ValueConfig
    rollout: RolloutConfig
    kl: KLConfig
    ppo: PPOLossConfig
    samples: PPOSamplesConfig
    env: EnvConfig

    @property
    def episodes_per_update(self) -> int:
        """Episodes behind one optimizer update (per process): micro-batch x accumulation."""
        return self.train.batch_size * self.train.grad_accum

    @property
    def episodes_per_step(self) -> int:
        """Episodes one PPO step samples (per process): one minibatch per update of a pass."""
        return self.episodes_per_update * self.ppo.minibatches

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        if self.reward.from_ is None and self.reward.fn is None and self.env.name is None:
            raise MissingValue(
                "reward.from and reward.fn: neither is set; give exactly one: reward.from=<a "
                "reward final/ folder> or reward.fn=package.module:function (or an environment "
                "whose steps give the reward: env=package.module:Class)."
            )


# GRPO's choices (rlhf_cli.losses implements them; docs/grpo.md has their sources)
ADVANTAGES = ("grpo", "dr_grpo", "rloo", "reinforce_pp")
# what each estimator divides by unless grpo.scale_rewards says otherwise
NATURAL_SCALE = {"grpo": "group", "dr_grpo": "none", "rloo": "none", "reinforce_pp": "batch"}
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


@dataclass
class GRPORewardConfig:
    fns: list[str]  # package.module:function(prompts, responses, *columns) -> floats, each weighed
    weights: list[float] | None  # one per function, then one for the reward model | None: all 1
    from_: str | None  # written `reward.from`: a reward final/ folder, scored beside the functions
    normalize: bool  # RM scores -> (score - mean) / std with the RM's stored statistics
    missing_eos_penalty: float  # subtracted from the reward of a response cut at max_new_tokens

    def validate(self, prefix: str) -> None:
        for spec in self.fns:
            _check(
                bool(re.fullmatch(_FUNCTION_SPEC, str(spec))),
                f"{prefix}.fns",
                spec,
                "write each function as package.module:function",
            )
        wanted = len(self.fns) + (self.from_ is not None)
        if self.weights is not None:
            _check(
                len(self.weights) == wanted,
                f"{prefix}.weights",
                list(self.weights),
                f"give one weight per reward ({wanted}: each of {prefix}.fns in order"
                + (f", then {prefix}.from" if self.from_ is not None else "")
                + "), or null for all 1",
            )
        _check(
            self.missing_eos_penalty >= 0,
            f"{prefix}.missing_eos_penalty",
            self.missing_eos_penalty,
            "it must be >= 0 (0 = off)",
        )


@dataclass
class GRPORolloutConfig(RolloutConfig):
    batch_size: int  # sequences per generate() call (the KV cache of this many is in memory)

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        _check(self.batch_size >= 1, f"{prefix}.batch_size", self.batch_size, "it must be >= 1")


@dataclass
class GRPOKLConfig:
    beta: float  # weight of the k3 KL to the reference per token | 0: no reference pass at all

    def validate(self, prefix: str) -> None:
        _check(self.beta >= 0, f"{prefix}.beta", self.beta, "it must be >= 0 (0 = no KL term)")


@dataclass
class GRPOLossConfig:
    group_size: int  # G: samples per prompt, whose rewards are each other's baseline
    advantage: str  # grpo | dr_grpo | rloo | reinforce_pp
    scale_rewards: str  # auto (the estimator's own) | group | batch | none
    iterations: int  # passes over each step's samples (mu); the ratio is 1 on the first
    minibatches: int  # optimizer updates per pass
    clip_low: float  # the ratio is clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float  # > clip_low: DAPO's clip-higher
    importance: str  # token | sequence (GSPO)
    loss_agg: (
        str  # token_mean (DAPO) | seq_mean_token_mean (GRPO) | seq_mean_token_sum_norm (Dr. GRPO)
    )
    filter_groups: bool  # groups whose rewards are all equal leave the loss (DAPO)
    mask_truncated: bool  # responses cut at max_new_tokens leave the loss (DAPO's overlong filter)

    def validate(self, prefix: str) -> None:
        _check(
            self.group_size >= 2,
            f"{prefix}.group_size",
            self.group_size,
            "a group needs at least 2 samples per prompt to be its own baseline",
        )
        _one_of(f"{prefix}.advantage", self.advantage, ADVANTAGES)
        _one_of(f"{prefix}.scale_rewards", self.scale_rewards, ("auto", "group", "batch", "none"))
        if self.advantage == "reinforce_pp" and self.scale_rewards != "auto":
            raise ConfigError(
                f"{prefix}.scale_rewards={self.scale_rewards!r} does not apply to "
                f"{prefix}.advantage=reinforce_pp, which divides by the advantages' std over the "
                f"batch by definition; leave {prefix}.scale_rewards=auto."
            )
        for name in ("iterations", "minibatches"):
            value = getattr(self, name)
            _check(value >= 1, f"{prefix}.{name}", value, "it must be a positive integer")
        for name in ("clip_low", "clip_high"):
            value = getattr(self, name)
            _check(value > 0, f"{prefix}.{name}", value, "it must be > 0")
        _check(self.clip_low < 1, f"{prefix}.clip_low", self.clip_low, "it must be < 1")
        _one_of(f"{prefix}.importance", self.importance, ("token", "sequence"))
        _one_of(f"{prefix}.loss_agg", self.loss_agg, LOSS_AGGREGATIONS)
        if self.importance == "sequence" and self.loss_agg != "seq_mean_token_mean":
            raise ConfigError(
                f"{prefix}.importance=sequence (GSPO) gives each response one ratio and weighs "
                f"responses equally; use {prefix}.loss_agg=seq_mean_token_mean with it, not "
                f"{self.loss_agg}."
            )


@dataclass
class GRPOConfig(TrainingStageConfig):
    policy: PolicyConfig
    reward: GRPORewardConfig
    rollout: GRPORolloutConfig
    env: EnvConfig
    kl: GRPOKLConfig
    grpo: GRPOLossConfig
    samples: PPOSamplesConfig

    @property
    def episodes_per_update(self) -> int:
        """Episodes behind one optimizer update (per process): micro-batch x accumulation."""
        return self.train.batch_size * self.train.grad_accum

    @property
    def episodes_per_step(self) -> int:
        """Episodes one GRPO step samples (per process): one minibatch per update of a pass."""
        return self.episodes_per_update * self.grpo.minibatches

    @property
    def prompts_per_step(self) -> int:
        """Prompts one step samples (per process): each gets grpo.group_size episodes."""
        return self.episodes_per_step // self.grpo.group_size

    def validate(self, prefix: str = "") -> None:
        try:
            super().validate(prefix)
        except MissingValue as missing:  # reported after the other mistakes
            self._check_groups()
            raise missing
        self._check_groups()
        self._check_rewards()

    def _check_rewards(self) -> None:
        if not self.reward.fns and self.reward.from_ is None and self.env.name is None:
            raise MissingValue(
                "reward.fns and reward.from: neither is set; give reward functions"
                " (reward.fns=[package.module:function, ...]), a reward model "
                "(reward.from=<a reward final/ folder>), an environment whose steps give the "
                "reward (env=package.module:Class), or several of them."
            )

    def _check_groups(self) -> None:
        if self.episodes_per_step % self.grpo.group_size:
            raise ConfigError(
                f"grpo.group_size={self.grpo.group_size} does not divide the "
                f"{self.episodes_per_step} episodes of a step (train.batch_size="
                f"{self.train.batch_size} x train.grad_accum={self.train.grad_accum} x "
                f"grpo.minibatches={self.grpo.minibatches}); make their product a multiple of it."
            )


@dataclass
class EvalRewardConfig:
    from_: str | None  # written `reward.from`: a reward final/ whose scores are reported
    normalize: bool  # report (score - mean) / std with the RM's stored statistics

    def validate(self, prefix: str) -> None:
        pass  # checked when the stage starts (checkpoint.check_parent)


@dataclass
class EvalGenerationConfig:
    max_new_tokens: int
    batch_size: int  # prompts per generation / scoring batch

    def validate(self, prefix: str) -> None:
        for name in ("max_new_tokens", "batch_size"):
            value = getattr(self, name)
            _check(value >= 1, f"{prefix}.{name}", value, "it must be a positive integer")


@dataclass
class EvalConfig(StageConfig):
    logger: LoggerConfig
    policy: (
        str | None
    )  # a policy final/ folder (sft, dpo, kto, ppo, grpo) | null: the raw base model
    reference: str  # KL reference: auto | base | none | a final/ folder
    reward: EvalRewardConfig
    judge: str | None  # gold judge module:function | null
    compare: str | None  # another eval's folder or eval.json: win rates against its responses
    perplexity_data: str | None  # SFT data whose held-out split gives the perplexity | null
    data: DataConfig
    generation: EvalGenerationConfig
    env: EnvConfig
    kl_prompts: int | None  # the KL is estimated on the first N held-out prompts | null: all
    bootstrap: int  # resamples for the 95% intervals
    samples: int  # rows of the printed side-by-side table

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        if self.kl_prompts is not None:
            _check(self.kl_prompts >= 1, "kl_prompts", self.kl_prompts, "use >= 1, or null for all")
        if self.judge is not None:
            _check(
                bool(re.fullmatch(_FUNCTION_SPEC, self.judge)),
                "judge",
                self.judge,
                "write it as package.module:function, or null for no gold judge",
            )
        _check(self.bootstrap >= 100, "bootstrap", self.bootstrap, "use at least 100 resamples")
        _check(self.samples >= 0, "samples", self.samples, "it must be >= 0")


@dataclass
class SampleConfig(StageConfig):
    out: str | None  # the pairs file | None: <output_dir>/pairs.jsonl
    policy: (
        str | None
    )  # a policy final/ folder (sft, dpo, kto, ppo, grpo) | None or "base": the raw base model
    policy_b: str | None  # A/B: a second final/ folder (or "base") | None: one source
    n: int  # candidates per prompt (from each policy with policy_b)
    temperature: float  # 0 = greedy
    data: DataConfig
    generation: EvalGenerationConfig
    env: EnvConfig

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        _check(self.n >= 1, "n", self.n, "it must be a positive integer")
        _check(self.temperature >= 0, "temperature", self.temperature, "it must be >= 0")
        _check(
            self.n >= 2 or self.policy_b is not None,
            "n",
            self.n,
            "rlhf label compares two candidates, so one policy needs n >= 2 (or give policy_b= "
            "for one candidate from each of two policies)",
        )
        _check(
            self.temperature > 0 or self.n == 1,
            "temperature",
            self.temperature,
            f"greedy decoding would give the same response {self.n} times; use a temperature "
            "above 0, or n=1 with policy_b",
        )
        _check(self.out is None or bool(self.out.strip()), "out", self.out, "give a file path")


@dataclass
class LabelConfig:
    """`rlhf label` (not a Hydra stage: it writes no run folder; defaults in configs/label.yaml)."""

    mode: str  # pairwise: preference pairs | binary: single responses good/bad, KTO rows
    in_: str | None  # written `in`: rlhf sample's file (binary: or prompt + completion rows)
    out: str | None  # the preference (binary: KTO) file; its answer log is <out>.log.jsonl
    labeler: str | None  # recorded on every row | None: the login name (judge:<spec>)
    judge: str | None  # package.module:function labels without a terminal | None: you do
    ties: str  # drop: ties stay out of `out` (kept in the log) | keep: tie=true rows
    strength: bool  # ask how much better (1-7) after A or B; becomes `margin`
    notes: bool  # ask for an optional note after each answer
    margin_scale: float  # margin = (strength - 1) x margin_scale
    pairs: str  # which candidate pairs of a row are items: all | first
    seed: int  # the left/right order of each item (drawn per labeller and item)
    batch_size: int  # judge: items scored per call
    threshold: float  # binary judge: a response is good when its score >= threshold

    def validate(self, prefix: str = "") -> None:
        _one_of("mode", self.mode, LABEL_MODES)
        if self.labeler is not None:
            _check(
                bool(self.labeler.strip()) and self.labeler.isprintable(),
                "labeler",
                self.labeler,
                "give a non-empty name on one line",
            )
        if self.judge is not None:
            _check(
                bool(re.fullmatch(_FUNCTION_SPEC, self.judge)),
                "judge",
                self.judge,
                "write it as package.module:function, or null to label at the terminal",
            )
        _one_of("ties", self.ties, ("drop", "keep"))
        _one_of("pairs", self.pairs, ("all", "first"))
        _check(self.margin_scale >= 0, "margin_scale", self.margin_scale, "it must be >= 0")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "it must be >= 1")
        _check(
            abs(self.threshold) < float("inf"), "threshold", self.threshold, "give a finite number"
        )
        if self.mode == "binary":
            for key, value, pairwise in (
                ("strength", self.strength, True),
                ("ties", self.ties, "keep"),
                ("pairs", self.pairs, "first"),
            ):
                if value == pairwise:
                    raise ConfigError(
                        f"{key}={str(value).lower()} applies to pairs of responses, and mode=binary "
                        f"labels single responses good or bad; drop {key}= or use mode=pairwise."
                    )


LABEL_MODES = ("pairwise", "binary")  # rlhf label: preference pairs | good/bad responses (KTO)

EXPORT_FORMATS = ("hf", "gguf")
EXPORT_DTYPES = ("auto", "float32", "bfloat16", "float16")
GGUF_TYPES = ("f16", "q8_0")


@dataclass
class GGUFConfig:
    type: str  # f16 | q8_0: the weights' encoding in the GGUF file
    pre: str  # llama.cpp's pre-tokenizer name | auto: known for SmolLM2 and Llama 3 bases

    def validate(self, prefix: str = "gguf") -> None:
        _one_of(f"{prefix}.type", self.type, GGUF_TYPES)
        _check(bool(self.pre.strip()), f"{prefix}.pre", self.pre, "give a name, or auto")


@dataclass
class ExportConfig(StageConfig):
    from_: str | None  # written `from`: a finished run's final/ folder (a policy or a reward model)
    format: str  # hf: a transformers model folder | gguf: one file for llama.cpp and Ollama
    gguf: GGUFConfig
    dtype: str  # auto: the base model's own precision | float32 | bfloat16 | float16
    eval: str | None  # an eval.json (or its folder) for the model card | null: looked for
    max_shard_size: str  # safetensors shards up to this size ("5GB")

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        if not self.from_:
            raise MissingValue(
                "from is not set; give the final/ folder of a finished run to export "
                "(from=runs/dpo/final)."
            )
        _one_of("format", self.format, EXPORT_FORMATS)
        _one_of("dtype", self.dtype, EXPORT_DTYPES)
        _check(
            bool(re.fullmatch(r"\d+(\.\d+)?\s*[KMG]i?B", self.max_shard_size)),
            "max_shard_size", self.max_shard_size, "write a size such as 5GB or 500MB",
        )  # fmt: skip


@dataclass
class ChatConfig:
    """`rlhf chat` (not a Hydra stage: it writes nothing; defaults in configs/chat.yaml)."""

    model: ModelConfig
    quant: QuantConfig
    device: str  # auto | cuda | cpu
    seed: int
    policy: (
        str | None
    )  # a policy final/ folder (sft, dpo, kto, ppo, grpo) | None: the raw base model
    system: str | None  # a system message opening every conversation
    prompt: str | None  # one message to answer to stdout | None: stdin or the interactive chat
    temperature: float  # 0: greedy
    max_new_tokens: int
    tools: list[str]  # package.module:function the model may call (its tool mode) | []: none
    tool_rounds: int  # tool calls answered before a reply must answer the user
    tool_timeout: float  # seconds a tool call may run

    def validate(self, prefix: str = "") -> None:
        _one_of("device", self.device, ("auto", "cuda", "cpu"))
        _check(self.temperature >= 0, "temperature", self.temperature, "use 0 (greedy) or more")
        _check(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "use >= 1")
        for spec in self.tools:
            _check(
                bool(re.fullmatch(_FUNCTION_SPEC, str(spec))), "tools", spec,
                "write each tool as package.module:function",
            )  # fmt: skip
        _check(self.tool_rounds >= 1, "tool_rounds", self.tool_rounds, "use >= 1")
        _check(self.tool_timeout > 0, "tool_timeout", self.tool_timeout, "it must be > 0")
        _validate_fields(self)


STAGE_SCHEMAS: dict[str, type] = {
    "sft": SFTConfig,
    "reward": RewardConfig,
    "dpo": DPOConfig,
    "kto": KTOConfig,
    "ppo": PPOConfig,
    "grpo": GRPOConfig,
    "eval": EvalConfig,
    "sample": SampleConfig,
    "label": LabelConfig,
    "export": ExportConfig,
    "chat": ChatConfig,
}

# Config keys that are Python keywords: the dataclass field has a trailing underscore.
_FIELD_OF_KEY = {"from": "from_", "in": "in_"}
_KEY_OF_FIELD = {f: k for k, f in _FIELD_OF_KEY.items()}


def _renamed(node: Any, names: dict[str, str]) -> Any:
    """Plain config data with the dict keys in `names` renamed, at every depth."""
    if isinstance(node, dict):
        return {names.get(k, k): _renamed(v, names) for k, v in node.items()}
    if isinstance(node, list):
        return [_renamed(v, names) for v in node]
    return node


# Names users bring from TRL / transformers / peft, mapped to ours for the "did you mean".
_ALIASES = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "learning_rate": "lr",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "num_train_epochs": "epochs",
    "max_seq_length": "max_length",
    "max_grad": "max_grad_norm",
    "lr_scheduler_type": "scheduler",
    "model_name_or_path": "name_or_path",
    "dataset": "path",
}


# Keys a later version removed, with why and what to use instead.
_RETIRED = {
    "ppo.vf_coef": "the value adapter and head have their own parameters and gradient clipping, "
    "and Adam's steps do not depend on a loss's scale, so a weight on the value loss only moved "
    "the value's clipping threshold (vf_coef=c with optim.max_grad_norm=m clipped like "
    "value.max_grad_norm=m/c); set value.max_grad_norm, and value.lr for how fast it learns",
}


def _unknown_keys(node: Any, schema: type, prefix: str) -> None:
    """Raise ConfigError for the first key in `node` that `schema` does not declare."""
    if not isinstance(node, DictConfig):
        return
    declared = {_KEY_OF_FIELD.get(f.name, f.name): f for f in fields(schema)}
    for key in node:
        full = f"{prefix}{key}"
        if full in _RETIRED:
            raise ConfigError(f"{full} was removed: {_RETIRED[full]}.")
        if key not in declared:
            alias = _ALIASES.get(str(key))
            hint = (
                [alias]
                if alias in declared
                else difflib.get_close_matches(str(key), list(declared), n=1, cutoff=0.6)
            )
            where = f"in '{prefix[:-1]}'" if prefix else "at the top level"
            suggestion = f"did you mean '{prefix}{hint[0]}'? " if hint else ""
            valid = ", ".join(sorted(declared))
            raise ConfigError(
                f"Unknown config key '{full}': {suggestion}Valid keys {where} are: {valid}."
            )
        sub_type = typing.get_type_hints(schema).get(declared[str(key)].name)
        if is_dataclass(sub_type):
            _unknown_keys(node[key], sub_type, f"{full}.")


_TYPE_MSG = re.compile(
    r"Value '(?P<value>.*?)'( of type '(?P<type>\w+)')? could not be converted to (?P<target>\w+)"
)


def build_config(stage: str, cfg: DictConfig) -> StageConfig:
    """Merge a composed config onto the stage's dataclass and validate it; raise ConfigError."""
    schema = STAGE_SCHEMAS[stage]
    _unknown_keys(cfg, schema, "")
    try:
        values = OmegaConf.create(_renamed(OmegaConf.to_container(cfg), _FIELD_OF_KEY))
        merged = OmegaConf.merge(OmegaConf.structured(schema), values)
        typed: StageConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "a config value"
        for field_name, user_key in _KEY_OF_FIELD.items():
            key = re.sub(rf"\b{field_name}\b", user_key, key)
        match = _TYPE_MSG.search(str(err))
        if match:
            raise ConfigError(
                f"{key}={match['value']!r} has the wrong type: expected {_a(match['target'].lower())}."
            ) from None
        first_line = str(err).strip().splitlines()[0]
        raise ConfigError(f"Invalid config value for {key}: {first_line}.") from None
    typed.validate()
    return typed


def to_container(config: StageConfig) -> dict[str, Any]:
    """The typed config as plain Python data (for manifests and trackers)."""
    data = OmegaConf.to_container(OmegaConf.structured(config), resolve=True)
    return _renamed(data, _KEY_OF_FIELD)  # type: ignore[return-value]
