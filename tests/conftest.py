"""Shared fixtures: a tiny Llama + tokenizer made once per session, tiny datasets, and a CLI runner."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import chat_rows, make_model, preference_rows, write_jsonl  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# the console script `make install` put beside this interpreter (not whatever `rlhf` PATH finds
# first); where there is none (the package installed with pip --target, as scripts/gpu_check.sh
# does on a lent GPU machine), the same entry point through the module
_SCRIPT = Path(sysconfig.get_path("scripts")) / "rlhf"
RLHF = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "rlhf_cli"]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def chat16(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat16.jsonl", chat_rows(16))


# The shipped stage defaults are sized for an 8B model on a 24 GB GPU (micro-batches with
# gradient accumulation, 2,048-token SFT rows, 256-token responses). The tests run tiny models on a
# CPU at the sizes they were written for: these overrides go right after the stage name, so a
# test's own arguments (later on the line) win, and a `config=` file or preset (which the command
# line would beat) turns them off. tests/test_config.py checks the shipped defaults themselves.
TEST_SIZES = {
    "sft": ["train.grad_accum=1", "data.max_length=512", "samples.max_new_tokens=48"],
    "reward": ["train.batch_size=8", "train.grad_accum=1", "data.max_length=256"],
    "dpo": ["train.batch_size=8", "train.grad_accum=1", "data.max_length=256"],
    "kto": ["train.batch_size=8", "train.grad_accum=1", "data.max_length=256"],
    # 8 episodes x 1 accumulation x 2 minibatches = 16 episodes per PPO step
    "ppo": [
        "train.batch_size=8",
        "train.grad_accum=1",
        "ppo.minibatches=2",
        "data.max_length=256",
        "rollout.max_new_tokens=48",
    ],  # fmt: skip
    # 8 episodes x 1 accumulation x 1 minibatch = 2 prompts x 4 samples per GRPO step
    "grpo": [
        "train.batch_size=8",
        "train.grad_accum=1",
        "grpo.group_size=4",
        "data.max_length=256",
        "rollout.max_new_tokens=48",
        "rollout.batch_size=16",
    ],  # fmt: skip
    "eval": ["data.max_length=256", "generation.max_new_tokens=48"],
    "sample": ["data.max_length=256", "generation.max_new_tokens=48"],
}


def sized_for_tests(args) -> list[str]:
    """`args` (a stage and its arguments) with TEST_SIZES after the stage name."""
    args = list(args)
    if not args or args[0] not in TEST_SIZES or any(a.startswith("config=") for a in args):
        return args
    return [args[0], *TEST_SIZES[args[0]], *args[1:]]


def run_cli(
    *args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """`rlhf ARGS` in a subprocess (the installed console script), capturing output; sized for
    tests (TEST_SIZES)."""
    full_env = {**os.environ, "WANDB_MODE": "disabled", **(env or {})}
    return subprocess.run(
        [*RLHF, *sized_for_tests(args)], cwd=cwd, env=full_env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def _restore_process(saved_argv: list[str], saved_sigpipe) -> None:
    from hydra.core.global_hydra import GlobalHydra

    from rlhf_cli.cli.run import COMMAND_ENV

    sys.argv[:] = saved_argv
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, saved_sigpipe)
    GlobalHydra.instance().clear()
    os.environ.pop(COMMAND_ENV, None)


def run_in_process(argv: list[str]) -> int:
    """`rlhf ARGV` in this process (so a test can patch it, and fast; sized for tests, see
    TEST_SIZES); -> its exit code (0 when main returns). What a run changes in the process (sys.argv, Hydra's global state, the SIGPIPE
    handler, the failed sweep jobs) is put back before and after."""
    from rlhf_cli.__main__ import main

    saved_argv = list(sys.argv)
    saved_sigpipe = signal.getsignal(signal.SIGPIPE) if hasattr(signal, "SIGPIPE") else None
    _restore_process(saved_argv, saved_sigpipe)
    try:
        main(sized_for_tests(argv))
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        _restore_process(saved_argv, saved_sigpipe)
    return 0


def tiny_lora_model(config, tiny_model: Path):
    """(tokenizer, model with a fresh LoRA adapter, its trainable parameters) for a stage config on
    the tiny model, on CPU in float32 and without dropout: for comparing two ways of computing the
    same loss in process."""
    import torch

    from rlhf_cli import modeling

    config.model.name_or_path = str(tiny_model)
    config.quant.mode = "none"
    config.lora.dropout = 0.0
    tokenizer = modeling.load_tokenizer(config.model)
    model, _ = modeling.load_model(config, tokenizer, torch.device("cpu"))
    return tokenizer, model, modeling.trainable_parameters(model)


def assert_same_tensors(file_a: Path, file_b: Path) -> None:
    """Two safetensors files hold the same tensors, bit for bit: what every resume test compares (an
    interrupted and resumed run against the uninterrupted one, or a rerun of the same command), on
    one machine with the same kernels and thread count."""
    import torch
    from safetensors.torch import load_file

    a, b = load_file(file_a), load_file(file_b)
    assert a.keys() == b.keys()
    for key in a:
        # exact: the same operations on the same inputs in the same order (a checkpoint restores
        # the weights, optimizer and schedule state, random state and data position bit for bit)
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def assert_intact(out: Path) -> None:
    """No damaged folder under a run: every checkpoint and final/ with a real (not hidden) name has
    its COMPLETE marker, and every file matches the size and sha256 in it and loads."""
    import torch
    from safetensors.torch import load_file

    from rlhf_cli.checkpoint import COMPLETE, damage

    folders = [out / "final"] + sorted((out / "checkpoints").glob("step-*"))
    for folder in [f for f in folders if f.exists()]:
        assert damage(folder) is None, f"{folder}: {damage(folder)}"
        assert json.loads((folder / COMPLETE).read_text())["files"], folder
        for weights in folder.rglob("*.safetensors"):
            assert all(torch.isfinite(t).all() for t in load_file(weights).values()), weights
        if (folder / "trainer_state.pt").is_file():
            torch.load(folder / "trainer_state.pt", weights_only=True)


def kill_and_resume(
    args: list[str],
    out: Path,
    cwd: Path,
    seed: int,
    more: tuple[str, ...] = (),
    writes: bool = True,
) -> list[str]:
    """The kill test of a training stage. `args` must write `out` with train.max_steps=6,
    train.save_every=2 and train.keep_last=1. The run is SIGKILLed again and again, each time
    continuing from where the last one left (resume=auto, the default): while writing a checkpoint
    (files written, no marker; marked, not renamed; renamed, the older one not pruned), inside a
    step (gradients computed, no optimizer step; which one is drawn from `seed`), while writing
    final/ (twice), at the points in `more` (e.g. "episode-turn:3": between two turns of a rollout),
    and once from outside at a random moment after training resumed. After every
    kill no folder is damaged; finally the run is finished. `writes=False` keeps of the kills
    while writing only the one that leaves step 4 to resume from (no half-written checkpoint or
    final/, no kill from outside), for a variant of a stage whose checkpoint code another variant
    already guards. Returns what was done, for messages."""
    import random
    import signal
    import time

    rng = random.Random(seed)
    # the 2nd "checkpoint-saved": step-4 is in place, step-2 not yet pruned; "update" in step 5 or 6
    points = ["checkpoint-files:1", "checkpoint-marked:1", "checkpoint-saved:2",
              f"update:{rng.randint(1, 2)}", *more, "final-files:1", "final-marked:1"]  # fmt: skip
    if not writes:
        # "checkpoint-saved:2" still runs first, so the later kills resume from step 4
        points = [p for p in points if p.startswith(("checkpoint-saved", "update"))] + list(more)
    done = []
    for point in points:
        result = run_cli(*args, cwd=cwd, env={"RLHF_TEST_KILL_AT": point})
        assert result.returncode == -signal.SIGKILL, (seed, done, point, result.stderr[-2000:])
        assert not (out / "final").exists(), (seed, point)
        assert_intact(out)
        done.append(point)
    if not writes:
        result = run_cli(*args, cwd=cwd)
        assert result.returncode == 0, (seed, done, result.stderr[-3000:])
        assert_intact(out)
        return done
    # from outside: SIGKILL at a random moment after the resumed run has started training
    log = out.parent / f"{out.name}-timed.log"
    with log.open("w") as handle:
        process = subprocess.Popen([*RLHF, *sized_for_tests(args)], cwd=cwd, stdout=handle, stderr=subprocess.STDOUT,
                                   env={**os.environ, "WANDB_MODE": "disabled"})  # fmt: skip
        while "resumed from" not in log.read_text() and process.poll() is None:
            time.sleep(0.05)
        delay = rng.uniform(0, 1.0)
        time.sleep(delay)
        process.kill()
        code = process.wait()
    done.append(f"SIGKILL {delay:.2f} s after resuming (exit {code})")
    assert_intact(out)
    if not (out / "final").exists():  # the kill came before the end
        result = run_cli(*args, cwd=cwd)
        assert result.returncode == 0, (seed, done, result.stderr[-3000:])
    assert_intact(out)
    leftovers = [p.name for p in [*out.iterdir(), *(out / "checkpoints").iterdir()]
                 if p.name.startswith((".tmp-", ".old-", ".trash-"))]  # fmt: skip
    assert not leftovers, (seed, done, leftovers)
    return done


def tiny_sft_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """A fast SFT command line on the tiny model."""
    return [
        "sft",
        f"model.name_or_path={model}",
        f"data={data}",
        f"output_dir={out}",
        "data.eval_size=4",
        "samples.num_prompts=0",
        "train.batch_size=4",
        "lora.dropout=0",
        *extra,
    ]


# ---------------------------------------------------------------- a chain of tiny runs (ppo, eval)
@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory):
    """64 chat prompts ("What is the colour of two sky?") whose answers follow from the question."""
    return write_jsonl(tmp_path_factory.mktemp("ppo-data") / "prompts.jsonl", chat_rows(64, 3))


@pytest.fixture(scope="session")
def sft_final(tmp_path_factory, tiny_model, prompts_file):
    out = tmp_path_factory.mktemp("ppo-sft") / "sft"
    args = tiny_sft_args(tiny_model, prompts_file, out, "train.max_steps=20", "optim.lr=1e-2")
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "final"


@pytest.fixture(scope="session")
def rm_final(tmp_path_factory, sft_final):
    folder = tmp_path_factory.mktemp("ppo-rm")
    prefs = write_jsonl(folder / "prefs.jsonl", preference_rows(32, 0))
    result = run_cli("reward", f"init_from={sft_final}", f"data={prefs}", f"output_dir={folder / 'rm'}",
                     "data.eval_size=4", "train.max_steps=4", "optim.lr=5e-3")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "rm" / "final"


@pytest.fixture(autouse=True)
def _signal_state_left_as_found():
    """Every test leaves the main thread's signal mask and its SIGINT / SIGTERM handlers as it
    found them: a leaked block or handler would reach every later test and the processes they
    start (a blocked or ignored SIGINT survives fork and exec)."""
    stops = (signal.SIGINT, signal.SIGTERM)

    def state():
        return signal.pthread_sigmask(signal.SIG_BLOCK, []), [signal.getsignal(s) for s in stops]

    before = state()
    yield
    assert state() == before, "the test changed the signal mask or the SIGINT/SIGTERM handlers"


# ---------------------------------------------------------------- configs with the shipped defaults
def config_of(stage: str, *overrides: str):
    """The typed config of `rlhf <stage> OVERRIDES`: the shipped YAML's defaults (the schema's
    dataclasses hold none)."""
    from rlhf_cli.compose import stage_config

    return stage_config(stage, overrides)


def data_config(stage: str = "sft", **changes):
    """`data` as `rlhf <stage>` reads it, with some fields changed."""
    import dataclasses

    return dataclasses.replace(config_of(stage).data, **changes)


def model_config(name_or_path, **changes):
    """`model` for a local model folder, with the shipped defaults for the other fields."""
    import dataclasses

    return dataclasses.replace(config_of("sft").model, name_or_path=str(name_or_path), **changes)


def label_config(**changes):
    """`rlhf label`'s settings as configs/label.yaml ships them, with some changed."""
    import dataclasses

    from rlhf_cli.labeling import parse_command_line

    return dataclasses.replace(parse_command_line([])[1], **changes)


@pytest.fixture
def rlhf(capfd, monkeypatch):
    """`rlhf ARGS` in this process, sized for tests, with its output captured: a
    subprocess.CompletedProcess like run_cli's, for tests that check what a run says and writes
    (and not how a separate process ends: kills, signals and launchers keep run_cli)."""

    def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        if cwd is not None:
            monkeypatch.chdir(cwd)
        capfd.readouterr()
        code = run_in_process(list(args))
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess(list(args), code, out, err)

    return run
