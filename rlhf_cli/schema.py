"""Typed configuration for every stage, and the checks that turn bad values into one sentence.

Each stage's composed Hydra config is merged onto its dataclass here (`build_config`) before any
model is loaded. An unknown key (with a "did you mean"), a value of the wrong type or a value out of
range raises `ConfigError`, which the CLI prints as one sentence and exits with code 2.
"""

from __future__ import annotations

import difflib
import re
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class UserError(Exception):
    """A mistake the user can fix; printed as one sentence, exit code 2."""


class ConfigError(UserError):
    """A bad configuration value."""


_FUNCTION_SPEC = r"[A-Za-z_][\w.]*:[A-Za-z_]\w*"  # package.module:function


def _check(ok: bool, key: str, value: Any, valid: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not valid: {valid}.")


def _a(noun: str) -> str:
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def _one_of(key: str, value: Any, choices: tuple[str, ...]) -> None:
    _check(value in choices, key, value, "choose one of " + ", ".join(choices))


@dataclass
class ModelConfig:
    name_or_path: str = "embedded:smollm2-135m"  # hub id, local folder, or embedded:<name>
    revision: str | None = None  # hub revision (branch, tag or commit)
    trust_remote_code: bool = False  # runs code from the model repo: turn on only if you trust it
    gradient_checkpointing: bool = False  # less activation memory, ~30% slower steps
    attn_implementation: str | None = None  # None = transformers' default (sdpa)
    chat_template: str | None = (
        None  # None = the tokenizer's; "chatml" or a Jinja string replaces it
    )

    def validate(self, prefix: str) -> None:
        _check(
            bool(self.name_or_path),
            f"{prefix}.name_or_path",
            self.name_or_path,
            "give a hub id or a local folder",
        )


@dataclass
class QuantConfig:
    mode: str = "auto"  # auto = nf4 on CUDA, none on CPU
    double_quant: bool = True  # quantize the quantization constants too (~0.4 bit/param saved)
    compute_dtype: str = "auto"  # auto = bfloat16 on CUDA, float32 on CPU

    def validate(self, prefix: str) -> None:
        _one_of(f"{prefix}.mode", self.mode, ("auto", "nf4", "int8", "none"))
        _one_of(
            f"{prefix}.compute_dtype",
            self.compute_dtype,
            ("auto", "bfloat16", "float16", "float32"),
        )


@dataclass
class LoraConfig:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: Any = "all-linear"  # "all-linear" or a list of module names

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
    messages: str = "messages"
    prompt: str = "prompt"
    completion: str = "completion"
    chosen: str = "chosen"
    rejected: str = "rejected"
    margin: str = "margin"  # optional per-pair margin for the reward loss


@dataclass
class DataConfig:
    path: str = "demo-sft"  # shipped name, local .json/.jsonl/.parquet file, or hub dataset id
    subset: str | None = None  # hub dataset configuration name
    split: str = "train"
    eval_path: str | None = None  # a separate local file for the held-out split
    eval_split: str | None = None  # a hub split for the held-out set; None = hold out eval_size
    eval_size: float = 0.1  # fraction (<1) or number of rows held out when no eval split is given
    format: str = "auto"  # auto | messages | prompt_completion
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    max_length: int = 512  # tokens per example (and per packed row)
    truncation: str = "truncate"  # truncate: cut to max_length | drop: skip longer examples
    packing: bool = False  # several examples per row; no attention across them
    group_by_length: bool = True  # batches of similar-length rows (less padding); false = random
    max_rows: int | None = None  # use only the first N training rows (quick experiments)

    @property
    def held_out(self) -> bool:
        return bool(self.eval_path or self.eval_split or self.eval_size > 0)

    def validate(self, prefix: str) -> None:
        _check(
            bool(self.path),
            f"{prefix}.path",
            self.path,
            "give a shipped name, a local file or a hub id",
        )
        _one_of(f"{prefix}.format", self.format, ("auto", "messages", "prompt_completion"))
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


@dataclass
class OptimConfig:
    lr: float = 2e-4  # LoRA tolerates ~10x the full-fine-tuning learning rate
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: str = "cosine"  # cosine | linear | constant (all after warmup)
    warmup_ratio: float = 0.03  # share of the steps spent warming up linearly from 0
    min_lr_ratio: float = 0.0  # the schedule decays to lr * min_lr_ratio
    max_grad_norm: float = 1.0  # clip the global gradient norm; 0 = no clipping

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
    batch_size: int = 8  # rows per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    epochs: float = 1.0  # passes over the training rows (ignored when max_steps is set)
    max_steps: int | None = None  # optimizer steps; overrides epochs
    log_every: int = 1  # optimizer steps between metric lines
    eval_every: int = 50  # optimizer steps between eval losses (0 = only at the end)
    save_every: int = 100  # optimizer steps between resume checkpoints (0 = never)
    keep_last: int = 2  # resume checkpoints kept on disk
    max_nonfinite: int = (
        3  # updates in a row with a non-finite loss or gradient before the run stops
    )

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
    project: str = "rlhf"
    entity: str | None = None
    name: str | None = None  # None = {stage}__{model}__{seed}__{time}
    mode: str = "offline"  # online | offline | disabled
    tags: list[str] = field(default_factory=list)

    def validate(self, prefix: str) -> None:
        _one_of(f"{prefix}.mode", self.mode, ("online", "offline", "disabled"))


@dataclass
class LoggerConfig:
    backend: str = "console"  # console | wandb (metrics.jsonl is always written)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def validate(self, prefix: str) -> None:
        _one_of(f"{prefix}.backend", self.backend, ("console", "wandb"))
        self.wandb.validate(f"{prefix}.wandb")


@dataclass
class SamplesConfig:
    num_prompts: int = 3  # held-out prompts generated before and after training (0 = off)
    max_new_tokens: int = 48
    temperature: float = 0.0  # 0 = greedy

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

    metric: str = "eval/loss"
    direction: str = "minimize"  # minimize | maximize

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


@dataclass
class StageConfig:
    """Keys shared by every stage."""

    output_dir: str = (
        "runs/stage"  # set per stage in its yaml; the CLI replaces it with Hydra's run dir
    )
    resume: str = (
        "auto"  # auto: newest complete checkpoint in output_dir | false | a checkpoint path
    )
    overwrite: bool = False  # allow replacing a finished run in output_dir
    device: str = "auto"  # auto | cuda | cpu
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    def validate(self, prefix: str = "") -> None:
        _one_of("device", self.device, ("auto", "cuda", "cpu"))
        _check(bool(self.output_dir), "output_dir", self.output_dir, "give a folder path")
        for f in fields(self):
            value = getattr(self, f.name)
            if is_dataclass(value):
                value.validate(f.name)

    @property
    def resume_mode(self) -> str | None:
        """'auto', None (never resume) or an explicit checkpoint path."""
        text = str(self.resume).strip()
        if text.lower() in ("false", "no", "none", "never", "0", ""):
            return None
        return "auto" if text.lower() in ("auto", "true", "yes") else text


@dataclass
class SFTConfig(StageConfig):
    output_dir: str = "runs/sft"
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: ObjectiveConfig = field(
        default_factory=lambda: ObjectiveConfig("eval/loss", "minimize")
    )
    samples: SamplesConfig = field(default_factory=SamplesConfig)


@dataclass
class RewardLossConfig:
    center_rewards_coefficient: float = (
        0.0  # c * mean((r_c + r_r)^2) keeps scores near 0; 0.01 is common
    )
    head_init: str = "zero"  # zero: every score starts at 0 (loss ln 2) | normal
    norm_samples: int = 512  # training pairs whose responses (both) give the stored mean/std

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
class RewardConfig(StageConfig):
    output_dir: str = "runs/reward"
    init_from: str | None = (
        None  # an sft final/ folder (its adapter is the start) | None: the raw base
    )
    data: DataConfig = field(default_factory=lambda: DataConfig(path="demo-prefs", max_length=256))
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: ObjectiveConfig = field(
        default_factory=lambda: ObjectiveConfig("eval/accuracy", "maximize")
    )
    reward: RewardLossConfig = field(default_factory=RewardLossConfig)


@dataclass
class DPOLossConfig:
    loss: str = "sigmoid"  # sigmoid | ipo | hinge | robust | simpo (reference-free)
    beta: float = 0.1  # strength of the implicit KL to the reference; higher: stay closer
    label_smoothing: float = 0.0  # conservative DPO / robust DPO: assumed share of flipped labels
    simpo_gamma: float = 0.5  # SimPO's target reward margin
    precompute_reference: bool = (
        False  # reference log-probs once before training, cached with the run
    )

    def validate(self, prefix: str) -> None:
        _one_of(f"{prefix}.loss", self.loss, ("sigmoid", "ipo", "hinge", "robust", "simpo"))
        _check(self.beta > 0, f"{prefix}.beta", self.beta, "beta must be greater than 0")
        _check(
            0 <= self.label_smoothing < 0.5,
            f"{prefix}.label_smoothing",
            self.label_smoothing,
            "it must be in [0, 0.5)",
        )
        _check(self.simpo_gamma >= 0, f"{prefix}.simpo_gamma", self.simpo_gamma, "it must be >= 0")


@dataclass
class DPOConfig(StageConfig):
    output_dir: str = "runs/dpo"
    init_from: str | None = (
        None  # an sft final/ folder: policy and reference start from its adapter
    )
    data: DataConfig = field(default_factory=lambda: DataConfig(path="demo-prefs", max_length=256))
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: ObjectiveConfig = field(
        default_factory=lambda: ObjectiveConfig("eval/rewards/accuracies", "maximize")
    )
    dpo: DPOLossConfig = field(default_factory=DPOLossConfig)


@dataclass
class PolicyConfig:
    init_from: str | None = None  # an sft final/: policy and reference start from its adapter

    def validate(self, prefix: str) -> None:
        pass  # checked when the stage starts (checkpoint.check_parent)


@dataclass
class PPORewardConfig:
    from_: str | None = None  # written `reward.from`: a reward final/ folder
    fn: str | None = None  # or package.module:function taking (prompts, responses) -> floats
    normalize: bool = True  # RM scores -> (score - mean) / std with the RM's stored statistics
    missing_eos_penalty: float = 1.0  # subtracted from the score of a response that never ended
    whiten: bool = False  # whiten the scores over each rollout batch

    def validate(self, prefix: str) -> None:
        if (self.from_ is None) == (self.fn is None):
            given = "both are set" if self.from_ else "neither is set"
            raise ConfigError(
                f"{prefix}.from and {prefix}.fn: {given}; give exactly one: {prefix}.from=<a reward "
                f"final/ folder> or {prefix}.fn=package.module:function."
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
    init: str = "auto"  # auto: the reward adapter + head when the RM shares the base, else new | reward | new

    def validate(self, prefix: str) -> None:
        _one_of(f"{prefix}.init", self.init, ("auto", "reward", "new"))


@dataclass
class RolloutConfig:
    max_new_tokens: int = 48
    temperature: float = 1.0  # sampling temperature; log-probs are computed from logits / T

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
            "PPO samples its rollouts, so it must be > 0",
        )


@dataclass
class KLConfig:
    estimator: str = "k1"  # k1: logp - ref (unbiased) | k3: (r - 1) - log r, always >= 0
    coef: float = 0.05  # beta of the per-token penalty -beta * kl (the initial value when adaptive)
    adaptive: bool = False  # adjust beta towards `target` (Ziegler et al. 2019)
    target: float = 6.0  # adaptive: target KL per response, in nats
    horizon: int = 10000  # adaptive: episodes over which beta moves by at most ~20%

    def validate(self, prefix: str) -> None:
        _one_of(f"{prefix}.estimator", self.estimator, ("k1", "k3"))
        _check(self.coef >= 0, f"{prefix}.coef", self.coef, "it must be >= 0")
        _check(self.target > 0, f"{prefix}.target", self.target, "it must be > 0")
        _check(self.horizon >= 1, f"{prefix}.horizon", self.horizon, "it must be >= 1")


@dataclass
class PPOLossConfig:
    epochs: int = 4  # passes over each rollout batch
    minibatches: int = 1  # optimizer updates per pass (the batch is split into this many)
    clip_range: float = 0.2  # policy ratio clip epsilon
    vf_clip_range: float = 0.2  # value clip around the rollout's values
    vf_coef: float = 0.1  # weight of the value loss
    gamma: float = 1.0
    lam: float = 0.95  # GAE lambda
    whiten_advantages: bool = True
    target_kl: float | None = None  # stop a rollout's epochs early when approxkl exceeds it

    def validate(self, prefix: str) -> None:
        for name in ("epochs", "minibatches"):
            value = getattr(self, name)
            _check(value >= 1, f"{prefix}.{name}", value, "it must be a positive integer")
        for name in ("clip_range", "vf_clip_range", "vf_coef"):
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
    every: int = 10  # steps between tables of sampled prompts and responses (0 = off)
    num_prompts: int = 3  # rows per table

    def validate(self, prefix: str) -> None:
        _check(self.every >= 0, f"{prefix}.every", self.every, "it must be >= 0 (0 = off)")
        _check(self.num_prompts >= 1, f"{prefix}.num_prompts", self.num_prompts, "it must be >= 1")


@dataclass
class PPOConfig(StageConfig):
    output_dir: str = "runs/ppo"
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    reward: PPORewardConfig = field(default_factory=PPORewardConfig)
    value: ValueConfig = field(default_factory=ValueConfig)
    data: DataConfig = field(
        default_factory=lambda: DataConfig(path="demo-prompts", max_length=256)
    )
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    ppo: PPOLossConfig = field(default_factory=PPOLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: ObjectiveConfig = field(
        default_factory=lambda: ObjectiveConfig("eval/scores", "maximize")
    )
    samples: PPOSamplesConfig = field(default_factory=PPOSamplesConfig)

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        per_update = self.ppo.minibatches * self.train.grad_accum
        _check(
            self.train.batch_size % per_update == 0,
            "train.batch_size",
            self.train.batch_size,
            f"the episodes per rollout must split into ppo.minibatches x train.grad_accum = "
            f"{per_update} equal micro-batches",
        )


@dataclass
class EvalRewardConfig:
    from_: str | None = None  # written `reward.from`: a reward final/ whose scores are reported
    normalize: bool = True  # report (score - mean) / std with the RM's stored statistics

    def validate(self, prefix: str) -> None:
        pass  # checked when the stage starts (checkpoint.check_parent)


@dataclass
class EvalGenerationConfig:
    max_new_tokens: int = 48
    batch_size: int = 16  # prompts per generation / scoring batch

    def validate(self, prefix: str) -> None:
        for name in ("max_new_tokens", "batch_size"):
            value = getattr(self, name)
            _check(value >= 1, f"{prefix}.{name}", value, "it must be a positive integer")


@dataclass
class EvalConfig(StageConfig):
    output_dir: str = "runs/eval"
    policy: str | None = None  # an sft/dpo/ppo final/ folder | null: the raw base model
    reference: str = "auto"  # KL reference: auto (the adapter the policy started from, else the base) | base | none | a final/ folder
    reward: EvalRewardConfig = field(default_factory=EvalRewardConfig)
    judge: str | None = "rlhf_cli.judges:demo_gold"  # gold judge module:function | null
    compare: str | None = (
        None  # another eval's folder or eval.json: win rates against its responses
    )
    perplexity_data: str | None = (
        "demo-sft"  # SFT data whose held-out split gives the perplexity | null
    )
    data: DataConfig = field(
        default_factory=lambda: DataConfig(path="demo-prompts", max_length=256)
    )
    generation: EvalGenerationConfig = field(default_factory=EvalGenerationConfig)
    kl_prompts: int | None = None  # the KL is estimated on the first N held-out prompts | null: all
    bootstrap: int = 1000  # resamples for the 95% intervals
    samples: int = 5  # rows of the printed side-by-side table

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
    output_dir: str = "runs/sample"
    out: str | None = None  # the pairs file | None: <output_dir>/pairs.jsonl
    policy: str | None = None  # an sft/dpo/ppo final/ folder | None or "base": the raw base model
    policy_b: str | None = None  # A/B: a second final/ folder (or "base") | None: one source
    n: int = 2  # candidates per prompt (from each policy with policy_b)
    temperature: float = 1.0  # 0 = greedy
    data: DataConfig = field(
        default_factory=lambda: DataConfig(path="demo-prompts", max_length=256, eval_size=0.0)
    )
    generation: EvalGenerationConfig = field(default_factory=EvalGenerationConfig)

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
    """`rlhf label` (not a Hydra stage: it writes no run folder)."""

    in_: str | None = None  # written `in`: the pairs file that rlhf sample wrote
    out: str | None = None  # the preference file; its answer log is <out>.log.jsonl
    labeler: str | None = None  # recorded on every row | None: the login name (judge:<spec>)
    judge: str | None = None  # package.module:function labels without a terminal | None: you do
    ties: str = "drop"  # drop: ties stay out of `out` (kept in the log) | keep: tie=true rows
    strength: bool = False  # ask how much better (1-7) after A or B; becomes `margin`
    notes: bool = False  # ask for an optional note after each answer
    margin_scale: float = 0.5  # margin = (strength - 1) x margin_scale
    pairs: str = "all"  # which candidate pairs of a row are items: all | first
    seed: int = 0  # the left/right order of each item (drawn per labeller and item)
    batch_size: int = 64  # judge: items scored per call

    def validate(self, prefix: str = "") -> None:
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


STAGE_SCHEMAS: dict[str, type] = {
    "sft": SFTConfig,
    "reward": RewardConfig,
    "dpo": DPOConfig,
    "ppo": PPOConfig,
    "eval": EvalConfig,
    "sample": SampleConfig,
    "label": LabelConfig,
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


def _unknown_keys(node: Any, schema: type, prefix: str) -> None:
    """Raise ConfigError for the first key in `node` that `schema` does not declare."""
    if not isinstance(node, DictConfig):
        return
    declared = {_KEY_OF_FIELD.get(f.name, f.name): f for f in fields(schema)}
    for key in node:
        full = f"{prefix}{key}"
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
