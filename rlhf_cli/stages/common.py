"""What every stage's Hydra entry point does around its own loop.

`run_stage` turns the composed config into the typed schema, fixes the output folder to the one
Hydra made for this job, and turns user mistakes (`UserError`) into one sentence and exit code 2.
`validate_overrides` composes the config the way Hydra will, so the CLI can refuse a bad command
line before Hydra starts (and before any model is loaded).
"""

from __future__ import annotations

import functools
import gc
import math
import os
import random
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from rlhf_cli import checkpoint, data, distributed, files, losses, modeling
from rlhf_cli.checkpoint import refuse_finished_run
from rlhf_cli.compose import compose
from rlhf_cli.schema import (
    DEFAULT_MODEL,
    USER_CODE_EXIT,
    ConfigError,
    MissingValue,
    OptimConfig,
    StageConfig,
    TrainConfig,
    UserCodeError,
    UserError,
    build_config,
    to_container,
)
from rlhf_cli.tracking import check_logger, record_finished_job


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
        refuse_finished_run(config.output_dir, config.overwrite)
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


# Sweep jobs that stopped on bad input; the CLI exits 2 after the sweep when any did.
FAILED_JOBS: list[str] = []
# The stages whose run returns an `objective` metric (what sweeper=optuna optimises).
STAGES_WITH_OBJECTIVE = ("sft", "reward", "dpo", "ppo")


def run_stage(stage: str, cfg: DictConfig, train: Callable[[Any], dict]) -> float | None:
    """Typed config -> the stage's `train`, and every way it can end other than a bug, each as one
    message on stderr: bad input -> exit 2 (in a sweep, the job is marked failed and the sweep goes
    on); non-finite losses -> 3; a write that failed (disk full, permissions) -> 4; SIGINT/SIGTERM
    -> 130/143 with the command that continues. See docs/reliability.md. Returns the final metric
    named by `objective.metric` (what a sweeper such as Optuna optimises)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    in_sweep = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    config: StageConfig | None = None
    try:
        config = build_config(stage, cfg)
        if hasattr(config, "logger"):
            check_logger(config.logger)
        if HydraConfig.initialized():
            config.output_dir = HydraConfig.get().runtime.output_dir
        earlier = finished_job(config) if in_sweep and not config.overwrite else None
        if earlier is not None:  # a sweep run again: this job already finished, the same way
            if distributed.is_main():
                print(f"job {HydraConfig.get().job.num}: {config.output_dir} already holds this job's "
                      "finished run (same settings); keeping it and its final metrics", flush=True)  # fmt: skip
            value = objective_value(config, earlier, in_sweep)
            record_finished_job(config.output_dir, earlier)
            return value
        with STOP:
            final_metrics = train(config)
        value = objective_value(config, final_metrics, in_sweep)
        if in_sweep:
            record_finished_job(config.output_dir, final_metrics)
        return value
    except Diverged as err:
        say(f"rlhf {stage}: stopped: {err}")
        sys.exit(DIVERGED_EXIT)
    except (checkpoint.WriteError, OSError) as err:
        if isinstance(err, OSError) and err.errno not in files.WRITE_ERRNOS:
            raise
        if isinstance(err, OSError):  # outside a checkpoint: metrics.jsonl, samples, a cache
            kept = checkpoint.what_is_intact(config.output_dir)
            err = f"could not write {err.filename} ({err.strerror}); {kept}"
        say(f"rlhf {stage}: error: {err}; free space or fix the permissions, then continue with: "
            f"{resume_command(stage, config.output_dir)}")  # fmt: skip
        sys.exit(files.WRITE_EXIT)
    except Stopped as stop:
        name = signal.Signals(stop.signum).name
        say(f"rlhf {stage}: stopped by {name} after step {stop.step}; a resume checkpoint is in "
            f"{config.output_dir}/checkpoints. Continue with:\n  "
            f"{resume_command(stage, config.output_dir)}")  # fmt: skip
        sys.exit(128 + stop.signum)
    except UserCodeError as err:
        say(f"rlhf {stage}: error: {err}; the run stopped.\n{err.report()}")
        if config is not None:  # stopped before writing anything: no folder is left behind
            checkpoint.remove_if_unused(config.output_dir)
        sys.exit(USER_CODE_EXIT)
    except UserError as err:
        say(f"rlhf {stage}: error: {err}")
        if config is not None:  # a run that stopped before writing anything leaves no folder
            checkpoint.remove_if_unused(config.output_dir)
        if not in_sweep:
            sys.exit(2)
        FAILED_JOBS.append(str(HydraConfig.get().job.num))
        return None
    finally:
        distributed.finish()
        release_memory()


def finished_job(config: StageConfig) -> dict | None:
    """The final metrics of an intact finished run already in this sweep job's folder, when it ran
    with the same settings (None otherwise: the job then runs, or is refused as a finished run).
    A stage started from a parent takes its base model from it, which the saved settings show."""
    earlier = checkpoint.finished_result(Path(config.output_dir))
    if earlier is None:
        return None
    saved, final_metrics = earlier
    current = to_container(config)
    if current["model"]["name_or_path"] == DEFAULT_MODEL:
        current["model"] = saved.get("model", current["model"])
    return None if checkpoint.config_changes(saved, current) else final_metrics


def objective_value(
    config: StageConfig, final_metrics: dict[str, float], in_sweep: bool
) -> float | None:
    """The finished run's `objective.metric`: what a sweeper optimises. None for a stage without an
    objective, or for a single run that did not measure it (only a sweep needs it)."""
    objective = getattr(config, "objective", None)
    if objective is None or (objective.metric not in final_metrics and not in_sweep):
        return None
    if objective.metric not in final_metrics:
        names = ", ".join(sorted(final_metrics))
        raise UserError(
            f"objective.metric={objective.metric} is not among this run's final metrics (the run itself "
            f"finished in {config.output_dir}/final); pick one of: {names}."
        )
    return float(final_metrics[objective.metric])


def say(message: str) -> None:
    """How a run ends, on stderr, once (by rank 0 when there are several processes)."""
    if distributed.is_main():
        print(message, file=sys.stderr, flush=True)


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


SIGNAL_ENV = "RLHF_TEST_SIGNAL_AT_STEP"  # test hook: "STEP:TERM" or "STEP:INT" sends that signal
# The command line as the user typed it (set by the CLI), for the resume command printed on a stop.
COMMAND: list[str] = []


class Stopped(Exception):
    """SIGINT/SIGTERM arrived during training: a resume checkpoint was saved at a step boundary."""

    def __init__(self, signum: int, step: int):
        super().__init__(signum, step)
        self.signum, self.step = signum, step


class StopOnSignal:
    """While training: the first SIGINT (Ctrl-C) or SIGTERM asks the loop to stop at the next step
    boundary (`requested`), where it saves a resume checkpoint and raises `Stopped`; a second
    signal stops at once, as the default handlers would."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._saved: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # asked twice: give up at once
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        name = signal.Signals(signum).name
        print(f"\n{name}: saving a checkpoint at the end of this step, then stopping (send it "
              "again to stop at once)", file=sys.stderr, flush=True)  # fmt: skip

    def __enter__(self) -> StopOnSignal:
        self.signum = None
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._saved[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)
        self._saved.clear()


STOP = StopOnSignal()  # installed by run_stage around every stage's training


def stop_requested(step: int, total_steps: int) -> int:
    """At the end of `step`: the signal number when a SIGINT/SIGTERM asked to stop, else 0. The
    stage then saves a resume checkpoint and raises `Stopped`. A signal during the last step lets
    the run finish (it is about to write final/). The test hook RLHF_TEST_SIGNAL_AT_STEP="STEP:TERM"
    (or INT) sends the signal itself at the end of STEP."""
    want, _, name = os.environ.get(SIGNAL_ENV, "").partition(":")
    if want == str(step):
        os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
    return STOP.signum if STOP.requested and step < total_steps else 0


def resume_command(stage: str, output_dir: str) -> str:
    """The command that continues a stopped run: the user's own, with output_dir pinned."""
    words = COMMAND[2:] if COMMAND[1:2] == [stage] else []
    keep = [w for w in words if w.split("=", 1)[0].lstrip("+") not in ("output_dir", "resume")]
    return shlex.join(["rlhf", stage, *keep, f"output_dir={output_dir}"])


def build_optimizer(
    params: list[torch.nn.Parameter],
    optim: OptimConfig,
    more: list[torch.nn.Parameter] = (),
    more_lr: float | None = None,
) -> torch.optim.AdamW:
    """AdamW over `params` at optim.lr, and over `more` (PPO's value adapter and head) at
    `more_lr` (None: optim.lr). The schedule scales every group's rate alike."""
    groups = [{"params": list(params)}]
    if more:
        groups.append({"params": list(more), "lr": more_lr or optim.lr})
    return torch.optim.AdamW(
        groups,
        lr=optim.lr,
        betas=tuple(optim.betas),
        eps=optim.eps,
        weight_decay=optim.weight_decay,
    )


def plan_steps(num_items: int, train: TrainConfig) -> int:
    """Optimizer steps: train.max_steps, or enough micro-batches for train.epochs passes."""
    if train.max_steps:
        return train.max_steps
    micro_per_epoch = math.ceil(num_items / (train.batch_size * distributed.world()))
    return max(1, math.ceil(train.epochs * micro_per_epoch / train.grad_accum))


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


def due(step: int, every: int, total_steps: int) -> bool:
    """Periodic work (eval, checkpoint) every `every` steps; the last step has its own."""
    return every > 0 and step % every == 0 and step < total_steps


def resume_position(
    resume_from, model, optimizer, scheduler, config: StageConfig, console, heads=None,
    adapters=None,
) -> tuple[int, dict]:  # fmt: skip
    """(step done, progress dict with the data-stream position): from the checkpoint when resuming,
    else the start."""
    if resume_from is None:
        distributed.seed_this_rank(config.seed)
        return 0, {"step": 0, "stream": {"epoch": 0, "index": 0}}
    progress = checkpoint.load_checkpoint(
        resume_from, model, optimizer, scheduler, heads, to_container(config), adapters
    )
    console.print(f"resumed from {resume_from} (step {progress['step']})")
    return progress["step"], progress


def step_size(total_steps: int, train: TrainConfig, unit: str) -> str:
    """The start-up line's account of a step: per-process batch x accumulation x processes."""
    world = distributed.world()
    per_step = train.batch_size * train.grad_accum * world
    processes = f" x {world} processes" if world > 1 else ""
    return (
        f"{total_steps} steps x {train.batch_size} {unit} x {train.grad_accum} accumulation"
        f"{processes} = {per_step} {unit} per step"
    )


def train_stream(items: list, config: StageConfig, progress: dict) -> data.BatchStream:
    """The training micro-batches from where `progress` left off. Every process walks the same
    stream of world x batch_size items (the order one process with the whole batch would see) and
    trains on its own share of each: `distributed.shard(stream.next())`. With
    data.group_by_length the batches are length-grouped (`data.epoch_order`)."""
    lengths = [data.item_length(x) for x in items] if config.data.group_by_length else None
    return data.BatchStream(
        items, config.train.batch_size * distributed.world(), config.seed, **progress["stream"],
        lengths=lengths,
    )  # fmt: skip


def save_resume_state(
    config: StageConfig, step: int, model, optimizer, scheduler, stream, heads=None,
    adapters=None, **extra,
) -> None:  # fmt: skip
    """A resume checkpoint; `extra` values (e.g. a KL controller's state) come back in the progress
    dict on resume."""
    progress = {"step": step, "stream": stream.position(), **extra}
    checkpoint.save_checkpoint(
        config.output_dir, step, model, optimizer, scheduler, progress, config.train.keep_last, heads,
        to_container(config), adapters,
    )  # fmt: skip


def end_of_step(
    config: StageConfig, step: int, total_steps: int, model, optimizer, scheduler, stream,
    heads=None, adapters=None, guard: NonFiniteGuard | None = None, **extra,
) -> None:  # fmt: skip
    """What every training loop does after a step: save a resume checkpoint when one is due or a
    SIGINT/SIGTERM asked to stop (then raise `Stopped`), and the "step-end" kill point. The arguments
    after `total_steps` are `save_resume_state`'s (the guard's count of skipped updates is saved
    with them)."""
    stop = distributed.agree(stop_requested(step, total_steps))  # every rank stops at the same step
    if stop or due(step, config.train.save_every, total_steps):
        if guard is not None:
            extra["skipped_updates"] = guard.skipped
        save_resume_state(
            config, step, model, optimizer, scheduler, stream, heads, adapters, **extra
        )
    if stop:
        raise Stopped(stop, step)
    files.kill_point("step-end")


def begin(
    config: StageConfig,
    stage: str,
    console,
    parents: tuple[str, ...] = (),
    init_from: str | None = None,
    key: str = "init_from",
    base_from: tuple[dict, str, str] | None = None,
):
    """The start every stage shares, before any model is loaded: check the output folder (-> the
    checkpoint to resume from), check the parent checkpoint (`init_from`, by default the config's)
    and inherit its base, pick the device, seed, load the tokenizer and check it matches the
    parent's base. Without a parent, `base_from` (manifest, path, key) of another checkpoint the
    run uses (a reward model) gives the base instead. Returns (resume_from, parent manifest or None,
    device, tokenizer)."""
    device = distributed.local_device(modeling.resolve_device(config.device))
    distributed.init(device)  # under torchrun: join the other processes
    # rank 0 tidies and prepares the folder first; then the others find the same checkpoint in it
    if distributed.is_main():
        resume_from = checkpoint.prepare_output_dir(
            config.output_dir, config.overwrite, config.resume_mode
        )
    distributed.barrier()
    if not distributed.is_main():
        resume_from = checkpoint.prepare_output_dir(
            config.output_dir, config.overwrite, config.resume_mode
        )
    init_from = init_from or getattr(config, "init_from", None)
    parent = None
    if init_from:
        parent = checkpoint.check_parent(init_from, stage, parents, key)
        base_from = (parent, init_from, key)
    if base_from is not None:  # before the tokenizer loads: it must be the inherited base's
        inherit_base_model(config, base_from[0], console, base_from[2])
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    tokenizer = modeling.load_tokenizer(config.model)
    if base_from is not None:
        check_same_base(config, base_from[0], tokenizer, base_from[1], base_from[2])
    return resume_from, parent, device, tokenizer


def load_examples(config, tokenizer, console, stage: str, tokenize=None, what: str = "pairs"):
    """The training and held-out rows of `config.data`, tokenized by `tokenize` (default:
    preference pairs for `rlhf <stage>`): (train, held out, train stats, held-out stats), with the
    counts printed."""
    tokenize = tokenize or functools.partial(data.tokenize_preferences, stage=f"rlhf {stage}")
    train_rows, eval_rows = data.load_splits(config.data, config.seed)
    train, train_stats = tokenize(train_rows, tokenizer, config.data, config.data.path)
    held_out, eval_stats = [], data.TokenizeStats()
    if eval_rows:
        held_out, eval_stats = tokenize(
            eval_rows, tokenizer, config.data, f"{config.data.path} (held out)"
        )
    console.print(
        f"{what}: train {train_stats.summary()}; held out {eval_stats.summary()}"
        f"{data.demo_note(config.data.path)}"
    )
    return train, held_out, train_stats, eval_stats


DIVERGED_EXIT = 3  # the loss or gradients stayed non-finite for train.max_nonfinite updates


class Diverged(Exception):
    """Too many non-finite updates in a row; no checkpoint is written after them."""


class NonFiniteGuard:
    """Skips an optimizer update whose loss or gradient norm is NaN/inf (the weights and the
    optimizer state stay as they were) and counts it; `limit` such updates in a row raise
    `Diverged`, which stops the run, leaving the last checkpoint as the last good state."""

    def __init__(self, limit: int, output_dir: str, skipped: int = 0):
        self.limit, self.output_dir = limit, output_dir
        self.skipped, self.in_a_row = skipped, 0

    def finite(self, step: int, loss: float, grad_norm: float) -> bool:
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_a_row = 0
            return True
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            latest = checkpoint.latest_checkpoint(self.output_dir)
            last = f"the last good checkpoint is {latest}" if latest else "no checkpoint was saved"
            raise Diverged(
                f"the loss or gradient was not finite in {self.in_a_row} updates in a row (at step {step}; "
                f"{self.skipped} skipped in all); {last}; lower optim.lr, check the data, or raise "
                "train.max_nonfinite."
            )
        return False


def nonfinite_guard(config: StageConfig, progress: dict) -> NonFiniteGuard:
    """The run's guard, with the count of updates skipped before a resume."""
    return NonFiniteGuard(
        config.train.max_nonfinite, config.output_dir, progress.get("skipped_updates", 0)
    )


def optimizer_step(
    params, optimizer, scheduler, config: StageConfig, loss: float, guard: NonFiniteGuard, step: int
) -> dict[str, float]:
    """Clip (optim.max_grad_norm; 0 = off), step, advance the schedule, clear gradients. A
    non-finite loss or gradient skips the update and leaves the schedule where it was. Returns the
    step's metrics: lr (the one this step used), grad_norm, skipped_updates (so far)."""
    distributed.sum_gradients(params)  # the step's gradient over all ranks' rows
    max_norm = config.optim.max_grad_norm or float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
    lr = optimizer.param_groups[0]["lr"]
    if guard.finite(step, loss, grad_norm):
        files.kill_point("update")
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"lr": lr, "grad_norm": grad_norm, "skipped_updates": guard.skipped}


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


def forward_loss(model, batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype):
    """(summed target-token loss, target count) for one collated batch; the LM head runs only
    where there is a target (`modeling.target_logprobs`)."""
    inputs = {
        k: v.to(device)
        for k, v in batch.items()
        if k in ("input_ids", "attention_mask", "position_ids")
    }
    with modeling.autocast(device, dtype):
        logprobs, _ = modeling.target_logprobs(model, inputs, batch["labels"].to(device))
    return losses.target_token_loss(logprobs)


@torch.no_grad()
def mean_token_loss(
    model, examples: list, batch_size: int, pad_id: int, device, dtype, packing: bool = False
) -> float:
    """Mean per-token loss over `examples` (SFT's held-out loss; exp() of it is the perplexity).
    With several processes each takes its share of the batches (`distributed.map_batches`)."""

    def sums(_: int, batch: list) -> list[tuple[float, float]]:
        loss_sum, n = forward_loss(model, data.collate(batch, pad_id, packing), device, dtype)
        return [(loss_sum.item(), n.item())]

    with modeling.eval_mode(model):
        parts = distributed.map_batches(examples, batch_size, sums)
    return sum(s for s, _ in parts) / max(sum(n for _, n in parts), 1)
