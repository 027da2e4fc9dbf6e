"""DPO memory: the reference as a frozen adapter on the one base (ours) vs a second model.

    python scripts/bench_dpo_memory.py --init-from runs/demo/sft/final
    python scripts/bench_dpo_memory.py --init-from runs/demo/sft/final --steps 3 --rounds 2 --append docs/benchmarks.md

Both variants run in their own process, the same harness, data (shipped demo-prefs, 8 pairs per
step) and DPO steps, with the stage's own functions (`rlhf_cli.stages.dpo`):
- "shared base": `build_policy_and_reference` — the policy adapter trainable, the starting adapter
  loaded again frozen as the reference on the same base;
- "two models": the textbook layout — the same policy, and a separate reference model (a second
  copy of the base with the starting adapter merged in, frozen).
Reported per variant: resident memory once the models are built (before any step) and the peak
over the steps (ru_maxrss of the process), with the ratio to the shared base. Variants alternate.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from bench_report import publish

VARIANTS = ("shared base", "two models")


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(variant: str, init_from: str, steps: int) -> None:
    """Build the models one way, print the resident memory, then run `steps` DPO steps."""
    import torch
    from peft import PeftModel

    from rlhf_cli import checkpoint, data, modeling
    from rlhf_cli.compose import stage_config
    from rlhf_cli.stages import dpo

    # the workload this benchmark has always measured: 8 pairs of at most 256 tokens a step
    config = stage_config(
        "dpo", [f"init_from={init_from}", "train.batch_size=8", "data.max_length=256"]
    )
    parent = checkpoint.read_manifest(init_from)
    config.model.name_or_path = parent["base_model"]
    device = modeling.resolve_device("auto")
    tokenizer = modeling.load_tokenizer(config.model)
    rows, _ = data.load_splits(config.data, config.seed)
    pairs, _ = data.tokenize_preferences(rows, tokenizer, config.data, config.data.path)
    if variant == "shared base":
        model, _, reference, dtype = dpo.build_policy_and_reference(
            config, tokenizer, device, parent
        )
    else:
        model, _ = modeling.load_trainable_adapter(config, tokenizer, device, Path(init_from))
        modeling.disable_dropout(model)
        dtype = modeling.compute_dtype(config.quant, device)
        second_base, _ = modeling.load_base_model(config, tokenizer, device)
        reference_model = (
            PeftModel.from_pretrained(second_base, init_from).merge_and_unload().eval()
        )
        reference = dpo.Reference(reference_model, None, device, dtype)
        reference.compute = lambda batch: _plain_logps(reference_model, batch, device, dtype)
    print(f"after setup: {rss_mib():.0f} MiB", flush=True)
    optimizer = torch.optim.AdamW(modeling.trainable_parameters(model), lr=config.optim.lr)
    stream = data.BatchStream(pairs, config.train.batch_size, config.seed)
    model.train()
    for _ in range(steps):
        batch = data.collate_pairs(stream.next(), tokenizer.pad_token_id)
        pair_losses, _ = dpo.dpo_step_loss(model, reference, batch, config, device, dtype)
        pair_losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _plain_logps(model, batch, device, dtype):
    import torch

    from rlhf_cli import modeling

    with torch.no_grad():
        return modeling.completion_logps(model, batch, device, dtype)[0].float()


def run(command: list[str], log: Path) -> tuple[float, float]:
    """(resident MiB after setup, peak MiB) of one worker process."""
    with log.open("w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    text = log.read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{command[2:5]} failed:\n{text[-2000:]}")
    setup = float(
        next(line.split()[2] for line in text.splitlines() if line.startswith("after setup:"))
    )
    return setup, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--init-from", required=True, help="an sft final/ folder")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--append", type=Path, default=None)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.init_from, args.steps)
        return

    results: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for variant in VARIANTS:
                command = [sys.executable, __file__, "--worker", variant, "--init-from", args.init_from,
                           "--steps", str(args.steps)]  # fmt: skip
                results[variant].append(run(command, Path(tmp) / f"{variant}-{round_index}.log"))
                setup, peak = results[variant][-1]
                print(
                    f"round {round_index + 1} {variant}: {setup:.0f} MiB after setup, peak {peak:.0f} MiB",
                    flush=True,
                )

    base_setup = max(r[0] for r in results["shared base"])
    base_peak = max(r[1] for r in results["shared base"])
    rows = []
    for variant, values in results.items():
        setup, peak = max(r[0] for r in values), max(r[1] for r in values)
        rows.append(
            f"| {variant} | {setup:.0f} | {setup / base_setup:.2f}x | {peak:.0f} | {peak / base_peak:.2f}x |"
        )
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("torch", "transformers", "peft"))
    report = "\n".join([
        f"## DPO memory: shared-base reference vs a second model ({time.strftime('%Y-%m-%d')})",
        "",
        f"Command: `python scripts/bench_dpo_memory.py --init-from <demo sft final/> --steps {args.steps} "
        f"--rounds {args.rounds}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, CPU (float32, quant=none); {versions}  ",
        "Model: embedded SmolLM2-135M-Instruct + the demo SFT adapter; demo-prefs, 8 pairs per step.",
        "",
        "| variant | MiB after setup (max over rounds) | ratio | peak MiB over the steps | ratio |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ])  # fmt: skip
    publish(report, args.append)


if __name__ == "__main__":
    main()
