"""Pictures of runs: training curves from metrics.jsonl (`rlhf plot`) and the bar chart of an eval
comparison (scripts/compare_evals.py --png). matplotlib is an optional extra (`pip install
'rlhf-cli[plot]'`); nothing else in rlhf imports it.

    rlhf plot runs/demo/dpo                         # -> runs/demo/dpo/curves.png
    rlhf plot runs/demo/ppo runs/demo/grpo --out rl.png --metric policy/entropy

A panel per kind of curve the runs logged (loss, reward and each reward function, KL, accuracy,
margin, learning rate, tokens/s, response length). One run: a colour per metric. Several runs,
overlaid: a colour per run and a line style per metric. Held-out (`eval/`) values have markers; a
faint red line marks each step where a health alarm fired (`health/alarms`, rlhf_cli/health.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path

from rlhf_cli.schema import UserError

METRICS_FILE = "metrics.jsonl"
# panel title -> the metric names it draws (a pattern for one name per reward function)
PANELS: dict[str, tuple[str, ...]] = {
    "loss": ("loss", "eval/loss", "policy/loss", "value/loss"),
    "reward": ("reward/mean", r"rewards/[^/]+/mean", "objective/scores", "objective/rlhf_reward",
               "eval/reward", "eval/scores"),
    "KL": ("objective/kl", "kl", "eval/kl"),
    "accuracy": ("accuracy", "eval/accuracy", "rewards/accuracies", "eval/rewards/accuracies"),
    "margin": ("margin", "eval/margin", "rewards/margins", "eval/rewards/margins"),
    "learning rate": ("lr",),
    "tokens/s": ("perf/tokens_per_s",),
    "response length": ("rollout/response_length", "eval/response_length"),
}  # fmt: skip
COLUMNS = 3
LINE_STYLES = ("-", "--", ":", "-.")


def read_run(path: Path) -> tuple[str, list[dict]]:
    """(name, rows) of a run folder (or its metrics.jsonl); one sentence when there is none."""
    file = path / METRICS_FILE if path.is_dir() else path
    if not file.is_file():
        raise UserError(
            f"{path} has no {METRICS_FILE}; give a run folder (output_dir of an rlhf stage) or "
            "its metrics.jsonl."
        )
    rows = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise UserError(
                f"{file} line {number} is not JSON; is it an rlhf metrics file?"
            ) from None
    name = file.parent.name if file.name == METRICS_FILE else file.stem
    return name, rows


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric: the rows that have it with a finite number."""
    points = [
        (row["step"], row[key])
        for row in rows
        if isinstance(row.get(key), int | float) and math.isfinite(row[key]) and "step" in row
    ]
    return [p[0] for p in points], [p[1] for p in points]


def panel_keys(runs: list[tuple[str, list[dict]]], extra: list[str]) -> dict[str, list[str]]:
    """panel title -> the metric names some run logged for it, in PANELS order; then one panel per
    `extra` metric. Panels with no data are left out."""
    logged = sorted({k for _, rows in runs for row in rows for k in row})
    panels: dict[str, list[str]] = {}
    for title, patterns in {**PANELS, **{key: (re.escape(key),) for key in extra}}.items():
        keys = [k for p in patterns for k in logged if re.fullmatch(p, k)]
        keys = [k for k in dict.fromkeys(keys) if any(series(rows, k)[0] for _, rows in runs)]
        if keys:
            panels[title] = keys
    return panels


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError(
            "plots need matplotlib, which is not installed; pip install 'rlhf-cli[plot]' (or "
            "matplotlib)."
        ) from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, out: Path) -> None:
    """Write the PNG whole: to a temporary file beside it, then renamed over `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{out.name}-", suffix=".png", dir=out.parent)
    os.close(handle)
    try:
        figure.savefig(tmp, dpi=110)
        os.chmod(tmp, 0o644)  # mkstemp's file is private; a picture is not
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def plot_runs(paths: list[Path], out: Path, extra: list[str] | None = None) -> list[str]:
    """Draw the runs' curves into `out` (PNG); returns the panels' titles."""
    runs = [read_run(p) for p in paths]
    panels = panel_keys(runs, extra or [])
    if not panels:
        raise UserError(
            f"{', '.join(str(p) for p in paths)}: no metric to plot (no finite values of a known "
            "metric); add --metric NAME for one the run logged."
        )
    figure = draw_runs(runs, panels)
    save_figure(figure, out)
    _pyplot().close(figure)
    return list(panels)


def draw_runs(runs: list[tuple[str, list[dict]]], panels: dict[str, list[str]]):
    """The matplotlib figure: a panel per entry of `panels`, a line per run and metric."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    rows = math.ceil(len(panels) / COLUMNS)
    columns = min(COLUMNS, len(panels))
    figure, axes = plt.subplots(
        rows, columns, figsize=(5 * columns, 3.4 * rows), squeeze=False, layout="constrained"
    )
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, (title, keys) in zip(axes.flat, panels.items(), strict=False):
        for r, (name, run_rows) in enumerate(runs):
            for k, key in enumerate(keys):
                steps, values = series(run_rows, key)
                if not steps:
                    continue
                # one run: a colour per metric; several: a colour per run, a line style per metric
                colour = colours[(k if len(runs) == 1 else r) % len(colours)]
                style = "-" if len(runs) == 1 else LINE_STYLES[k % len(LINE_STYLES)]
                held_out = key.startswith("eval/")
                label = key if len(runs) == 1 else f"{name}: {key}"
                axis.plot(steps, values, color=colour, label=label, linestyle=style,
                          marker="o" if held_out else None, markersize=4, linewidth=1.4)  # fmt: skip
        for _name, run_rows in runs:  # the steps where a health alarm fired (rlhf_cli/health.py)
            alarms = [r["step"] for r in run_rows if r.get("health/alarms", 0) > 0 and "step" in r]
            for i, step in enumerate(alarms):
                axis.axvline(step, color="tab:red", alpha=0.25, linewidth=1,
                             label="alarm" if i == 0 and len(runs) == 1 else None)  # fmt: skip
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    figure.suptitle(", ".join(name for name, _ in runs))
    return figure


def plot_comparison(rows: list[dict], out: Path, metric: str = "gold") -> None:
    """Bars of each model's held-out `metric` with its 95% interval (compare_evals' rows)."""
    plt = _pyplot()
    shown = [r for r in rows if r.get(metric) is not None]
    figure, axis = plt.subplots(figsize=(1.3 * len(shown) + 2, 3.6))
    values = [r[metric] for r in shown]
    intervals = [
        [v if bound is None else bound for bound in (r.get(f"{metric}_ci") or (v, v))]
        for r, v in zip(shown, values, strict=True)
    ]
    below = [v - lo for v, (lo, _) in zip(values, intervals, strict=True)]
    above = [hi - v for v, (_, hi) in zip(values, intervals, strict=True)]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    axis.bar([r["name"] for r in shown], values, yerr=[below, above], capsize=6,
             color=[colours[i % len(colours)] for i in range(len(shown))])  # fmt: skip
    for i, value in enumerate(values):
        axis.annotate(f"{value:.3f}", (i, value), textcoords="offset points", xytext=(14, 3),
                      fontsize=8)  # fmt: skip
    axis.set_ylabel(f"held-out {metric} (95% interval)")
    axis.set_ylim(0, max(1.0, max(hi for _, hi in intervals) * 1.1))
    axis.grid(axis="y", alpha=0.3)
    save_figure(figure, out)
    plt.close(figure)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="rlhf plot", description="Training curves of one or more runs, overlaid, as a PNG."
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (or metrics.jsonl files)")
    parser.add_argument("--out", type=Path, help="the PNG (default: RUN/curves.png for one run, "
                        "curves.png here for several)")  # fmt: skip
    parser.add_argument("--metric", action="append", default=[], metavar="NAME",
                        help="one more panel for this metric (repeatable)")  # fmt: skip
    args = parser.parse_args(argv)
    out = args.out or (args.runs[0] / "curves.png" if len(args.runs) == 1 and args.runs[0].is_dir()
                       else Path("curves.png"))  # fmt: skip
    try:
        panels = plot_runs(args.runs, out, args.metric)
    except UserError as err:
        print(f"rlhf plot: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out}: {len(panels)} panels ({', '.join(panels)})")
