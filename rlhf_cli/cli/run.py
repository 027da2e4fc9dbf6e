"""How a stage's run ends, as the `rlhf` command reports it: the Hydra entry point of every stage
calls `run_stage`, which types the composed config, runs the stage's `train` under a SIGINT/SIGTERM
handler (`loop.StopOnSignal`), and turns every way a run can end other than a bug into a message
and an exit code (docs/configuration.md): 0 done, 1 a bug in the user's own code (their
traceback), 2 bad input, 3 diverged, 4 a write failed, 128 + the signal when stopped.
"""

from __future__ import annotations

import gc
import os
import shlex
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from rlhf_cli import checkpoint, files
from rlhf_cli.schema import (
    DEFAULT_MODEL,
    USER_CODE_EXIT,
    StageConfig,
    UserCodeError,
    UserError,
    build_config,
    to_container,
)

COMMAND_ENV = (
    "RLHF_COMMAND"  # the command line as the user typed it (the CLI sets it), for resuming
)


def run_stage(stage: str, cfg: DictConfig, train: Callable[..., dict]) -> float | None:
    """Typed config -> the stage's `train`, and every way it can end other than a bug, each as one
    message on stderr: bad input -> exit 2 (in a sweep, the job is marked failed and the sweep goes
    on); non-finite losses -> 3; a write that failed (disk full, permissions) -> 4; SIGINT/SIGTERM
    -> 130/143 with the command that continues. See docs/reliability.md. Returns the final metric
    named by `objective.metric` (what a sweeper such as Optuna optimises)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from rlhf_cli import distributed
    from rlhf_cli.loop import DIVERGED_EXIT, Diverged, StopOnSignal, Stopped
    from rlhf_cli.tracking import check_logger, record_job_result

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
            record_job_result(config.output_dir, earlier)
            return value
        with StopOnSignal() as signals:
            final_metrics = train(config, signals)
        value = objective_value(config, final_metrics, in_sweep)
        if in_sweep:
            record_job_result(config.output_dir, final_metrics)
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
        # the sweep goes on; its summary counts the job as failed and exits 2
        record_job_result(HydraConfig.get().runtime.output_dir, None)
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
    from rlhf_cli import distributed

    if distributed.is_main():
        print(message, file=sys.stderr, flush=True)


def release_memory() -> None:
    """Between the jobs of a sweep (which share one process): free Python and CUDA memory."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def resume_command(stage: str, output_dir: str) -> str:
    """The command that continues a stopped run: the user's own (as the CLI recorded it in
    $RLHF_COMMAND), with output_dir pinned."""
    command = shlex.split(os.environ.get(COMMAND_ENV, ""))
    words = command[2:] if command[1:2] == [stage] else []
    keep = [w for w in words if w.split("=", 1)[0].lstrip("+") not in ("output_dir", "resume")]
    return shlex.join(["rlhf", stage, *keep, f"output_dir={output_dir}"])
