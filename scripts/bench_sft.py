"""SFT throughput benchmark: padded vs packed batches, side by side in one run.

    python scripts/bench_sft.py                  # SmolLM2-135M (embedded), demo-sft, 6 steps x 3 rounds
    python scripts/bench_sft.py --steps 10 --rounds 5 --append docs/benchmarks.md

Each variant is a real `rlhf sft` run (a subprocess, so every run starts cold in the same way);
variants alternate round by round so machine noise hits both alike. Reported: median tokens/s over
the steps of all rounds (the first step of each run is skipped as warm-up), peak RSS of the run, and
the ratio to the first variant. The TRL baseline comparisons belong to the benchmark issue.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from importlib import metadata
from pathlib import Path

from bench import run_child
from bench_report import publish

VARIANTS = {
    "padded": ["data.packing=false"],
    "packed": ["data.packing=true"],
}


def run_variant(
    name: str, extra: list[str], steps: int, workdir: Path
) -> tuple[list[float], float]:
    out = workdir / f"{name}-{time.time_ns()}"
    command = [
        "rlhf",
        "sft",
        f"output_dir={out}",
        f"train.max_steps={steps}",
        "train.grad_accum=1",
        "data.max_length=256",  # the demo's rows and the packed rows' size, as always measured
        "train.eval_every=0",
        "train.save_every=0",
        "samples.num_prompts=0",
        *extra,
    ]
    peak_mib = run_child(command, workdir / f"{out.name}.log")  # this child's own peak RSS
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [m["perf/tokens_per_s"] for m in lines if "perf/tokens_per_s" in m][1:]
    return rates, peak_mib


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--append", type=Path, default=None, help="append a markdown section to this file"
    )
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = parser.parse_args()

    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    peaks: dict[str, float] = {name: 0.0 for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for name, extra in VARIANTS.items():
                got, peak = run_variant(name, extra + args.overrides, args.steps, Path(tmp))
                rates[name] += got
                peaks[name] = max(peaks[name], peak)
                print(
                    f"round {round_index + 1} {name}: median {statistics.median(got):.0f} tokens/s",
                    flush=True,
                )

    first = next(iter(VARIANTS))
    base = statistics.median(rates[first])
    rows = [
        f"| {name} | {statistics.median(rates[name]):.0f} | {statistics.median(rates[name]) / base:.2f}x "
        f"| {peaks[name]:.0f} |"
        for name in VARIANTS
    ]
    command = "python scripts/bench_sft.py " + " ".join(
        [f"--steps {args.steps}", f"--rounds {args.rounds}", *args.overrides]
    )
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("torch", "transformers", "peft"))
    report = "\n".join(
        [
            f"## SFT: padded vs packed ({time.strftime('%Y-%m-%d')})",
            "",
            f"Command: `{command}`  ",
            f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}, "
            f"{os.cpu_count()} cores; {versions}  ",
            "Model: embedded SmolLM2-135M-Instruct, LoRA r=16 all-linear, demo-sft, batch 8, max_length 256.",
            "",
            f"| variant | median tokens/s | ratio to {first} | peak RSS (MiB) |",
            "|---|---|---|---|",
            *rows,
            "",
        ]
    )
    publish(report, args.append)


if __name__ == "__main__":
    main()
