"""Shared fixtures: a tiny Llama + tokenizer made once per session, tiny datasets, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import chat_rows, make_model, preference_rows, write_jsonl  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# the console script `make install` put beside this interpreter (not whatever `rlhf` PATH finds first)
RLHF = str(Path(sysconfig.get_path("scripts")) / "rlhf")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def chat16(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat16.jsonl", chat_rows(16))


def run_cli(
    *args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """`rlhf ARGS` in a subprocess (the installed console script), capturing output."""
    full_env = {**os.environ, "WANDB_MODE": "disabled", **(env or {})}
    return subprocess.run(
        [RLHF, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def assert_same_tensors(file_a: Path, file_b: Path) -> None:
    """Two safetensors files hold the same tensors, to the tolerance every resume test uses (an
    interrupted and resumed run against the uninterrupted one)."""
    import torch
    from safetensors.torch import load_file

    a, b = load_file(file_a), load_file(file_b)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


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
