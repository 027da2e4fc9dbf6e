"""`logger=tensorboard`: scalars in <output_dir>/tensorboard/ read back exactly, resume without
duplicate steps, only rank 0 writes, and a clear stop when the package is missing. No models."""

from __future__ import annotations

import io
import math
import sys
import time

import numpy as np
import pytest
from rich.console import Console

from rlhf_cli.schema import LoggerConfig, UserError
from rlhf_cli.tracking import TENSORBOARD_DIR, Tracker, check_logger, read_metrics

TENSORBOARD = LoggerConfig(backend="tensorboard", wandb=None)  # validate() is a separate call


@pytest.fixture
def installed():
    """The tests that write event files need the optional extra rlhf-cli[tensorboard], which
    `make install` installs: a missing package fails them rather than skipping them."""
    import tensorboard  # noqa: F401


def tracker(out, start_step: int = 0, total_steps: int = 5) -> Tracker:
    console = Console(file=io.StringIO())  # quiet: no terminal, nothing printed to the test
    return Tracker(str(out), "sft", TENSORBOARD, {}, "run", total_steps, start_step, console)


def read_back(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / TENSORBOARD_DIR))
    events.Reload()
    return events


def scalars(events, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in events.Scalars(tag)]


def f32(value: float) -> float:
    """Event files store scalars as float32: what is read back is the float32-rounded value,
    exactly, so comparing to it needs no tolerance."""
    return float(np.float32(value))


def test_scalars_read_back_under_their_names_and_steps(tmp_path, installed):
    logged = {
        1: {"loss": 2.5, "eval/loss": 2.75, "policy/clipfrac": 0.1, "tokens": 128, "phase": "a"},
        2: {"loss": 1.2345678901, "policy/clipfrac": 0.05, "tokens": 256},
        3: {"loss": 0.3333333333, "eval/loss": 0.7, "grad_norm": math.nan, "ok": True},
    }
    run = tracker(tmp_path)
    for step, metrics in logged.items():
        run.log(step, metrics)
    run.table("held-out prompts", ["prompt", "response"], [["a | b", "two\nlines"]])
    run.finish()

    events = read_back(tmp_path)
    # numbers only: the string ("phase") and the bool ("ok") stay in metrics.jsonl alone
    assert sorted(events.Tags()["scalars"]) == [
        "eval/loss",
        "grad_norm",
        "loss",
        "policy/clipfrac",
        "tokens",
    ]
    for tag in ("loss", "eval/loss", "policy/clipfrac", "tokens"):
        expected = [(step, f32(m[tag])) for step, m in logged.items() if tag in m]
        assert scalars(events, tag) == expected, tag
    # non-finite values are logged, as metrics.jsonl keeps them (TensorBoard marks NaN points)
    [(step, value)] = scalars(events, "grad_norm")
    assert step == 3 and math.isnan(value)
    # tables go to the Text tab as Markdown, at the last logged step
    [text] = events.Tensors("held-out prompts/text_summary")
    assert text.step == 3
    markdown = text.tensor_proto.string_val[0].decode()
    assert markdown.splitlines() == [
        "| prompt | response |",
        "|---|---|",
        "| a \\| b | two<br>lines |",
    ]
    # metrics.jsonl is still written, beside the event folder
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def _next_second() -> None:
    """Event files are read in name order, and a name starts with the second it was made in:
    a resumed run comes at least a second after the first in practice; here, wait for it."""
    now = int(time.time())
    while int(time.time()) == now:
        time.sleep(0.01)


def test_resume_purges_the_steps_after_the_resumed_one(tmp_path, installed):
    first = tracker(tmp_path)
    for step in range(1, 5):
        first.log(step, {"loss": float(step), "eval/loss": 10.0 + step})
    first.finish()

    _next_second()
    second = tracker(tmp_path, start_step=2)  # resumed from the checkpoint at step 2
    for step in range(3, 6):
        second.log(step, {"loss": 100.0 + step, "eval/loss": 200.0 + step})
    second.finish()

    assert len(list((tmp_path / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 2
    events = read_back(tmp_path)
    # steps 1..5 once each: 1 and 2 from the first run, 3 and 4 (and 5) from the second
    assert scalars(events, "loss") == [(1, 1.0), (2, 2.0), (3, 103.0), (4, 104.0), (5, 105.0)]
    assert scalars(events, "eval/loss") == [
        (1, 11.0),
        (2, 12.0),
        (3, 203.0),
        (4, 204.0),
        (5, 205.0),
    ]
    # the same as metrics.jsonl
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == scalars(events, "loss")


def test_only_rank_0_writes_event_files(tmp_path, monkeypatch, installed):
    monkeypatch.setenv("RANK", "1")
    run = tracker(tmp_path)
    run.log(1, {"loss": 1.0})
    run.finish()
    assert not (tmp_path / TENSORBOARD_DIR).exists()


def test_missing_tensorboard_stops_with_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now fails
    with pytest.raises(UserError) as err:
        check_logger(TENSORBOARD)
    message = str(err.value)
    assert "tensorboard" in message and "pip install 'rlhf-cli[tensorboard]'" in message
    assert "\n" not in message
    check_logger(LoggerConfig(backend="console", wandb=None))  # the other backends never import it


def test_installed_tensorboard_passes_the_check(installed):
    assert check_logger(TENSORBOARD) is None  # no UserError: the check passes ...
    # ... because what the Tracker writes event files with imports: the check imported it
    assert sys.modules["torch.utils.tensorboard"].SummaryWriter is not None
