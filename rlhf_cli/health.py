"""Run health for the RL stages: the signs of a run going wrong, checked every step against
documented lines (docs/environments.md#run-health), logged as `health/<alarm>` (1 when it fired)
and printed in words when an alarm starts firing.

    monitor = health.Monitor()
    metrics |= monitor.check(step, metrics, console)      # ppo and grpo, every step

The lines are defaults for LoRA RL on language models, not laws: a run may sit beyond one on
purpose (a deliberately hard task with many equal groups). `rlhf plot` marks the steps where any
alarm fired.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Line:
    name: str
    keys: tuple[str, ...]  # the metric it reads: the first one the step has
    crossed: Callable[[float], bool]
    says: str  # the sentence printed, with {value}


LINES = (
    Line("all_truncated", ("rollout/truncated_fraction", "rollout/eos_rate"), lambda v: v >= 1.0,
         "every response of this step was cut at rollout.max_new_tokens: rewards that need a "
         "finished answer are zero; raise rollout.max_new_tokens or teach the stop token in SFT"),
    Line("zero_variance_groups", ("groups/zero_std_fraction",), lambda v: v > 0.5,
         "{value:.0%} of groups have all-equal rewards (no learning signal from them): the task "
         "is too easy or too hard for the policy, or the reward is too coarse"),
    Line("entropy_collapse", ("policy/entropy", "objective/entropy"), lambda v: v < 0.05,
         "the policy's entropy is {value:.3f} nats a token: it has nearly stopped exploring "
         "(lower the learning rate, add a KL term, or raise the temperature)"),
    Line("clip_fraction", ("policy/clipfrac", "policy/clip_fraction"), lambda v: v > 0.3,
         "{value:.0%} of tokens were clipped: the updates move the policy too far from the "
         "sampling one (lower the learning rate, or fewer iterations/epochs a step)"),
    Line("ratio_out_of_range", ("policy/ratio",), lambda v: not 0.8 <= v <= 1.25,
         "the mean importance ratio is {value:.3f}, outside [0.8, 1.25]: the policy being "
         "updated is far from the one that sampled"),
    Line("tool_errors", ("episode/tool_error_fraction",), lambda v: v > 0.25,
         "{value:.0%} of tool calls failed (bad JSON, unknown tools, exceptions, timeouts): "
         "look at the sample table's transcripts"),
)  # fmt: skip
# a derived metric GRPO logs as two bounds
DERIVED = {"policy/clip_fraction": ("policy/clip_low", "policy/clip_high")}


@dataclass
class Monitor:
    """The alarms of a run; prints an alarm when it starts firing (not again while it lasts)."""

    firing: set[str] = field(default_factory=set)

    def check(self, step: int, metrics: dict[str, float], console=None) -> dict[str, float]:
        """{health/<name>: 1.0 or 0.0 for each line whose metric the step has, health/alarms: the
        number firing}."""
        values = dict(metrics)
        for name, parts in DERIVED.items():
            if all(p in values for p in parts):
                values[name] = sum(values[p] for p in parts)
        if values.get("episode/tool_calls", 1) == 0:
            values.pop("episode/tool_error_fraction", None)  # no calls: no error share to judge
        out, now = {}, set()
        for line in LINES:
            key = next((k for k in line.keys if k in values), None)
            if key is None:
                continue
            value = values[key]
            if key == "rollout/eos_rate":
                value = 1.0 - value  # PPO logs the complement
            fired = bool(line.crossed(value))
            out[f"health/{line.name}"] = float(fired)
            if fired:
                now.add(line.name)
                if line.name not in self.firing and console is not None:
                    console.print(
                        f"[bold yellow]alarm[/] at step {step} ({line.name}): "
                        + line.says.format(value=value)
                    )
        self.firing = now
        out["health/alarms"] = float(len(now))
        return out
