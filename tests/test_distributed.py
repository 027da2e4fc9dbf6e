"""Several processes on CPU (torchrun, gloo): two processes with train.batch_size=b train like one
process with 2b, only rank 0 writes, a killed two-process run resumes, PPO reports over both
processes' episodes, GRPO keeps each group on one process, and eval gives the numbers of one
process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf_cli.tracking import read_metrics

from conftest import assert_same_tensors, run_cli, sized_for_tests, tiny_sft_args
from numerics import EPS32, reordered_sum
from tiny import TINY_HIDDEN

# one xdist worker runs these (make test's --dist loadgroup): two torchrun jobs at once would
# share the cores and rendezvous ports
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("processes")]


# the one-process runs compared with torchrun's (whose processes get one thread each) use one
# thread too: a BLAS reduction's order may depend on the thread count
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def free_port() -> int:
    """A loopback port nothing listens on now (tests in parallel workers each get their own)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 -m rlhf_cli ARGS` with this interpreter's torch."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), "-m", "rlhf_cli", *sized_for_tests(args)]  # fmt: skip
    full_env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600
    )


def assert_close_adapters(a: Path, b: Path) -> None:
    """Two runs' adapters agree to what float32 gives when the same gradient is summed in
    another order (two processes' halves, then an all-reduce, and rows padded to other lengths).
    Adam moves an entry by about lr (5e-3) a step whatever its gradient's size, so a gradient's
    relative rounding (step_tolerances' grad_norm, ~1e-4) moves it by ~1e-4 x lr x steps =
    2.5e-6 in 5 steps; atol 5e-5 (1% of one step) leaves room for the entries whose gradient
    is small, where the relative error is larger, and fails an entry that moved a whole step
    the other way (another batch, a missing all-reduce). Not the reward head's bias: the
    Bradley-Terry loss does not depend on it, so its gradient is rounding noise, which Adam scales
    up to steps of size lr in either direction."""
    first, second = load_file(a), load_file(b)
    assert first.keys() == second.keys()
    for key in first:
        if not (a.name == "reward_head.safetensors" and key.endswith("bias")):
            torch.testing.assert_close(first[key], second[key], rtol=1e-4, atol=5e-5)


def step_tolerances(stage: str, record: dict) -> dict[str, float]:
    """How far one logged step of the two-process run may be from the one-process one: float32
    rounding of values built from sums of TINY_HIDDEN terms in another order, at the size of the
    terms, not of the result (reordered_sum). The loss and KTO's KL are differences of summed
    log-probs of tens of nats (logps/*), so their error is that of the log-probs (x4: policy and
    reference, chosen and rejected, each within it; the losses' slopes in them are <= 1), not of
    a KL of 0.03 (a fixed 1e-6 failed on another CPU). SFT's loss is a mean token NLL of ~5 nats,
    the reward model's a function of two scores with slope <= 1. The gradient norm is relative:
    each gradient entry is a sum over the step's tokens (4 rows of at most 64 here) and TINY_HIDDEN
    products, its large entries sums of terms of one sign (x4 for the halves' all-reduce and the
    optimizer's clipping, which read it). Accuracy is a share of rows: exact unless a score ties."""
    if stage in ("dpo", "kto"):  # (a step of KTO rows all of one label logs nan for the other)
        logps = [
            abs(record[k]) for k in ("logps/chosen", "logps/rejected") if record[k] == record[k]
        ]
        size = 4 * max(logps)
    elif stage == "reward":
        size = abs(record["rewards/chosen"]) + abs(record["rewards/rejected"]) + record["loss"]
    else:
        size = record["loss"]
    value = reordered_sum(TINY_HIDDEN, size)
    return {
        "loss": value,
        "kl": value,
        "grad_norm": 4 * reordered_sum(TINY_HIDDEN + 4 * 64, record["grad_norm"]),
        "accuracy": 0.0,
    }


# The recorded scores are shares in [0, 1]: the logged float32 mean of 8 against Python's float64
# mean of the same 8 differs by the float32 sum's rounding (reordered_sum) and its final rounding.
MEAN_OF_8_SHARES = reordered_sum(8, 1.0) + EPS32


def stage_args(stage: str, model: Path, data: dict, out: Path, *extra: str) -> list[str]:
    if stage == "sft":
        return tiny_sft_args(model, data["chat"], out, *extra)
    return [stage, f"model.name_or_path={model}", f"data={data['prefs']}", "data.eval_size=4",
            f"output_dir={out}", "lora.dropout=0", *extra]  # fmt: skip


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "kto"])
@pytest.mark.numerics
def test_two_processes_train_like_one_with_twice_the_batch(stage, tmp_path, tiny_model, chat16):
    from tiny import preference_rows, write_jsonl

    data = {"chat": chat16, "prefs": write_jsonl(tmp_path / "prefs.jsonl", preference_rows(32, 0))}
    common = ["train.max_steps=5", "train.save_every=2", "optim.lr=5e-3"]
    common += ["samples.num_prompts=2"] if stage == "sft" else []
    common += ["dpo.precompute_reference=true"] if stage == "dpo" else []
    one = tmp_path / "one"
    result = run_cli(*stage_args(stage, tiny_model, data, one, *common, "train.batch_size=4"),
                     env=ONE_THREAD)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    two = tmp_path / "two"
    result = torchrun(*stage_args(stage, tiny_model, data, two, *common, "train.batch_size=2"),
                      cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # rank 0 alone prints and writes: one "done" line, one record per step, the same files
    assert result.stdout.count("done") == 1, result.stdout
    unit = "rows" if stage in ("sft", "kto") else "pairs"
    # (words compared, not lines: the console wraps kto's longer start-up line)
    assert f"2 {unit} x 1 accumulation x 2 processes = 4 {unit} per step" in " ".join(
        result.stdout.split()
    )
    records = {run: [m for m in read_metrics(run) if "loss" in m] for run in (one, two)}
    assert [m["step"] for m in records[two]] == [1, 2, 3, 4, 5]
    # kto: its KL pairs are formed over the global micro-batch, so z0 is the one process's too
    extra = {"reward": ("accuracy",), "kto": ("kl",)}.get(stage, ())
    for first, second in zip(records[one], records[two], strict=True):
        tolerance = step_tolerances(stage, first)
        for key in ("loss", "grad_norm", *extra):
            assert second[key] == pytest.approx(first[key], abs=tolerance[key]), (
                key,
                first["step"],
            )
    files = {run: sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()) for run in (one, two)}  # fmt: skip
    assert files[one] == files[two]
    for weights in (one / "final").glob("*.safetensors"):
        assert_close_adapters(weights, two / "final" / weights.name)


def test_accelerate_launch_multi_gpu_runs_two_processes_like_torchrun(tmp_path, tiny_model, chat16):
    """`accelerate launch --multi_gpu --num_processes 2` (which starts torchrun's launcher, here on
    CPU with gloo) trains like one process with twice the batch, as torchrun does."""
    common = ["train.max_steps=3", "optim.lr=5e-3"]
    one = tmp_path / "one"
    result = run_cli(*tiny_sft_args(tiny_model, chat16, one, *common, "train.batch_size=4"),
                     env=ONE_THREAD)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    two = tmp_path / "two"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               "-m", "rlhf_cli", *sized_for_tests(tiny_sft_args(tiny_model, chat16, two, *common, "train.batch_size=2"))]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 processes = 4 rows per step" in result.stdout
    losses = {run: [m["loss"] for m in read_metrics(run) if "loss" in m] for run in (one, two)}
    assert len(losses[two]) == 3
    for first, second in zip(read_metrics(one), read_metrics(two), strict=True):
        if "loss" in first:
            assert second["loss"] == pytest.approx(
                first["loss"], abs=step_tolerances("sft", first)["loss"]
            )


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
    # exact by construction: the same two processes, threads and batches, resumed with every state
    losses = {run: [m["loss"] for m in read_metrics(run) if "loss" in m] for run in (full, crashed)}
    assert losses[crashed] == losses[full]
    assert_same_tensors(full / "final" / "adapter_model.safetensors",
                        crashed / "final" / "adapter_model.safetensors")  # fmt: skip


def test_ppo_in_two_processes_samples_per_process_and_reports_over_both(tmp_path, tiny_model):
    """Each process samples and scores its own episodes; the step's statistics (mean score, the
    held-out score) are over both processes' episodes, and only rank 0 writes: the same files as
    one process with the whole batch."""
    import json

    from tiny import chat_rows, write_jsonl

    prompts = write_jsonl(tmp_path / "prompts.jsonl", chat_rows(40))
    env = {"PYTHONPATH": str(Path(__file__).parent), "RLHF_TEST_SCORES": str(tmp_path)}

    def ppo(out: Path, batch_size: int) -> list[str]:
        return ["ppo", f"model.name_or_path={tiny_model}", f"data={prompts}", "data.eval_size=8",
                "reward.fn=ppo_rewards:recorded_colour_share", "reward.missing_eos_penalty=0",
                f"output_dir={out}", f"train.batch_size={batch_size}", "train.max_steps=3",
                "train.save_every=2", "rollout.max_new_tokens=6", "ppo.minibatches=2",
                "samples.every=0", "train.eval_every=0", "optim.lr=1e-3"]  # fmt: skip

    one, two = tmp_path / "one", tmp_path / "two"
    result = run_cli(*ppo(one, 4), env={**env, **ONE_THREAD})
    assert result.returncode == 0, result.stderr[-3000:]
    (tmp_path / "rank-0.jsonl").rename(tmp_path / "one-process.jsonl")
    result = torchrun(*ppo(two, 2), cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "3 PPO steps x 8 episodes (2 per micro-batch x 1 accumulation x 2 minibatches x 2 processes)"
        in result.stdout
    )
    assert result.stdout.count("done") == 1, result.stdout
    calls = {
        r: [json.loads(line) for line in (tmp_path / f"rank-{r}.jsonl").open()] for r in (0, 1)
    }
    # 3 training steps of 4 episodes, then the 8 held-out prompts: one batch of 4 per process
    assert [len(c) for c in calls[0]] == [len(c) for c in calls[1]] == [4, 4, 4, 4]
    records = [m for m in read_metrics(two) if "objective/scores" in m]
    assert [m["step"] for m in records] == [1, 2, 3]
    for step, record in enumerate(records):
        both = calls[0][step] + calls[1][step]
        assert record["objective/scores"] == pytest.approx(sum(both) / 8, abs=MEAN_OF_8_SHARES)
        assert record["ppo/episodes"] == 8
    held_out = calls[0][3] + calls[1][3]
    final = json.loads((two / "final" / "rlhf_stage.json").read_text())["final_metrics"]
    assert final["eval/scores"] == pytest.approx(sum(held_out) / 8, abs=MEAN_OF_8_SHARES)
    files = {run: sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()) for run in (one, two)}  # fmt: skip
    assert files[one] == files[two]


def test_grpo_in_two_processes_keeps_each_group_on_one_process(tmp_path, tiny_model):
    """Each process samples whole groups of its own prompts; the step's statistics are over both
    processes' episodes and only rank 0 writes (the same files as one process)."""
    import json

    from tiny import chat_rows, write_jsonl

    prompts = write_jsonl(tmp_path / "prompts.jsonl", chat_rows(40))
    env = {"PYTHONPATH": str(Path(__file__).parent), "RLHF_TEST_SCORES": str(tmp_path)}

    def grpo(out: Path, batch_size: int) -> list[str]:
        return ["grpo", f"model.name_or_path={tiny_model}", f"data={prompts}", "data.eval_size=8",
                "reward.fns=[ppo_rewards:recorded_colour_share]", f"output_dir={out}",
                f"train.batch_size={batch_size}", "grpo.group_size=4", "grpo.scale_rewards=batch",
                "train.max_steps=3", "train.save_every=2", "rollout.max_new_tokens=6",
                "rollout.batch_size=4", "samples.every=0", "train.eval_every=0", "optim.lr=1e-3"]  # fmt: skip

    one, two = tmp_path / "one", tmp_path / "two"
    result = run_cli(*grpo(one, 8), env={**env, **ONE_THREAD})
    assert result.returncode == 0, result.stderr[-3000:]
    (tmp_path / "rank-0.jsonl").rename(tmp_path / "one-process.jsonl")
    result = torchrun(*grpo(two, 4), cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3 GRPO steps x 2 prompts x 4 samples (4 per micro-batch x 1 accumulation x 1 minibatches x 2 processes)" in result.stdout  # fmt: skip
    assert result.stdout.count("done") == 1, result.stdout
    calls = {
        r: [json.loads(line) for line in (tmp_path / f"rank-{r}.jsonl").open()] for r in (0, 1)
    }
    # 3 steps: each process scores one whole group of 4 per step; then 4 held-out prompts each
    assert [len(c) for c in calls[0]] == [len(c) for c in calls[1]] == [4, 4, 4, 4]
    records = [m for m in read_metrics(two) if "reward/mean" in m]
    assert [m["step"] for m in records] == [1, 2, 3]
    for step, record in enumerate(records):
        both = calls[0][step] + calls[1][step]
        assert record["reward/mean"] == pytest.approx(sum(both) / 8, abs=MEAN_OF_8_SHARES)
        assert record["grpo/episodes"] == 8
    held_out = calls[0][3] + calls[1][3]
    final = json.loads((two / "final" / "rlhf_stage.json").read_text())["final_metrics"]
    assert final["eval/reward"] == pytest.approx(sum(held_out) / 8, abs=MEAN_OF_8_SHARES)
    files = {run: sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()) for run in (one, two)}  # fmt: skip
    assert files[one] == files[two]


def test_eval_in_two_processes_gives_the_numbers_of_one(
    tmp_path, sft_final, rm_final, prompts_file
):
    """Generation, judging, reward-model scores, KL samples and perplexity run over batches dealt
    to the processes; a batch holds the same prompts either way, so eval.json is the same (3
    batches of 3, 3 and 2 prompts: rank 0 takes two, rank 1 one). The judge sees each response
    once in all: a judge that calls a paid model is not asked once per process."""
    import json

    env = {"PYTHONPATH": str(Path(__file__).parent), "RLHF_TEST_SCORES": str(tmp_path)}

    def evaluate(out: Path) -> list[str]:
        return ["eval", f"policy={sft_final}", f"reward.from={rm_final}", f"data={prompts_file}",
                "data.eval_size=8", f"perplexity_data={prompts_file}",
                "judge=ppo_rewards:recorded_colour_share",
                f"output_dir={out}", "generation.batch_size=3", "generation.max_new_tokens=6",
                "samples=2"]  # fmt: skip

    def judged(rank: int) -> list[list[float]]:
        return [json.loads(line) for line in (tmp_path / f"rank-{rank}.jsonl").open()]

    one, two = tmp_path / "one", tmp_path / "two"
    assert run_cli(*evaluate(one), env={**env, **ONE_THREAD}).returncode == 0
    assert [len(call) for call in judged(0)] == [3, 3, 2]
    (tmp_path / "rank-0.jsonl").unlink()
    result = torchrun(*evaluate(two), cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done") == 1, result.stdout
    assert [len(call) for call in judged(0)] == [3, 2] and [len(call) for call in judged(1)] == [3]
    reports = [json.loads((run / "eval.json").read_text()) for run in (one, two)]
    assert len(reports[1]["responses"]) == 8
    assert reports[1]["responses"] == reports[0]["responses"]
    # exact by construction: each batch holds the same prompts at the same padded width, run with
    # one thread either way, and the rows come back in the one process's order before any mean
    for key in ("gold/mean", "gold/ci_low", "rm/mean", "rm/ci_low", "kl", "perplexity",
                "response_length", "eos_rate"):  # fmt: skip
        assert reports[1]["metrics"][key] == reports[0]["metrics"][key], key
    files = {run: sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()) for run in (one, two)}  # fmt: skip
    assert files[one] == files[two]


@pytest.mark.parametrize(
    ("stage", "rows", "steps"),
    [
        # 16 chat rows less 3 held out: 13 = 3 x 4 + 1, a tail of one row for two processes
        ("sft", 16, 5),
        # 23 pairs less 4 held out: 19 = 4 x 4 + 3, a tail that two processes split 2 + 1
        ("dpo", 23, 6),
        # KTO's rows are the 23 pairs' 46 completions less 3 held out: 43 = 10 x 4 + 3
        ("kto", 23, 11),
    ],
)
def test_an_epoch_tail_that_does_not_divide_among_the_processes_trains_every_row(
    stage, rows, steps, tmp_path, tiny_model
):
    """The last micro-batch of an epoch is split as evenly as it goes: a share may be empty (one
    row, two processes) or shorter than another's, and the step still trains on every row, as
    one process with twice the batch does (the same losses, within rounding)."""
    from tiny import chat_rows, preference_rows, write_jsonl

    data = {
        "chat": write_jsonl(tmp_path / "chat.jsonl", chat_rows(rows)),
        "prefs": write_jsonl(tmp_path / "prefs.jsonl", preference_rows(rows, 0)),
    }
    common = [
        f"train.max_steps={steps}",
        "optim.lr=5e-3",
        "data.eval_size=4" if stage == "dpo" else "data.eval_size=3",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    result = run_cli(
        *stage_args(stage, tiny_model, data, one, *common, "train.batch_size=4"), env=ONE_THREAD
    )
    assert result.returncode == 0, result.stderr[-3000:]
    result = torchrun(
        *stage_args(stage, tiny_model, data, two, *common, "train.batch_size=2"), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = {run: [m for m in read_metrics(run) if "loss" in m] for run in (one, two)}
    assert [m["step"] for m in records[two]] == list(range(1, steps + 1))
    for first, second in zip(records[one], records[two], strict=True):
        tolerance = step_tolerances(stage, first)
        for key in ("loss", "grad_norm"):
            assert second[key] == pytest.approx(first[key], abs=tolerance[key]), (
                key,
                first["step"],
            )


def test_shards_cover_every_row_once_in_order_with_sizes_within_one(monkeypatch):
    # the epoch's tail is any length: shorter than the processes (some get none), or not a multiple
    from rlhf_cli import distributed

    for size in range(1, 5):
        monkeypatch.setenv("WORLD_SIZE", str(size))
        for n in range(13):
            rows = list(range(n))
            shares = []
            for me in range(size):
                monkeypatch.setenv("RANK", str(me))
                shares.append(distributed.shard(rows))
            assert sum(shares, []) == rows, (size, n)
            lengths = [len(share) for share in shares]
            assert max(lengths) - min(lengths) <= 1, (size, n, lengths)


def test_grpo_in_an_environment_in_two_processes_plays_whole_groups_on_each(tmp_path, tiny_model):
    """Multi-turn episodes under torchrun: each process resets its own prompts' environments,
    a group's G episodes on one process; the episode statistics are over both processes' 8
    episodes a step."""
    import json

    from tiny import write_jsonl

    rows = write_jsonl(tmp_path / "rows.jsonl", [{"n": i} for i in range(40)])
    env = {"PYTHONPATH": str(Path(__file__).parent), "RLHF_TEST_SCORES": str(tmp_path)}
    args = ["grpo", f"model.name_or_path={tiny_model}", f"data={rows}", "data.eval_size=0",
            "env=toy_envs:RecordedEcho", "env.max_turns=2", f"output_dir={tmp_path / 'two'}",
            "train.batch_size=4", "grpo.group_size=4", "train.max_steps=2",
            "rollout.max_new_tokens=4", "samples.every=0", "train.eval_every=0"]  # fmt: skip
    result = torchrun(*args, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    played = {
        r: [json.loads(line) for line in (tmp_path / f"env-rank-{r}.jsonl").open()] for r in (0, 1)
    }
    for r in (0, 1):  # 2 steps x one group of 4 episodes of one row
        assert len(played[r]) == 8 and all(len(set(played[r][k : k + 4])) == 1 for k in (0, 4))
    assert not set(played[0]) & set(played[1])  # each row on one process
    records = [m for m in read_metrics(tmp_path / "two") if "episode/turns" in m]
    assert [m["step"] for m in records] == [1, 2]
    for m in records:
        assert m["grpo/episodes"] == 8
        shares = [
            m[f"episode/finish_{k}"] for k in ("done", "max_turns", "max_tokens", "truncated")
        ]
        assert all(abs(s * 8 - round(s * 8)) < 1e-12 for s in shares)  # counts out of 8 episodes
        assert 1 <= m["episode/turns"] <= 2
