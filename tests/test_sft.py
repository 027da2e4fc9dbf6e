"""`rlhf sft` end to end on a tiny Llama: learning, QLoRA on CPU, final/ loadable by peft, resume, sweeps."""

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from rlhf_cli.tracking import read_metrics

from conftest import (
    assert_same_tensors,
    config_of,
    kill_and_resume,
    run_cli,
    tiny_lora_model,
    tiny_sft_args,
)
from numerics import EPS64, log_softmax_error, reordered_sum
from tiny import TINY_HIDDEN

OVERFIT = [
    "data.eval_size=0",
    "train.batch_size=8",
    "train.max_steps=40",
    "optim.lr=1e-2",
    "optim.warmup_ratio=0",
    "train.log_every=10",
]


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_sft_overfits_16_examples_and_final_loads_with_peft(tmp_path, tiny_model, chat16, quant):
    out = tmp_path / f"run-{quant}"
    keep = ["train.save_every=10", "train.keep_last=2"]
    result = run_cli(
        *tiny_sft_args(tiny_model, chat16, out, f"quant={quant}", *OVERFIT, *keep), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # checkpoints at 10, 20, 30 (step 40 is final/): only the last two are kept, none half-written
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000020", "step-000030"]
    metrics = read_metrics(out)
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses[0] > 1.0 and losses[-1] < 0.15  # memorised: from >1 nat/token to <0.15
    # the rate step 1 used (no warmup), not the next one. Exact: with min_lr_ratio 0 the cosine
    # factor at step 0 is 0 + 1 x 0.5 x (1 + cos 0) = 1.0, so the rate is optim.lr itself
    assert metrics[0]["lr"] == 1e-2
    manifest = json.loads((out / "final" / "rlhf_stage.json").read_text())
    assert manifest["stage"] == "sft" and manifest["config"]["quant"]["mode"] == quant
    # exact: the last step's loss, one Python float written to two JSON files and read back
    assert manifest["final_metrics"]["train/loss"] == losses[-1]

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        base_logits = base(ids).logits
        tuned = PeftModel.from_pretrained(base, out / "final")
        saved = load_file(out / "final" / "adapter_model.safetensors")
        loaded = {k: v for k, v in tuned.state_dict().items() if "lora_" in k}
        assert len(loaded) == len(saved) > 0
        for key, value in saved.items():
            match = [v for k, v in loaded.items() if k.replace(".default", "") == key]
            assert torch.equal(match[0], value)  # exact: peft copies the file's float32 values
        # behavioural: 40 steps at lr 1e-2 (the loss fell from > 1 to < 0.15) move logits by O(1);
        # 1e-3 is far above float32 rounding of logits of magnitude ~10 (~1e-5)
        assert not torch.allclose(tuned(ids).logits, base_logits, atol=1e-3)


@pytest.mark.slow  # SIGKILL / signal / sweep: many processes (make test runs it)
def test_sigkill_at_random_points_then_resume_reproduces_the_uninterrupted_run(
    tmp_path, tiny_model, chat16
):
    common = [
        "train.max_steps=6",
        "train.save_every=2",
        "train.keep_last=1",
        "train.eval_every=0",
        "lora.dropout=0.1",
        "optim.lr=5e-3",
    ]  # dropout: the RNG state must be restored too
    full = tmp_path / "full"
    assert run_cli(*tiny_sft_args(tiny_model, chat16, full, *common), cwd=tmp_path).returncode == 0

    crashed = tmp_path / "crashed"
    kills = kill_and_resume(
        tiny_sft_args(tiny_model, chat16, crashed, *common), crashed, tmp_path, 1
    )
    full_loss = {m["step"]: m["loss"] for m in read_metrics(full) if "loss" in m}
    resumed_metrics = [m for m in read_metrics(crashed) if "loss" in m]
    assert [m["step"] for m in resumed_metrics] == list(range(1, 7)), kills  # none lost or twice
    for m in resumed_metrics:
        # exact: the same process setup (threads, kernels) replays the same batches and dropout
        # masks from restored weights, optimizer, schedule and random state
        assert m["loss"] == full_loss[m["step"]], kills
    assert_same_tensors(
        full / "final" / "adapter_model.safetensors",
        crashed / "final" / "adapter_model.safetensors",
    )


@pytest.mark.slow  # SIGKILL / signal / sweep: many processes (make test runs it)
def test_sigterm_saves_a_checkpoint_exits_143_and_prints_the_resume_command(
    tmp_path, tiny_model, chat16
):
    """SIGTERM mid-run: the step finishes, a resume checkpoint is saved (save_every is far away),
    the exit code is 143 and the printed command, run as printed, ends like an uninterrupted run."""
    import shlex

    common = ["train.max_steps=6", "train.save_every=100", "train.eval_every=0", "optim.lr=5e-3"]
    full = tmp_path / "full"
    assert run_cli(*tiny_sft_args(tiny_model, chat16, full, *common), cwd=tmp_path).returncode == 0
    stopped = tmp_path / "stopped"
    result = run_cli(
        *tiny_sft_args(tiny_model, chat16, stopped, *common),
        cwd=tmp_path,
        env={"RLHF_TEST_SIGNAL_AT_STEP": "3:TERM"},
    )
    assert result.returncode == 143, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "stopped by SIGTERM after step 3" in result.stderr
    assert not (stopped / "final").exists()
    assert [p.name for p in (stopped / "checkpoints").iterdir()] == ["step-000003"]
    assert (stopped / "checkpoints" / "step-000003" / "COMPLETE").is_file()
    # resuming with settings that train differently is refused, and changes nothing
    changed = run_cli(
        *tiny_sft_args(tiny_model, chat16, stopped, *common, "optim.lr=1e-2"), cwd=tmp_path
    )
    assert changed.returncode == 2 and "cannot resume from" in changed.stderr
    assert "optim.lr=0.005 -> 0.01" in changed.stderr
    command = shlex.split(result.stderr.strip().splitlines()[-1])
    assert command[:2] == ["rlhf", "sft"] and command[-1] == f"output_dir={stopped}"
    resumed = run_cli(*command[1:], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step-000003" in resumed.stdout
    assert_same_tensors(
        full / "final" / "adapter_model.safetensors",
        stopped / "final" / "adapter_model.safetensors",
    )


@pytest.mark.slow  # SIGKILL / signal / sweep: many processes (make test runs it)
def test_two_by_two_sweep_writes_four_jobs_and_a_summary(tmp_path, tiny_model, chat16):
    out = tmp_path / "sweep"
    result = run_cli(
        *tiny_sft_args(
            tiny_model, chat16, out, "train.max_steps=2", "-m", "optim.lr=1e-3,1e-2", "lora.r=4,8"
        ),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["0", "1", "2", "3"]
    for job in "0123":
        assert (out / job / "final" / "rlhf_stage.json").is_file()
    rows = list(csv.DictReader((out / "sweep_summary.csv").open()))
    assert [(float(r["optim.lr"]), int(r["lora.r"])) for r in rows] == [
        (1e-3, 4),
        (1e-3, 8),
        (1e-2, 4),
        (1e-2, 8),
    ]
    assert all(r["status"] == "done" and float(r["eval/loss"]) > 0 for r in rows)
    ranks = [
        json.loads((out / j / "final" / "rlhf_stage.json").read_text())["config"]["lora"]["r"]
        for j in "0123"
    ]
    assert ranks == [4, 8, 4, 8]
    assert "sweep summary" in result.stdout


def test_wandb_offline_logger_packing_and_gradient_checkpointing(tmp_path, tiny_model, chat16):
    out = tmp_path / "wandb-run"
    result = run_cli(
        *tiny_sft_args(
            tiny_model,
            chat16,
            out,
            "train.max_steps=2",
            "data.packing=true",
            "logger=wandb",
            "logger.wandb.mode=offline",
            "data.max_length=64",
            "model.gradient_checkpointing=true",
        ),
        cwd=tmp_path,
        env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((out / "wandb").glob("offline-run-*")), "wandb wrote no offline run"
    assert "packing:" in result.stdout
    steps = [m for m in read_metrics(out) if "loss" in m]
    assert len(steps) == 2 and all(m["perf/padding_fraction"] < 0.5 for m in steps)


def test_overwrite_keeps_the_old_final_until_the_new_one_is_written(tmp_path, tiny_model, chat16):
    out = tmp_path / "run"
    args = tiny_sft_args(tiny_model, chat16, out, "train.max_steps=4", "train.save_every=2")
    assert run_cli(*args, cwd=tmp_path).returncode == 0
    old = (out / "final" / "rlhf_stage.json").read_text()
    crashed = run_cli(
        *args, "overwrite=true", "seed=7", cwd=tmp_path, env={"RLHF_TEST_KILL_AT": "step-end:3"}
    )
    assert crashed.returncode == -9
    assert (
        not (out / "final").exists()
        and (out / "final.previous" / "rlhf_stage.json").read_text() == old
    )
    # the same command again resumes the new run (its own checkpoint), then drops the old final
    result = run_cli(*args, "overwrite=true", "seed=7", cwd=tmp_path)
    assert result.returncode == 0 and "step-000002" in result.stdout
    assert not (out / "final.previous").exists()
    assert json.loads((out / "final" / "rlhf_stage.json").read_text())["config"]["seed"] == 7
    assert [m["step"] for m in read_metrics(out) if "loss" in m] == [1, 2, 3, 4]


@pytest.mark.parametrize("packed", [False, True])
def test_loss_from_target_logits_only_equals_the_full_logits_loss(
    tiny_model, chat16, packed, monkeypatch
):
    """The LM head run only where a label is, fused with its log-softmax a few rows at a time
    (modeling.target_logprobs, head.head_logprobs), gives the loss and the gradients of the
    full-vocabulary logits at every position (losses.sft_loss), padded and packed; in float64,
    where the two agree to rounding."""
    from rlhf_cli import data, losses, modeling
    from rlhf_cli import head as fused
    from rlhf_cli.modeling import forward_loss

    config = config_of("sft")
    tokenizer, model, params = tiny_lora_model(config, tiny_model)
    model.double()
    monkeypatch.setattr(fused, "HEAD_CHUNK_ELEMENTS", 5 * len(tokenizer))  # 5 rows a chunk
    device = torch.device("cpu")
    rows = [json.loads(line) for line in chat16.open()]
    examples, _ = data.tokenize_sft(rows, tokenizer, config.data, "chat16")
    examples = data.pack(examples, 64) if packed else examples[:6]
    batch = data.collate(examples, tokenizer.pad_token_id, packed)

    def loss_and_grads(compute):
        model.zero_grad(set_to_none=True)
        loss_sum, count = compute()
        loss_sum.backward()
        return loss_sum.item(), int(count), [p.grad.clone() for p in params]

    def full():
        inputs = {
            k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")
        }
        return losses.sft_loss(model(**inputs, use_cache=False).logits, batch["labels"])

    ours = loss_and_grads(lambda: forward_loss(model, batch, device, torch.float64))
    reference = loss_and_grads(full)
    assert ours[1] == reference[1] > 5
    # float64, the same backbone; the head on 5-row chunks against one GEMM: each logit (a dot
    # product of TINY_HIDDEN terms, sum|h_k w_k| <= S) within reordered_sum(TINY_HIDDEN, S), a
    # log-prob 2x that + log_softmax_error(V, max|z|); the loss, a sum of count of them (all of
    # one sign) within reordered_sum(positions, |loss|) more: ~1e-10; a token more or less is ~1
    inputs = {
        k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")
    }
    with torch.no_grad():
        hidden = modeling.hidden_states(model, **inputs)
        weight = model.get_output_embeddings().weight
        largest = (hidden.abs() @ weight.abs().T).max().item()
        logits_max = (hidden @ weight.T).abs().max().item()
    per_logprob = 2 * reordered_sum(TINY_HIDDEN, largest, EPS64) + log_softmax_error(
        len(weight), logits_max, EPS64
    )
    bound = ours[1] * per_logprob + reordered_sum(
        batch["input_ids"].numel(), abs(reference[0]), EPS64
    )
    assert ours[0] == pytest.approx(reference[0], rel=0, abs=bound)
    for mine, theirs in zip(ours[2], reference[2], strict=True):
        # float64: the two paths differ only in d loss / d hidden (the fused (onehot - softmax) @ W
        # against autograd's), a 373-term sum's rounding, ~1e-13 at |W| <= 1; the same backward
        # carries it linearly to gradients of |g| <= 40, so ~1e-13 x |g|: rtol 1e-10 and atol 1e-12
        # leave 1e3 and ~10x, and a wrong row's or target's gradient is off by > 1e-3 relative
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)
