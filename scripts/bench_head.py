"""The LM head fused with its log-softmax (head.head_logprobs) against the unfused head, side by side.

    python scripts/bench_head.py                  # the head alone, sft padded / packed, dpo; 6 steps x 3 rounds
    python scripts/bench_head.py --workloads head,dpo --append docs/benchmarks.md

SFT and DPO take the log-probs of their target tokens from `modeling.target_logprobs`, which runs
the LM head on those positions alone, fused with the log-softmax a chunk of rows at a time: the
(N, vocab) logits never exist whole. PPO takes its response log-probs (and, in the rollout, their
entropies) from `modeling.last_logprobs`, the same fused head at the sampling temperature; the
head-ppo workload measures that use of the head alone (a whole PPO step on this CPU is dominated
by sampling). "unfused" runs the same stage with `head.head_logprobs` (and
`head_logprobs_and_entropy`) replaced by the plain form, `token_logprobs(F.linear(hidden, weight, bias), targets)`, which holds
the logits, their log-softmax and, in the backward pass, their gradient, each (N, vocab). Each run
is a real `rlhf <stage>` in its own process (this script with --child), the two variants alternate
round by round, and the report gives the median throughput over the steps after the first, the
peak RSS of each run (peak CUDA memory on a GPU) and the ratios fused / unfused.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import machine, run_child, step_rates
from bench_report import publish

COMMON = ["data.eval_size=0", "train.batch_size=8", "train.grad_accum=1", "train.save_every=0", "train.eval_every=0",
          "lora.r=16", "lora.alpha=32", "logger=console"]  # fmt: skip
WORKLOADS = {  # name -> (stage, overrides, unit); "head": the head alone (head_only)
    "head": ("head", ["tokens=2048"], "tokens"),
    "head-ppo": ("head", ["tokens=512", "ppo=1"], "tokens"),
    "sft-padded": ("sft", ["data=demo-sft", "data.max_length=256", "samples.num_prompts=0"], "tokens"),
    "sft-packed-gc": ("sft", ["data=demo-sft", "data.packing=true", "data.max_length=512",
                              "samples.num_prompts=0", "model.gradient_checkpointing=true"], "tokens"),
    "dpo": ("dpo", ["data=demo-prefs", "data.max_length=256"], "pairs"),
}  # fmt: skip
VARIANTS = ("fused", "unfused")


def child(variant: str, argv: list[str]) -> None:
    """Run `rlhf ARGV` in this process (or head_only), with the unfused head where asked."""
    import torch.nn.functional as F

    from rlhf_cli import head as fused
    from rlhf_cli import losses
    from rlhf_cli.__main__ import main

    if variant == "unfused":

        def head_logprobs_and_entropy(hidden, weight, bias, targets, temperature=1.0, _=None):
            logits = F.linear(hidden, weight, bias) / temperature
            return losses.token_logprobs(logits, targets), losses.entropy_from_logits(logits)

        fused.head_logprobs = lambda hidden, weight, bias, targets, temperature=1.0, _=None: (
            losses.token_logprobs(F.linear(hidden, weight, bias), targets, temperature)
        )
        fused.head_logprobs_and_entropy = head_logprobs_and_entropy
    if argv[0] == "head":
        return head_only(dict(a.split("=", 1) for a in argv[1:]))
    sys.argv = ["rlhf", *argv]
    main()


def head_only(options: dict[str, str]) -> None:
    """Forward and backward of SmolLM2's head (576 x 49,152) alone, on `tokens` target positions,
    `train.max_steps` times, written as metrics.jsonl steps (ppo=1: PPO's use of it, in float32 at
    temperature 0.7: the rollout's log-probs and entropies without gradient, then the update's
    log-probs with it); the first also holds the process's
    RSS before the first step (`base_mib`: torch, the weight, the inputs). glibc maps blocks this
    large (the logits are 400 MB) on their own and returns them when freed, so the run's peak RSS
    follows its live tensors."""
    import resource

    import torch

    from rlhf_cli import head as fused

    torch.manual_seed(0)
    n, out = int(options["tokens"]), Path(options["output_dir"])
    weight = torch.randn(49152, 576) * 0.02
    hidden = torch.randn(n, 576, requires_grad=True)
    targets = torch.randint(0, 49152, (n,))
    out.mkdir(parents=True)
    base_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with (out / "metrics.jsonl").open("w") as handle:
        for step in range(1, int(options["train.max_steps"]) + 1):
            if options.get("ppo"):
                with torch.no_grad():
                    fused.head_logprobs_and_entropy(hidden, weight, None, targets, 0.7)
                loss = -fused.head_logprobs(hidden, weight, None, targets, 0.7).mean()
            else:
                loss = -fused.head_logprobs(hidden, weight, None, targets).mean()
            loss.backward()
            hidden.grad = None
            record = {"step": step, "loss": loss.item(), "perf/tokens": n, "time": time.time()}
            record |= {"base_mib": base_mib} if step == 1 else {}
            handle.write(json.dumps(record) + "\n")


def run(workload: str, variant: str, args, workdir: Path) -> tuple[list[float], float, dict]:
    stage, overrides, unit = WORKLOADS[workload]
    out = workdir / f"{workload}-{variant}-{time.time_ns()}"
    common = COMMON if stage != "head" else []
    command = [sys.executable, __file__, "--child", variant, stage, f"output_dir={out}",
               f"train.max_steps={args.steps}", *common, *overrides]  # fmt: skip
    peak = run_child(command, workdir / f"{out.name}.log")
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "loss" in m and "step" in m]
    units = (lambda m: m["perf/tokens"]) if unit == "tokens" else (lambda m: 8)
    if "perf/peak_mem_gib" in steps[-1]:
        peak = max(m["perf/peak_mem_gib"] for m in steps) * 1024
    return step_rates([{"time": m["time"], "units": units(m)} for m in steps]), peak, steps[0]


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        return child(sys.argv[2], sys.argv[3:])
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--append", type=Path, default=None, help="append the report to this file")
    args = parser.parse_args()
    workloads = args.workloads.split(",")
    unknown = set(workloads) - set(WORKLOADS)
    if unknown:
        sys.exit(
            f"--workloads: unknown {', '.join(sorted(unknown))}; choose from {', '.join(WORKLOADS)}."
        )

    rates = {(w, v): [] for w in workloads for v in VARIANTS}
    peaks = {(w, v): 0.0 for w in workloads for v in VARIANTS}
    losses = {(w, v): [] for w in workloads for v in VARIANTS}
    base = {}  # the head workload's RSS before its first step
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for workload in workloads:
                order = VARIANTS if round_index % 2 == 0 else VARIANTS[::-1]
                for variant in order:
                    got, peak, first = run(workload, variant, args, Path(tmp))
                    rates[workload, variant] += got
                    peaks[workload, variant] = max(peaks[workload, variant], peak)
                    losses[workload, variant].append(first["loss"])
                    base[workload, variant] = first.get("base_mib")
                    print(f"round {round_index + 1} {workload} {variant}: "
                          f"{statistics.median(got):.1f} {WORKLOADS[workload][2]}/s, "
                          f"peak {peak:.0f} MiB, first loss {first['loss']:.6f}", flush=True)  # fmt: skip

    rows = []
    for w in workloads:
        fused, unfused = (statistics.median(rates[w, v]) for v in VARIANTS)
        pf, pu = peaks[w, "fused"], peaks[w, "unfused"]
        same = max(
            abs(a - b) for a, b in zip(losses[w, "fused"], losses[w, "unfused"], strict=True)
        )
        rows.append(f"| {w} | {fused:.1f} | {unfused:.1f} | **{fused / unfused:.2f}x** | "
                    f"{pf:.0f} / {pu:.0f} (**{pf / pu:.2f}x**) | {same:.1e} | "
                    f"{WORKLOADS[w][2]}/s |")  # fmt: skip
    command = (f"python scripts/bench_head.py --workloads {args.workloads} --steps {args.steps} "
               f"--rounds {args.rounds}")  # fmt: skip
    publish("\n".join([
        f"## LM head fused with its log-softmax vs unfused ({time.strftime('%Y-%m-%d')})",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine(('torch', 'transformers', 'peft'))}  ",
        "Model: embedded SmolLM2-135M-Instruct (vocabulary 49,152), LoRA r=16 alpha=32 all-linear, "
        "batch 8, no gradient checkpointing but in sft-packed-gc; sft-padded: demo-sft, max_length 256; "
        "sft-packed-gc: demo-sft packed into rows of 512; dpo: demo-prefs. head: SmolLM2's head "
        "alone (random 49,152 x 576 weight), forward and backward on 2,048 target positions. "
        "head-ppo: the same head as PPO uses it on 512 response tokens (8 episodes x 64), in "
        "float32 at temperature 0.7: log-probs and entropies without gradient (the rollout), "
        "then log-probs forward and backward (an update).",
        "",
        "| workload | fused (median) | unfused (median) | ratio | peak MiB fused / unfused | "
        "first-step loss difference | unit |",
        "|---|---|---|---|---|---|---|",
        *rows,
        *[f"\n{w}: before its first step the process held "
          + " / ".join(f"{base[w, v]:.0f}" for v in VARIANTS) + " MiB (fused / unfused)."
          for w in workloads if WORKLOADS[w][0] == "head"],
        "",
    ]), args.append)  # fmt: skip


if __name__ == "__main__":
    main()
