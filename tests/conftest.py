"""Shared fixtures: a tiny Llama + tokenizer made once per session, tiny datasets, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import chat_rows, make_model, write_jsonl  # noqa: E402

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
