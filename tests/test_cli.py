"""The `rlhf` command as a user runs it: from outside the repo, with bad input, one sentence, exit 2."""

import csv
import json
import subprocess
import sys

import pytest

from conftest import run_cli, tiny_sft_args


def test_help_lists_stages_from_any_directory(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "sft" in result.stdout and "config=FILE|PRESET" in result.stdout


def test_stage_help_and_cfg_job_from_any_directory(tmp_path):
    result = run_cli("sft", "--help", cwd=tmp_path)
    assert result.returncode == 0 and "model: gemma-2-2b," in result.stdout  # the model presets
    assert "name_or_path: embedded:smollm2-135m" in result.stdout  # the composed defaults
    result = run_cli("sft", "--cfg", "job", "lora.r=4", "config=demo", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "r: 4" in result.stdout and "max_steps: 40" in result.stdout
    assert not any(tmp_path.iterdir())  # printing the config runs nothing and writes nothing


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["sft", "optim.lrr=1e-4"], "did you mean 'optim.lr'?"),
        (
            ["sft", "optim.lr=-1"],
            "optim.lr=-1.0 is not valid: the learning rate must be greater than 0.",
        ),
        (["sft", "lora.r=zero"], "lora.r='zero' has the wrong type"),
        (["sft", "config=missing.yaml"], "config=missing.yaml: no such file"),
        (["nosuchstage"], "unknown stage 'nosuchstage'"),
        (["sft", "-m", "lora.r=8,0"], "lora.r=0 is not valid"),
    ],
)
def test_bad_command_lines_exit_2_with_one_sentence(tmp_path, args, message):
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())  # refused before any output folder was made


def test_bad_datasets_exit_2_with_one_sentence(tmp_path, tiny_model, rlhf):
    cases = {
        "missing.jsonl": (None, "does not exist"),
        "bad.jsonl": ('{"prompt": "a", "completion": "b"}\n{oops\n', "line 2 is not valid JSON"),
        "columns.jsonl": ('{"text": "a"}\n' * 8, "has columns ['text']"),
        "empty.jsonl": ("", "has no rows"),
        "latin1.jsonl": (b'{"prompt": "caf\xe9", "completion": "b"}\n', "is not UTF-8"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content)
        result = rlhf(*tiny_sft_args(tiny_model, path, tmp_path / f"out-{name}"), cwd=tmp_path)
        assert result.returncode == 2, (name, result.stderr[-2000:])
        assert message in result.stderr, (name, result.stderr[-2000:])
        assert "Traceback" not in result.stderr


def test_a_finished_run_is_not_overwritten(tmp_path, tiny_model, chat16, rlhf):
    out = tmp_path / "run"
    (out / "final").mkdir(parents=True)
    (out / "final" / "rlhf_stage.json").write_text(json.dumps({"stage": "sft"}))
    result = rlhf(*tiny_sft_args(tiny_model, chat16, out, "train.max_steps=1"), cwd=tmp_path)
    assert result.returncode == 2 and "already holds a finished run" in result.stderr
    assert json.loads((out / "final" / "rlhf_stage.json").read_text()) == {"stage": "sft"}
    assert sorted(p.name for p in out.iterdir()) == [
        "final"
    ]  # not even a .hydra/ record was written


@pytest.mark.slow  # SIGKILL / signal / sweep: many processes (make test runs it)
def test_a_sweep_goes_on_past_a_job_with_bad_input_and_exits_2(tmp_path, tiny_model, chat16):
    out = tmp_path / "sweep"
    # max_length=8 leaves no assistant token in any example: that job stops with one sentence
    result = run_cli(*tiny_sft_args(tiny_model, chat16, out, "train.max_steps=1", "-m", "data.max_length=8,64"),
                     cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert (
        "no usable example" in result.stderr
        and "1 of 2 sweep jobs did not finish (jobs 0;" in result.stderr
    )
    assert "Traceback" not in result.stderr
    rows = list(csv.DictReader((out / "sweep_summary.csv").open()))
    assert [(r["data.max_length"], r["status"]) for r in rows] == [("8", "failed"), ("64", "done")]
    assert float(rows[1]["train/loss"]) > 0


def test_online_wandb_without_a_key_stops_before_loading(tmp_path, tiny_model, chat16):
    env = {"HOME": str(tmp_path), "WANDB_API_KEY": "", "WANDB_MODE": ""}
    result = run_cli(*tiny_sft_args(tiny_model, chat16, tmp_path / "out", "logger=wandb", "logger.wandb.mode=online"),
                     cwd=tmp_path, env=env)  # fmt: skip
    assert result.returncode == 2 and "needs a W&B API key" in result.stderr
    assert "model:" not in result.stdout  # nothing was loaded


def test_trl_is_never_imported_at_run_time():
    """TRL is a test-only oracle: importing every stage must not pull it in."""
    code = ("import sys, rlhf_cli.__main__, rlhf_cli.stages.sft, rlhf_cli.stages.reward, rlhf_cli.scoring; "
            "print(sorted(m for m in sys.modules if m == 'trl' or m.startswith('trl.')))")  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "args", [["dpo", "optim.lrr=1"], ["ppo", "ppo.vf_coef=0.1"], ["sft", "config=nope.yaml"]]
)
def test_a_config_error_answers_without_importing_a_model_library(tmp_path, args):
    """argv handling, composition and validation import no torch, transformers or peft, so a
    misspelt key answers at once (about 0.3 s on a 2-core machine instead of 4-10 s)."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "rlhf_cli", *args],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2 and "rlhf: error:" in result.stderr
    imported = {
        line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line
    }
    assert "rlhf_cli.cli.validate" in imported or "config=" in args[-1]  # the checks did run
    assert not {"torch", "transformers", "peft", "bitsandbytes"} & imported
