"""Run health (rlhf_cli/health.py): each documented line fires on its metric, an alarm is printed
when it starts firing and not again while it lasts, and `rlhf plot` marks the steps."""

from rich.console import Console
from test_grpo import REWARD_ENV, grpo_args

from rlhf_cli import health, plots

from conftest import run_cli


def test_each_line_fires_on_its_metric_and_prints_once_while_it_lasts():
    console = Console(record=True, width=200)
    monitor = health.Monitor()
    calm = {"rollout/truncated_fraction": 0.2, "groups/zero_std_fraction": 0.1,
            "policy/entropy": 1.2, "policy/clip_low": 0.01, "policy/clip_high": 0.02,
            "policy/ratio": 1.0, "episode/tool_calls": 2.0, "episode/tool_error_fraction": 0.1}  # fmt: skip
    out = monitor.check(1, calm, console)
    assert out["health/alarms"] == 0 and all(v == 0 for v in out.values())
    bad = {"rollout/truncated_fraction": 1.0, "groups/zero_std_fraction": 0.75,
           "policy/entropy": 0.01, "policy/clip_low": 0.2, "policy/clip_high": 0.2,
           "policy/ratio": 1.4, "episode/tool_calls": 2.0, "episode/tool_error_fraction": 0.5}  # fmt: skip
    out = monitor.check(2, bad, console)
    names = ("all_truncated", "zero_variance_groups", "entropy_collapse", "clip_fraction",
             "ratio_out_of_range", "tool_errors")  # fmt: skip
    assert out == {**{f"health/{n}": 1.0 for n in names}, "health/alarms": 6.0}
    printed = console.export_text()
    assert printed.count("alarm at step 2") == 6 and "75% of groups" in printed
    monitor.check(3, bad, console)  # still firing: not printed again
    assert "alarm at step 3" not in console.export_text()
    monitor.check(4, calm, console)
    monitor.check(5, bad, console)  # fires again after a calm step: printed again
    assert console.export_text().count("alarm at step 5") == 6
    # PPO's metrics: eos_rate 0 is every response cut; clipfrac; no tool calls: no tool line
    out = health.Monitor().check(1, {"rollout/eos_rate": 0.0, "policy/clipfrac": 0.5,
                                     "episode/tool_calls": 0.0, "episode/tool_error_fraction": 0.0})  # fmt: skip
    assert out == {"health/all_truncated": 1.0, "health/clip_fraction": 1.0, "health/alarms": 2.0}


def test_grpo_says_when_every_response_is_cut_and_plot_marks_the_steps(
    tmp_path, sft_final, prompts_file
):
    out = tmp_path / "grpo"
    args = grpo_args(prompts_file, out, f"policy.init_from={sft_final}",
                     "reward.fns=[ppo_rewards:colour_share]", "rollout.max_new_tokens=1",
                     "train.max_steps=2")  # fmt: skip
    result = run_cli(*args, cwd=tmp_path, env=REWARD_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("alarm at step 1 (all_truncated)") == 1
    assert "alarm at step 2 (all_truncated)" not in result.stdout  # it lasts: said once
    figure = plots.draw_runs([plots.read_run(out)], {"reward": ["reward/mean"]})
    (axis, *_) = figure.axes
    marked = [
        line.get_xdata()[0]
        for line in axis.lines
        if line.get_label() == "alarm" or line.get_color() == "tab:red"
    ]
    assert marked == [1, 2]
