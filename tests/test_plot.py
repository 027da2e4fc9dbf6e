"""`rlhf plot` and the comparison chart: the panels the runs' metrics call for, finite data only,
runs overlaid, a PNG that holds a picture; bad input is one sentence."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_cli import plots

from conftest import REPO

pytest.importorskip("matplotlib")  # an optional extra; make install installs it


def write_run(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def dpo_like(folder: Path, steps: int = 12, shift: float = 0.0) -> Path:
    rows = [{"step": s, "loss": 0.69 - 0.04 * s + shift, "lr": 1e-4, "rewards/accuracies": 0.5 + 0.03 * s,
             "rewards/margins": 0.1 * s, "perf/tokens_per_s": 100.0 + s} for s in range(1, steps + 1)]  # fmt: skip
    rows.append({"step": steps, "eval/loss": 0.3 + shift, "eval/rewards/accuracies": 0.9})
    return write_run(folder, rows)


def grpo_like(folder: Path) -> Path:
    rows = [{"step": s, "policy/loss": 0.1, "reward/mean": s / 10, "rewards/exact/mean": s / 12,
             "rewards/format/mean": 1.0, "objective/kl": 0.01 * s, "lr": 1e-5,
             "rollout/response_length": 20 - s, "policy/entropy": float("nan") if s == 3 else 0.5}
            for s in range(1, 9)]  # fmt: skip
    return write_run(folder, rows)


def picture(path: Path):
    from matplotlib.image import imread

    image = imread(path)
    return image


def test_the_panels_follow_the_metrics_and_skip_what_is_not_finite(tmp_path):
    dpo = dpo_like(tmp_path / "dpo")
    grpo = grpo_like(tmp_path / "grpo")
    runs = [plots.read_run(dpo), plots.read_run(grpo)]
    panels = plots.panel_keys(runs, ["policy/entropy"])
    assert list(panels) == ["loss", "reward", "KL", "accuracy", "margin", "learning rate",
                            "tokens/s", "response length", "policy/entropy"]  # fmt: skip
    assert panels["reward"] == ["reward/mean", "rewards/exact/mean", "rewards/format/mean"]
    assert panels["loss"] == ["loss", "eval/loss", "policy/loss"]
    steps, values = plots.series(runs[1][1], "policy/entropy")
    assert 3 not in steps and len(values) == 7 and all(math.isfinite(v) for v in values)


def test_rlhf_plot_draws_one_png_with_every_run(tmp_path):
    a, b = dpo_like(tmp_path / "a"), dpo_like(tmp_path / "b", shift=0.2)
    out = tmp_path / "both.png"
    result = subprocess.run([sys.executable, "-m", "rlhf_cli", "plot", str(a), str(b), "--out", str(out)],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "5 panels (loss, accuracy, margin, learning rate, tokens/s)" in result.stdout
    image = picture(out)
    # a 2 x 3 grid of panels at 110 dpi: several hundred pixels each way, in colour, not blank
    assert image.shape[0] > 500 and image.shape[1] > 1000
    assert image[..., :3].std() > 0.05 and colours(image) >= 2
    assert not list(tmp_path.glob(".*.png"))  # no temporary file left
    single = subprocess.run([sys.executable, "-m", "rlhf_cli", "plot", str(a)],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert single.returncode == 0 and (a / "curves.png").is_file()  # the default place


def test_every_run_and_metric_is_a_line_of_its_panel(tmp_path):
    import matplotlib.pyplot as plt

    runs = [plots.read_run(dpo_like(tmp_path / "a")), plots.read_run(grpo_like(tmp_path / "b"))]
    panels = plots.panel_keys(runs, ["policy/entropy"])  # NaN at step 3 of run b
    figure = plots.draw_runs(runs, panels)
    try:
        shown = [axis for axis in figure.axes if axis.get_visible()]
        assert [axis.get_title() for axis in shown] == list(panels)
        loss = shown[0]
        assert [line.get_label() for line in loss.get_lines()] == [
            "a: loss",
            "a: eval/loss",
            "b: policy/loss",
        ]
        assert loss.get_lines()[0].get_color() != loss.get_lines()[2].get_color()  # a colour a run
        assert loss.get_lines()[1].get_marker() == "o"  # held out
        for axis in shown:
            for line in axis.get_lines():
                assert len(line.get_ydata()) > 0 and all(math.isfinite(y) for y in line.get_ydata())
    finally:
        plt.close(figure)


def colours(image) -> int:
    """Distinct strongly coloured pixels (curves; greys and white are axes and background)."""
    rgb = (image[..., :3] * 255).astype(int)
    saturated = rgb[(rgb.max(axis=-1) - rgb.min(axis=-1)) > 80]
    return len({tuple(p) for p in (saturated // 32).tolist()})


def test_plot_bad_input_is_one_sentence(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = subprocess.run([sys.executable, "-m", "rlhf_cli", "plot", str(empty)],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2 and "has no metrics.jsonl" in result.stderr
    assert "Traceback" not in result.stderr and not (empty / "curves.png").exists()
    odd = write_run(tmp_path / "odd", [{"step": 1, "something": 1.0}])
    result = subprocess.run([sys.executable, "-m", "rlhf_cli", "plot", str(odd)],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2 and "no metric to plot" in result.stderr


def test_compare_evals_draws_the_gold_scores_with_their_intervals(tmp_path):
    for name, gold in (("base", 0.0), ("sft", 0.2), ("dpo", 0.5)):
        folder = tmp_path / name
        folder.mkdir()
        metrics = {
            "gold/mean": gold,
            "gold/ci_low": max(gold - 0.05, 0),
            "gold/ci_high": gold + 0.05,
            "response_length": 6.0,
            "eos_rate": 1.0,
        }
        (folder / "eval.json").write_text(json.dumps({"metrics": metrics, "reference": None}))
    out = tmp_path / "comparison.png"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "compare_evals.py"),
         *(f"{n}={tmp_path / n}" for n in ("base", "sft", "dpo")), "--png", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    image = picture(out)
    assert image.shape[0] > 300 and colours(image) >= 2  # bars in two or more colours
