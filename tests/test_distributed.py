"""Several processes on CPU (torchrun, gloo): two processes with train.batch_size=b train like one
process with 2b, only rank 0 writes, and a killed two-process run resumes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf_cli.tracking import read_metrics

from conftest import assert_same_tensors, run_cli, tiny_sft_args

pytestmark = pytest.mark.slow


def torchrun(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 -m rlhf_cli ARGS` with this interpreter's torch."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(29500 + os.getpid() % 1000), "-m", "rlhf_cli", *args]  # fmt: skip
    full_env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600
    )


def assert_close_adapters(a: Path, b: Path) -> None:
    """Two runs' adapters agree to what float32 gives when the same gradient is summed in
    another order (two processes' halves, then an all-reduce): atol 2e-5 after a few steps. Not
    the reward head's bias: the Bradley-Terry loss does not depend on it, so its gradient is
    rounding noise, which Adam scales up to steps of size lr in either direction."""
    first, second = load_file(a), load_file(b)
    assert first.keys() == second.keys()
    for key in first:
        if not (a.name == "reward_head.safetensors" and key.endswith("bias")):
            torch.testing.assert_close(first[key], second[key], rtol=1e-4, atol=2e-5)


def stage_args(stage: str, model: Path, data: dict, out: Path, *extra: str) -> list[str]:
    if stage == "sft":
        return tiny_sft_args(model, data["chat"], out, *extra)
    return [stage, f"model.name_or_path={model}", f"data={data['prefs']}", "data.eval_size=4",
            f"output_dir={out}", "lora.dropout=0", *extra]  # fmt: skip


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo"])
def test_two_processes_train_like_one_with_twice_the_batch(stage, tmp_path, tiny_model, chat16):
    from tiny import preference_rows, write_jsonl

    data = {"chat": chat16, "prefs": write_jsonl(tmp_path / "prefs.jsonl", preference_rows(32, 0))}
    common = ["train.max_steps=5", "train.save_every=2", "optim.lr=5e-3"]
    common += ["samples.num_prompts=2"] if stage == "sft" else []
    common += ["dpo.precompute_reference=true"] if stage == "dpo" else []
    one = tmp_path / "one"
    result = run_cli(*stage_args(stage, tiny_model, data, one, *common, "train.batch_size=4"))
    assert result.returncode == 0, result.stderr[-3000:]
    two = tmp_path / "two"
    result = torchrun(*stage_args(stage, tiny_model, data, two, *common, "train.batch_size=2"),
                      cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # rank 0 alone prints and writes: one "done" line, one record per step, the same files
    assert result.stdout.count("done") == 1, result.stdout
    records = {run: [m for m in read_metrics(run) if "loss" in m] for run in (one, two)}
    assert [m["step"] for m in records[two]] == [1, 2, 3, 4, 5]
    for key in ("loss", "grad_norm") + (("accuracy",) if stage == "reward" else ()):
        assert [m[key] for m in records[two]] == pytest.approx(
            [m[key] for m in records[one]], rel=1e-5, abs=1e-6
        ), key
    files = {run: sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()) for run in (one, two)}  # fmt: skip
    assert files[one] == files[two]
    for weights in (one / "final").glob("*.safetensors"):
        assert_close_adapters(weights, two / "final" / weights.name)


def test_a_killed_two_process_run_resumes_with_each_process_random_state(
    tmp_path, tiny_model, chat16
):
    """With dropout on, each process draws its own masks (seed + rank x prime); a checkpoint holds
    every process's random state, so the resumed run matches the uninterrupted one exactly."""
    common = ["train.max_steps=5", "train.save_every=2", "optim.lr=5e-3", "train.batch_size=2",
              "lora.dropout=0.1"]  # fmt: skip
    full = tmp_path / "full"
    assert torchrun(*tiny_sft_args(tiny_model, chat16, full, *common), cwd=tmp_path).returncode == 0
    crashed = tmp_path / "crashed"
    args = tiny_sft_args(tiny_model, chat16, crashed, *common)
    result = torchrun(*args, cwd=tmp_path, env={"RLHF_TEST_KILL_AT": "step-end:3"})
    assert result.returncode != 0 and not (crashed / "final").exists()
    one = run_cli(*args, cwd=tmp_path)  # a two-process checkpoint is not resumed by one process
    assert one.returncode == 2 and "saved by 2 process(es), and this run has 1" in one.stderr
    result = torchrun(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout and "step-000002" in result.stdout
    losses = {run: [m["loss"] for m in read_metrics(run) if "loss" in m] for run in (full, crashed)}
    assert losses[crashed] == pytest.approx(losses[full], rel=1e-6)
    assert_same_tensors(full / "final" / "adapter_model.safetensors",
                        crashed / "final" / "adapter_model.safetensors")  # fmt: skip


def test_ppo_is_not_distributed_yet_and_says_so(tmp_path, tiny_model):
    from tiny import chat_rows, write_jsonl

    prompts = write_jsonl(tmp_path / "prompts.jsonl", chat_rows(16))
    result = torchrun("ppo", f"model.name_or_path={tiny_model}", f"data={prompts}",
                      "reward.fn=ppo_rewards:colour_share", f"output_dir={tmp_path / 'ppo'}",
                      cwd=tmp_path, env={"PYTHONPATH": str(Path(__file__).parent)})  # fmt: skip
    assert result.returncode != 0
    assert "rlhf ppo: error: rlhf ppo does not run in several processes yet" in result.stderr
