"""Crash safety and numerical guards: checkpoint checksums, recovery of interrupted writes, a full
disk or a permission error while writing, NaN/inf losses. (The SIGKILL tests of each stage are
beside the stage's other tests: test_sft, test_reward, test_dpo, test_ppo.)"""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from rlhf_cli import checkpoint
from rlhf_cli.loop import Diverged, NonFiniteGuard
from rlhf_cli.tracking import read_metrics

from conftest import assert_intact, run_in_process, tiny_sft_args


def run_captured(argv: list[str], monkeypatch, capfd) -> tuple[int, str, str]:
    """`rlhf ARGV` in this process (so a test can patch it): (exit code, stdout, stderr)."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    capfd.readouterr()
    code = run_in_process(argv)
    out, err = capfd.readouterr()
    return code, out, err


# ---------------------------------------------------------------- checksums in COMPLETE
def _folder(tmp_path, name="ckpt"):
    target = tmp_path / name
    with checkpoint.atomic_folder(target) as tmp:
        (tmp / "a.bin").write_bytes(b"abcdef")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.json").write_text('{"x": 1}')
    return target


def test_complete_marker_indexes_every_file_and_damage_finds_what_changed(tmp_path):
    folder = _folder(tmp_path)
    index = json.loads((folder / "COMPLETE").read_text())["files"]
    assert sorted(index) == ["a.bin", "sub/b.json"] and index["a.bin"]["bytes"] == 6
    assert checkpoint.damage(folder) is None
    (folder / "a.bin").write_bytes(b"abcdeX")  # same size, one byte differs
    assert checkpoint.damage(folder) == "a.bin differs from its checksum"
    (folder / "a.bin").write_bytes(b"abc")
    assert checkpoint.damage(folder) == "a.bin differs from its checksum"
    (folder / "a.bin").unlink()
    assert checkpoint.damage(folder) == "a.bin is missing"
    (folder / "COMPLETE").unlink()
    assert "no COMPLETE marker" in checkpoint.damage(folder)
    (folder / "COMPLETE").write_text("2026-01-01T00:00:00")  # a marker from before the index
    assert checkpoint.damage(folder) is None


def test_a_failed_write_leaves_the_old_folder_and_no_temporary_one(tmp_path):
    folder = _folder(tmp_path)
    before = (folder / "a.bin").read_bytes()
    full = pytest.raises(checkpoint.WriteError, match="No space left on device")
    with full, checkpoint.atomic_folder(folder) as tmp:
        (tmp / "a.bin").write_bytes(b"new")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert (folder / "a.bin").read_bytes() == before and checkpoint.damage(folder) is None
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_resume_auto_passes_over_a_damaged_newest_checkpoint(tmp_path, capsys):
    root = tmp_path / "run" / "checkpoints"
    for step in (2, 4):
        with checkpoint.atomic_folder(root / f"step-{step:06d}") as tmp:
            (tmp / checkpoint.TRAINER_STATE).write_bytes(b"state %d" % step)
    (root / "step-000004" / checkpoint.TRAINER_STATE).write_bytes(b"state 5")
    found = checkpoint.prepare_output_dir(str(tmp_path / "run"), False, "auto")
    assert found == root / "step-000002"
    assert "skipping damaged checkpoint" in capsys.readouterr().err
    with pytest.raises(checkpoint.UserError, match="is damaged"):
        checkpoint.prepare_output_dir(str(tmp_path / "run"), False, str(root / "step-000004"))


def test_recovery_puts_back_a_folder_moved_aside_by_a_killed_process(tmp_path):
    dead = 2**22 + 12345  # above the default pid_max: no such process
    _folder(tmp_path, f".old-final-{dead}")  # killed between moving final/ aside and renaming
    (tmp_path / f".tmp-final-{dead}").mkdir()  # ... its new copy in
    (tmp_path / f".trash-step-000002-{dead}").mkdir()
    alive = tmp_path / f".tmp-step-000004-{os.getppid()}"  # a live process's write: left alone
    alive.mkdir()
    checkpoint.recover_interrupted_writes(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["final", alive.name])
    assert checkpoint.damage(tmp_path / "final") is None


# ---------------------------------------------------------------- a full disk, no permission
@pytest.mark.slow
@pytest.mark.parametrize(
    ("folder", "error", "intact"),
    [
        ("step-000004", OSError(errno.ENOSPC, "No space left on device"), "step-000002"),
        ("final", PermissionError(errno.EACCES, "Permission denied"), "step-000004"),
    ],
)
def test_a_write_error_keeps_the_previous_checkpoint_and_says_how_to_continue(
    tmp_path, tiny_model, chat16, monkeypatch, capfd, folder, error, intact
):
    out = tmp_path / "run"
    args = tiny_sft_args(tiny_model, chat16, out, "train.max_steps=6", "train.save_every=2",
                         "train.keep_last=1", "train.eval_every=0")  # fmt: skip
    real_write = checkpoint.write_bytes

    def failing_write(path, content):
        if path.parent.name.startswith(f".tmp-{folder}-"):
            raise error
        real_write(path, content)

    monkeypatch.setattr(checkpoint, "write_bytes", failing_write)
    code, _, err = run_captured(args, monkeypatch, capfd)
    assert code == 4, err[-2000:]
    assert "Traceback" not in err
    assert (
        error.strerror in err and f"{intact} is intact" in err and "continue with: rlhf sft" in err
    )
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == [intact] and not (out / "final").exists()
    assert_intact(out)

    monkeypatch.setattr(checkpoint, "write_bytes", real_write)  # space freed: the same command
    code, out_text, err = run_captured(args, monkeypatch, capfd)
    assert code == 0, err[-2000:]
    assert f"resumed from {out / 'checkpoints' / intact}" in out_text.replace("\n", "")
    assert_intact(out)
    assert [m["step"] for m in read_metrics(out) if "loss" in m] == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------- non-finite losses
def test_guard_skips_counts_and_stops_after_max_in_a_row(tmp_path):
    guard = NonFiniteGuard(3, str(tmp_path), skipped=4)
    assert guard.finite(1, 0.5, 1.0)
    assert not guard.finite(2, float("nan"), 1.0)
    assert not guard.finite(3, 0.5, float("inf"))
    assert guard.finite(4, 0.5, 1.0) and guard.in_a_row == 0  # a good update resets the run
    assert not guard.finite(5, float("-inf"), 1.0)
    assert not guard.finite(6, float("nan"), float("nan"))
    with pytest.raises(Diverged, match=r"not finite in 3 updates in a row \(at step 7; 9 skipped"):
        guard.finite(7, float("nan"), 1.0)


def poison_forward(monkeypatch, bad) -> list[int]:
    """Make the tiny Llama's hidden states NaN in the forward passes that build gradients whose
    number (1, 2, ...) `bad` accepts; returns the list of poisoned call numbers."""
    from transformers.models.llama.modeling_llama import LlamaModel

    original, calls, poisoned = LlamaModel.forward, [0], []

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if torch.is_grad_enabled():
            calls[0] += 1
            if bad(calls[0]):
                out.last_hidden_state = out.last_hidden_state * float("nan")
                poisoned.append(calls[0])
        return out

    monkeypatch.setattr(LlamaModel, "forward", forward)
    return poisoned


@pytest.mark.slow
def test_a_nan_step_is_skipped_and_the_run_goes_on(
    tmp_path, tiny_model, chat16, monkeypatch, capfd
):
    out = tmp_path / "run"
    args = tiny_sft_args(tiny_model, chat16, out, "train.max_steps=6", "train.eval_every=0",
                         "optim.scheduler=linear", "optim.warmup_ratio=0")  # fmt: skip
    poisoned = poison_forward(monkeypatch, lambda call: call == 3)
    code, _, err = run_captured(args, monkeypatch, capfd)
    assert code == 0, err[-2000:]
    assert poisoned == [3]
    steps = {m["step"]: m for m in read_metrics(out) if "loss" in m}
    assert [steps[s]["skipped_updates"] for s in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    assert steps[3]["loss"] != steps[3]["loss"]  # NaN, logged as it was
    # exact: the skipped step left the schedule where it was, so step 4 reads the same rate
    assert steps[4]["lr"] == steps[3]["lr"] > steps[5]["lr"]  # the schedule waited one step
    weights = load_file(out / "final" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.slow
def test_a_ppo_step_whose_updates_were_all_skipped_leaves_the_schedule_where_it_was(
    tmp_path, sft_final, prompts_file, monkeypatch, capfd
):
    """PPO stepped its learning-rate schedule after every step, even one whose updates were all
    skipped as non-finite; now it waits, as a skipped update does in the other stages."""
    out = tmp_path / "run"
    args = ["ppo", f"data={prompts_file}", "data.eval_size=8", f"output_dir={out}",
            f"policy.init_from={sft_final}", "reward.fn=ppo_rewards:colour_share",
            "train.batch_size=4", "ppo.minibatches=1", "ppo.epochs=1", "rollout.max_new_tokens=6",
            "samples.every=0", "train.max_steps=4", "train.eval_every=0", "optim.scheduler=linear",
            "optim.warmup_ratio=0"]  # fmt: skip
    # one update per step, two passes with gradients each (policy, value): step 2 is calls 3, 4
    poisoned = poison_forward(monkeypatch, lambda call: call in (3, 4))
    code, _, err = run_captured(args, monkeypatch, capfd)
    assert code == 0, err[-2000:]
    assert poisoned == [3, 4]
    steps = {m["step"]: m for m in read_metrics(out) if "lr" in m}
    assert [steps[s]["skipped_updates"] for s in range(1, 5)] == [0, 1, 1, 1]
    # exact: step 2's updates were all skipped, so step 3 reads the rate step 2 used
    assert steps[1]["lr"] > steps[2]["lr"] == steps[3]["lr"] > steps[4]["lr"]


def _stage_args(stage, tmp_path, tiny_model, chat16, sft_final, rm_final, prompts_file):
    from tiny import preference_rows, write_jsonl

    out = tmp_path / stage
    steps = ["train.max_steps=6", "train.save_every=2", "train.keep_last=1", "train.eval_every=0"]
    if stage == "sft":
        return tiny_sft_args(tiny_model, chat16, out, *steps)
    if stage == "ppo":
        return ["ppo", f"data={prompts_file}", "data.eval_size=8", f"output_dir={out}",
                "train.batch_size=4", "rollout.max_new_tokens=8", "samples.every=0",
                f"policy.init_from={sft_final}", f"reward.from={rm_final}", *steps]  # fmt: skip
    if stage == "grpo":  # one update per step, as in sft, reward and dpo
        return ["grpo", f"data={prompts_file}", "data.eval_size=8", f"output_dir={out}",
                "train.batch_size=8", "train.grad_accum=1", "grpo.group_size=4",
                "rollout.max_new_tokens=8", "samples.every=0", f"policy.init_from={sft_final}",
                f"reward.from={rm_final}", *steps]  # fmt: skip
    prefs = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(32, 0))
    return [stage, f"init_from={sft_final}", f"data={prefs}", "data.eval_size=4",
            f"output_dir={out}", "train.batch_size=4", *steps]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "kto", "ppo", "grpo"])
def test_nan_updates_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(
    stage, tmp_path, tiny_model, chat16, sft_final, rm_final, prompts_file, monkeypatch, capfd
):
    args = _stage_args(stage, tmp_path, tiny_model, chat16, sft_final, rm_final, prompts_file)
    out = tmp_path / stage
    # gradients are fine until the checkpoint at step 2 is written, then NaN for good. One update
    # per step (sft, reward, dpo, kto, grpo): steps 3, 4 and 5 are skipped (step 4's checkpoint holds step 2's
    # weights: a skipped update changes nothing) and the run stops in step 5; PPO makes several
    # updates per step and stops in step 3.
    state = {"saved": False}
    real_save = checkpoint.save_checkpoint

    def save_and_note(*a, **k):
        state["saved"] = True
        return real_save(*a, **k)

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_and_note)
    poison_forward(monkeypatch, lambda call: state["saved"])
    code, _, err = run_captured(args, monkeypatch, capfd)
    assert code == 3, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith(f"rlhf {stage}: stopped:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert "not finite in 3 updates in a row" in lines[0]
    last = "step-000002" if stage == "ppo" else "step-000004"
    assert f"the last good checkpoint is {out / 'checkpoints' / last}" in lines[0]
    assert not (out / "final").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [last]
    assert_intact(out)  # also: every tensor in it is finite


def test_resuming_across_versions_compares_only_the_settings_both_have():
    """A key a later version added (data.extra_roles) or removed (ppo.vf_coef) is no change: the
    saved run trained without it. A value both have that differs still is."""
    from rlhf_cli.checkpoint import config_changes

    saved = {"optim": {"lr": 1e-4}, "ppo": {"vf_coef": 0.1, "epochs": 4}}
    current = {"optim": {"lr": 1e-4}, "ppo": {"epochs": 4}, "data": {"extra_roles": []}}
    assert config_changes(saved, current) == {}
    assert config_changes(saved, {**current, "optim": {"lr": 2e-4}}) == {"optim.lr": (1e-4, 2e-4)}
