"""Hydra launchers and sweepers (the `cluster` extra): `launcher=slurm` and `sweeper=optuna` compose
into Hydra's settings, an Optuna sweep on the tiny model optimises the named final metric in the
direction the stage says, and `launcher=local` runs a sweep's jobs in worker processes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from rlhf_cli.compose import compose

from conftest import run_cli, tiny_sft_args

# launchers start worker processes: on the same xdist worker as the torchrun tests (--dist loadgroup)
pytestmark = pytest.mark.xdist_group("processes")


def hydra_settings(stage: str, *overrides: str):
    return compose(stage, ["output_dir=/tmp/sweep", *overrides], hydra_node=True).hydra


def test_slurm_launcher_composes_with_our_defaults_and_command_line_settings():
    launcher = hydra_settings(
        "sft", "launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=30"
    ).launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.timeout_min) == ("gpu", 30)
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (1, 1, 1)
    assert launcher.submitit_folder == "/tmp/sweep/.submitit/%j"  # resolved: under output_dir


def test_local_launcher_composes_to_joblib():
    launcher = hydra_settings("reward", "launcher=local", "hydra.launcher.n_jobs=3").launcher
    assert launcher._target_.endswith("joblib_launcher.JoblibLauncher")
    assert launcher.n_jobs == 3


@pytest.mark.parametrize(
    ("stage", "metric", "direction"),
    [
        ("sft", "eval/loss", "minimize"),
        ("reward", "eval/accuracy", "maximize"),
        ("dpo", "eval/rewards/accuracies", "maximize"),
        ("kto", "eval/accuracy", "maximize"),
        ("ppo", "eval/scores", "maximize"),
    ],
)
def test_optuna_sweeper_takes_its_direction_from_the_stage_objective(stage, metric, direction):
    cfg = compose(stage, ["output_dir=/tmp/sweep", "sweeper=optuna"], hydra_node=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("optuna_sweeper.OptunaSweeper")
    assert (cfg.objective.metric, sweeper.direction) == (metric, direction)
    flipped = compose(
        stage,
        ["output_dir=/tmp/sweep", "sweeper=optuna", "objective.direction=minimize"],
        hydra_node=True,
    )
    assert flipped.hydra.sweeper.direction == "minimize"
    assert OmegaConf.select(cfg, "hydra.sweeper.sampler._target_").endswith("TPESampler")


def final_metrics(job: Path) -> dict:
    return json.loads((job / "final" / "rlhf_stage.json").read_text())["final_metrics"]


def job_lr(job: Path) -> float:
    overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
    return float(next(o.split("=", 1)[1] for o in overrides if o.startswith("optim.lr=")))


@pytest.mark.slow
def test_optuna_sweep_follows_the_named_metric_and_direction(tmp_path, tiny_model, chat16):
    """objective.metric=train/loss with direction=maximize: the 'best' trial is the worst learner,
    which only comes out if the sweep optimises what `objective` names, the way it says."""
    out = tmp_path / "optuna-max"
    args = tiny_sft_args(tiny_model, chat16, out, "train.max_steps=3")
    result = run_cli(*args, "objective.metric=train/loss", "objective.direction=maximize",
                     "-m", "sweeper=optuna", "hydra.sweeper.n_trials=2",
                     "optim.lr=tag(log,interval(1e-4,3e-2))")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    losses = {n: final_metrics(out / str(n))["train/loss"] for n in range(2)}
    results = yaml.safe_load((out / "optimization_results.yaml").read_text())
    # the same float through JSON and YAML (repr round-trips): exact; rel=1e-6 is far below any
    # difference between two trials' losses, which are > 1e-3 apart (the next line)
    assert results["best_value"] == pytest.approx(max(losses.values()), rel=1e-6)
    assert losses[0] != pytest.approx(losses[1], rel=1e-3)  # two learning rates, two losses


@pytest.mark.slow
def test_local_launcher_runs_jobs_in_worker_processes_and_summarises_them(
    tmp_path, tiny_model, chat16
):
    out = tmp_path / "local"
    args = tiny_sft_args(tiny_model, chat16, out, "train.max_steps=2")
    result = run_cli(*args, "-m", "launcher=local", "hydra.launcher.n_jobs=2", "optim.lr=1e-3,1e-2")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((out / "sweep_summary.csv").open()))
    assert [(r["job"], r["optim.lr"], r["status"]) for r in rows] == [
        ("0", "0.001", "done"),
        ("1", "0.01", "done"),
    ]
    assert float(rows[0]["eval/loss"]) != float(rows[1]["eval/loss"])


@pytest.mark.slow
def test_an_optuna_sweep_of_three_trials_writes_the_best_parameters_and_can_be_extended(
    tmp_path, tiny_model, chat16
):
    """Two trials, then the same sweep with n_trials=3: the seeded sampler proposes the same first
    trials, whose folders already hold finished runs with those settings; they keep their results
    (not run again, files untouched) and the study goes on to a third trial. The best parameters
    written are those of the job with the lowest eval/loss (sft's objective, minimised)."""
    out = tmp_path / "optuna"
    args = [*tiny_sft_args(tiny_model, chat16, out, "train.max_steps=3"), "-m", "sweeper=optuna",
            "optim.lr=tag(log,interval(1e-4,3e-2))"]  # fmt: skip
    assert run_cli(*args, "hydra.sweeper.n_trials=2").returncode == 0
    weights = {n: out / str(n) / "final" / "adapter_model.safetensors" for n in range(3)}
    before = {n: weights[n].stat().st_mtime_ns for n in (0, 1)}
    result = run_cli(*args, "hydra.sweeper.n_trials=3")
    assert result.returncode == 0, result.stderr[-3000:]
    for n in (0, 1):
        assert f"job {n}: {out / str(n)} already holds this job's finished run" in result.stdout
        assert weights[n].stat().st_mtime_ns == before[n]
    assert "job 2:" not in result.stdout and (out / "2" / "final" / "COMPLETE").is_file()

    jobs = [out / str(n) for n in range(3)]
    losses = {job.name: final_metrics(job)["eval/loss"] for job in jobs}
    lrs = {job.name: job_lr(job) for job in jobs}
    assert all(1e-4 <= lr <= 3e-2 for lr in lrs.values()), lrs
    assert len(set(lrs.values())) == 3, lrs  # three different trials, not one job run thrice
    results = yaml.safe_load((out / "optimization_results.yaml").read_text())
    best = min(losses, key=losses.get)
    # the same floats through JSON, YAML and the override string (repr round-trips): exact; the
    # tolerances only allow a shorter print, far below the gap between two trials
    assert results["best_value"] == pytest.approx(losses[best], rel=1e-6)
    assert results["best_params"] == {"optim.lr": pytest.approx(lrs[best], rel=1e-9)}
    rows = list(csv.DictReader((out / "sweep_summary.csv").open()))
    assert [(r["job"], r["status"]) for r in rows] == [("0", "done"), ("1", "done"), ("2", "done")]

    # another setting for the same folders: a finished job is not taken as this sweep's result
    result = run_cli(*args, "hydra.sweeper.n_trials=4", "lora.r=4")
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"output_dir={out / '0'} already holds a finished run" in result.stderr
    assert "3 of 4 sweep jobs did not finish (jobs 0, 1, 2;" in result.stderr
