"""Throughput and peak memory of our stages against the library users would pick instead, side by side.

    python scripts/bench.py                                 # sft, reward, dpo, kto vs TRL; ppo rollout vs generate
    python scripts/bench.py --stages sft,dpo --steps 8 --rounds 3 --append docs/benchmarks.md

Same model (the embedded SmolLM2-135M-Instruct, float32 on CPU / as loaded on GPU), same data (the
shipped demo sets), same LoRA (r=16, alpha=32, every linear layer; dropout 0.05 for SFT and none for
reward, DPO and KTO, as TRL's trainers run those), same batch and maximum length, no gradient
checkpointing, no evaluation or saving inside the timed steps.

- sft / reward / dpo / kto: ours is a real `rlhf <stage>` run; the baseline is TRL's SFTTrainer,
  RewardTrainer, DPOTrainer and KTOTrainer (with its PEFT reference: the adapter disabled) on the
  same settings. KTO's rows are demo-prefs' pairs split into a desirable and an undesirable row
  each, on both sides; TRL's KTO needs sequential batches, so its rows are shuffled once first.
  The headline row runs each side with its own default batching: ours length-grouped
  (data.group_by_length=true), TRL's random. For the stages in --like-for-like (default: sft) two
  more variants run in the same rounds, ours with random batches and TRL length-grouped
  (train_sampling_strategy="group_by_length"), and two more rows compare the sides like for like.
  Each run is its own process (cold start alike), and the variants alternate round by round so
  machine noise hits both. A step's throughput is its units (non-padding tokens for SFT, pairs for
  reward and DPO, rows for KTO) over the wall time since the previous step ended; the first step of a run is
  warm-up and skipped. Reported: the median over all rounds' steps, the run's peak RSS (or peak CUDA
  memory), and the ratio ours / baseline.
- ppo: TRL 1.16 has no PPO trainer, so two measurements of ours. A real `rlhf ppo` run with its
  four roles on one base, each role's part of a step timed (`perf/<part>_s`): the role-by-role
  table. And our rollout (`rollout.sample`: sampling with the KV cache, truncation after the stop token,
  masks) against a plain `model.generate` call with the same sampling settings and prompts, in one
  process, alternating; reported as generated tokens/s and the time ratio ours / generate.

TRL is a benchmark and test dependency only; `rlhf_cli` never imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from bench_report import publish

REPO = Path(__file__).resolve().parents[1]
LORA = {"r": 16, "alpha": 32}
# LoRA dropout as each side runs the stage: 0.05 for SFT (both), none for reward and DPO (TRL's
# RewardConfig/DPOConfig disable_dropout=True, and our reward/dpo configs set lora.dropout=0)
DROPOUT = {"sft": 0.05, "reward": 0.0, "dpo": 0.0, "kto": 0.0}
UNITS = {"sft": "tokens", "reward": "pairs", "dpo": "pairs", "kto": "rows"}
BASELINES = {"sft": "TRL SFTTrainer", "reward": "TRL RewardTrainer", "dpo": "TRL DPOTrainer",
             "kto": "TRL KTOTrainer"}  # fmt: skip
# (side, length-grouped batches); the first two are each side's defaults (the headline row)
VARIANTS = [("ours", True), ("trl", False), ("ours", False), ("trl", True)]
GROUPING = {True: "length-grouped", False: "random batches"}


# ---------------------------------------------------------------- one run in its own process
class ChildFailed(SystemExit):
    """A benchmarked run failed, ran out of time or was not run: `why`, and the tail of its log.
    Uncaught, it ends the script with its message (a SystemExit); bench_gpu.py catches it to
    report the run and go on with the next one."""

    def __init__(self, why: str, command: list[str] | None = None, log_tail: str = ""):
        self.why, self.log_tail = why, log_tail
        head = f"{' '.join(command[:5])} ... " if command else ""
        super().__init__(f"{head}{why}" + (f":\n{log_tail}" if log_tail else ""))


def run_child(command: list[str], log: Path, timeout: float | None = None) -> float:
    """Run `command`, wait (killing it after `timeout` seconds), and return its own peak RSS in MiB."""
    deadline = None if timeout is None else time.monotonic() + timeout
    killed = False
    with log.open("w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO)
        # os.wait4 (not Popen.wait) reads the child's own peak RSS; polled while there is a deadline
        while True:
            pid, status, usage = os.wait4(
                process.pid, 0 if killed or deadline is None else os.WNOHANG
            )
            if pid:
                break
            if time.monotonic() > deadline:
                process.kill()
                killed = True
            else:
                time.sleep(0.2)
    if os.waitstatus_to_exitcode(status) != 0:
        why = f"stopped after {timeout:.0f} s" if killed else "failed"
        raise ChildFailed(why, command, log.read_text()[-3000:])
    return usage.ru_maxrss / 1024


def step_rates(records: list[dict]) -> list[float]:
    """Units per second of each step after the first: its units over the time since the last one."""
    return [
        now["units"] / (now["time"] - before["time"])
        for before, now in zip(records, records[1:], strict=False)
    ]


def ours(stage: str, args, workdir: Path, grouped: bool) -> tuple[list[float], float]:
    out = workdir / f"ours-{stage}-{time.time_ns()}"
    data = "demo-sft" if stage == "sft" else "demo-prefs"
    command = [sys.executable, "-m", "rlhf_cli", stage, f"output_dir={out}", f"data={data}",
               "data.eval_size=0", f"data.max_length={args.max_length}", f"train.batch_size={args.batch}",
               "train.grad_accum=1", f"train.max_steps={args.steps}", "train.save_every=0", "train.eval_every=0",
               f"lora.r={LORA['r']}", f"lora.alpha={LORA['alpha']}", f"lora.dropout={DROPOUT[stage]}",
               "model.gradient_checkpointing=false", "logger=console",
               f"data.group_by_length={str(grouped).lower()}"]  # fmt: skip
    command += ["samples.num_prompts=0"] if stage == "sft" else []
    peak = run_child(command, workdir / f"{out.name}.log")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "loss" in m]
    units = (lambda m: m["perf/tokens"]) if stage == "sft" else (lambda m: args.batch)
    return step_rates([{"time": m["time"], "units": units(m)} for m in steps]), peak


def baseline(stage: str, args, workdir: Path, grouped: bool) -> tuple[list[float], float]:
    out = workdir / f"trl-{stage}-{time.time_ns()}"
    out.mkdir()
    command = [sys.executable, __file__, "--worker", stage, "--out", str(out),
               f"--steps={args.steps}", f"--batch={args.batch}", f"--max-length={args.max_length}"]  # fmt: skip
    command += ["--group-by-length"] if grouped else []
    peak = run_child(command, workdir / f"{out.name}.log")
    records = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    return step_rates(records), peak


# ---------------------------------------------------------------- the TRL side (a worker process)
def trl_worker(
    stage: str, out: Path, steps: int, batch: int, max_length: int, grouped: bool
) -> None:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )

    from rlhf_cli.modeling import resolve_model_path

    folder = resolve_model_path("embedded:smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    data = "demo-sft" if stage == "sft" else "demo-prefs"
    dataset = load_dataset(
        "json", data_files=str(REPO / "rlhf_cli" / "datasets" / data / "train.jsonl"), split="train"
    )
    dataset = dataset.select_columns(
        ["messages"] if stage == "sft" else ["prompt", "chosen", "rejected"]
    )
    if stage == "kto":  # each pair -> its chosen (desirable) and rejected row, in order, as ours
        from datasets import Dataset

        rows = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
                for r in dataset for side in ("chosen", "rejected")]  # fmt: skip
        dataset = Dataset.from_list(rows)
    cpu = not torch.cuda.is_available()
    lora = LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=DROPOUT[stage],
        target_modules="all-linear", task_type="SEQ_CLS" if stage == "reward" else "CAUSAL_LM",
    )  # fmt: skip
    common = dict(
        output_dir=str(out / "run"), per_device_train_batch_size=batch, max_steps=steps,
        logging_steps=1, report_to="none", save_strategy="no", gradient_checkpointing=False,
        use_cpu=cpu, bf16=False, fp16=False, disable_tqdm=True, dataloader_num_workers=0,
        learning_rate=1e-4, max_length=max_length, seed=42,
        include_num_input_tokens_seen="non_padding" if stage == "sft" else "no",
        train_sampling_strategy="group_by_length" if grouped else "random",
    )  # fmt: skip
    records: list[dict] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen = state.num_input_tokens_seen if stage == "sft" else state.global_step * batch
            records.append({"time": time.time(), "seen": seen})

    if stage == "sft":
        from trl import SFTConfig, SFTTrainer

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        trainer = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=dataset,
                             processing_class=tokenizer, peft_config=lora, callbacks=[StepTimes()])  # fmt: skip
    elif stage == "reward":
        from trl import RewardConfig, RewardTrainer

        model = AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=1, dtype=torch.float32
        )
        model.config.pad_token_id = tokenizer.pad_token_id
        trainer = RewardTrainer(model=model, args=RewardConfig(**common), train_dataset=dataset,
                                processing_class=tokenizer, peft_config=lora, callbacks=[StepTimes()])  # fmt: skip
    elif stage == "kto":
        from trl import KTOConfig, KTOTrainer

        # TRL's KTO needs sequential batches (its KL completions are fixed per batch when the
        # dataset is prepared); a seeded shuffle first gives random batches, as ours
        common["train_sampling_strategy"] = "sequential"
        dataset = dataset.shuffle(seed=42)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        trainer = KTOTrainer(model=model, args=KTOConfig(**common, beta=0.1), train_dataset=dataset,
                             processing_class=tokenizer, peft_config=lora, callbacks=[StepTimes()])  # fmt: skip
    else:
        from trl import DPOConfig, DPOTrainer

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        trainer = DPOTrainer(model=model, args=DPOConfig(**common, beta=0.1), train_dataset=dataset,
                             processing_class=tokenizer, peft_config=lora, callbacks=[StepTimes()])  # fmt: skip
    trainer.train()
    seen = [0] + [r["seen"] for r in records]
    with (out / "steps.jsonl").open("w") as handle:
        for record, before in zip(records, seen, strict=False):
            handle.write(
                json.dumps({"time": record["time"], "units": record["seen"] - before}) + "\n"
            )


RUNNERS = {"ours": ours, "trl": baseline}


# ---------------------------------------------------------------- PPO rollout vs raw generate
def rollout_vs_generate(args) -> dict:
    """Our rollout against plain generate on the same prompts and sampling settings, alternating."""
    import torch
    from transformers import GenerationConfig

    from rlhf_cli import data, modeling, rollout
    from rlhf_cli.compose import stage_config

    config = stage_config("ppo", ["reward.fn=rlhf_cli.judges:demo_gold", "quant=none"])
    device = modeling.resolve_device("auto")
    tokenizer = modeling.load_tokenizer(config.model)
    model, _ = modeling.load_model(config, tokenizer, device)
    rows = data.load_splits(config.data, config.seed)[0][: args.batch]
    prompts, _ = data.tokenize_prompts(rows, tokenizer, config.data, "demo-prompts")
    ids = [p.input_ids for p in prompts]
    stops = rollout.stop_token_ids(model, tokenizer)
    new = args.new_tokens

    def ours_once() -> tuple[float, int]:
        started = time.perf_counter()
        result = rollout.sample(model, tokenizer, ids, new, 1.0, stops)
        return time.perf_counter() - started, int(result.lengths.sum())

    def generate_once() -> tuple[float, int]:
        query, mask = rollout.left_pad(ids, tokenizer.pad_token_id)
        settings = GenerationConfig(max_new_tokens=new, eos_token_id=stops, do_sample=True,
                                    temperature=1.0, top_k=0, top_p=1.0,
                                    pad_token_id=tokenizer.pad_token_id, use_cache=True)  # fmt: skip
        started = time.perf_counter()
        with torch.no_grad():
            output = model.generate(input_ids=query.to(device), attention_mask=mask.to(device),
                                    generation_config=settings)  # fmt: skip
        seconds = time.perf_counter() - started
        generated = output[:, query.size(1) :]
        return seconds, int((generated != tokenizer.pad_token_id).sum())

    timings: dict[str, list[tuple[float, int]]] = {"ours": [], "generate": []}
    model.eval()
    ours_once()  # warm-up
    for round_index in range(args.rounds * 2):
        torch.manual_seed(round_index)
        timings["ours"].append(ours_once())
        torch.manual_seed(round_index)
        timings["generate"].append(generate_once())
    return {
        name: {
            "seconds": statistics.median(s for s, _ in runs),
            "tokens_per_s": statistics.median(n / s for s, n in runs),
        }
        for name, runs in timings.items()
    }


# ---------------------------------------------------------------- a PPO step, role by role
ROLE_PARTS = [  # (metric, what it is); the first five make up the rollout phase, the rest the update
    ("generate", "policy: sampling the responses"),
    ("score", "reward model: scoring them"),
    ("policy_forward", "policy: log-probs of the sampled tokens"),
    ("reference_forward", "reference: log-probs (KL)"),
    ("value_forward", "value: per-token values"),
    ("policy_update", "policy: forward + backward, every minibatch"),
    ("value_update", "value: forward + backward, every minibatch"),
    ("optimizer", "clipping + optimizer steps"),
]


def ppo_steps(args, workdir: Path) -> tuple[list[str], float]:
    """A real `rlhf ppo` run (four roles on one base: policy, reference, a reward model trained for
    one step, value) and the median seconds of each role's part of a step, the first step skipped."""
    rm = workdir / "rm"
    run_child([sys.executable, "-m", "rlhf_cli", "reward", f"output_dir={rm}", "train.max_steps=1",
               "data.eval_size=0", f"train.batch_size={args.batch}", "train.grad_accum=1",
               "data.max_length=256", "train.save_every=0"],
              workdir / "rm.log")  # fmt: skip
    out = workdir / "ppo"
    peak = run_child([sys.executable, "-m", "rlhf_cli", "ppo", f"output_dir={out}", f"reward.from={rm / 'final'}",
                      # args.batch episodes a step: half per update, 2 minibatches
                      f"train.batch_size={args.batch // 2}", "train.grad_accum=1", "ppo.minibatches=2",
                      "data.max_length=256", f"train.max_steps={args.steps}", "data.eval_size=0",
                      f"rollout.max_new_tokens={args.new_tokens}", "train.save_every=0", "samples.every=0",
                      f"lora.r={LORA['r']}", f"lora.alpha={LORA['alpha']}"], workdir / "ppo.log")  # fmt: skip
    steps = [m for m in (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
             if "perf/rollout_s" in m][1:]  # fmt: skip

    def median(key: str) -> float:
        return statistics.median(m[key] for m in steps)

    total = median("perf/rollout_s") + median("perf/update_s")
    rows = [f"| {name} | {what} | {median(f'perf/{name}_s'):.2f} | {median(f'perf/{name}_s') / total:.0%} |"
            for name, what in ROLE_PARTS]  # fmt: skip
    rows += [
        f"| rollout phase | all of the above up to value | {median('perf/rollout_s'):.2f} | "
        f"{median('perf/rollout_s') / total:.0%} |",
        f"| update phase | ppo.epochs x ppo.minibatches updates | {median('perf/update_s'):.2f} | "
        f"{median('perf/update_s') / total:.0%} |",
        f"| **step** | {args.batch} episodes: **{args.batch / total:.2f} episodes/s**, "
        f"{median('perf/tokens_per_s'):.1f} generated tokens/s while sampling | {total:.2f} | 100% |",
    ]
    return rows, peak


# ---------------------------------------------------------------- report
def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine(packages=("torch", "transformers", "peft", "trl")) -> str:
    import torch

    versions = ", ".join(f"{p} {version(p)}" for p in packages)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return f"{platform.machine()}, {device}, {os.cpu_count()} cores; {versions}"


def ratio_row(label: str, stage: str, medians: dict, peaks: dict, ours: tuple, trl: tuple) -> str:
    """One table row: ours / TRL throughput and peak memory for two of the VARIANTS."""
    a, b, pa, pb = medians[ours], medians[trl], peaks[ours], peaks[trl]
    return (f"| {label} | {a:.1f} | {BASELINES[stage]}: {b:.1f} | **{a / b:.2f}x** | "
            f"{pa:.0f} / {pb:.0f} ({pa / pb:.2f}x) | {UNITS[stage]}/s |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stages", default="sft,reward,dpo,kto,ppo")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32, help="PPO rollout length")
    parser.add_argument("--like-for-like", default="sft",
                        help="stages that also run both sides with the same batching ('' = none)")  # fmt: skip
    parser.add_argument("--append", type=Path, default=None, help="append the report to this file")
    parser.add_argument("--worker", choices=sorted(UNITS), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--group-by-length", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        trl_worker(
            args.worker, args.out, args.steps, args.batch, args.max_length, args.group_by_length
        )
        return

    stages = args.stages.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for stage in (s for s in stages if s in UNITS):
            variants = VARIANTS if stage in args.like_for_like.split(",") else VARIANTS[:2]
            rates: dict[tuple, list[float]] = {v: [] for v in variants}
            peaks = dict.fromkeys(variants, 0.0)
            for round_index in range(args.rounds):
                for variant in variants:
                    side, grouped = variant
                    got, peak = RUNNERS[side](stage, args, Path(tmp), grouped)
                    rates[variant] += got
                    peaks[variant] = max(peaks[variant], peak)
                    print(f"{stage} round {round_index + 1} {side} ({GROUPING[grouped]}): median "
                          f"{statistics.median(got):.1f} {UNITS[stage]}/s, peak {peak:.0f} MiB", flush=True)  # fmt: skip
            medians = {v: statistics.median(values) for v, values in rates.items()}

            rows.append(ratio_row(stage, stage, medians, peaks, VARIANTS[0], VARIANTS[1]))
            for grouped in (False, True) if len(variants) > 2 else ():
                rows.append(ratio_row(f"{stage}, both {GROUPING[grouped]}", stage, medians, peaks,
                                      ("ours", grouped), ("trl", grouped)))  # fmt: skip
    if "ppo" in stages:
        result = rollout_vs_generate(args)
        ratio = result["ours"]["seconds"] / result["generate"]["seconds"]
        rows.append(
            f"| ppo rollout | {result['ours']['tokens_per_s']:.1f} | `model.generate`: "
            f"{result['generate']['tokens_per_s']:.1f} | time **{ratio:.2f}x** of generate | - | "
            "generated tokens/s |"
        )
    ppo_rows, ppo_peak = [], 0.0
    if "ppo" in stages:
        with tempfile.TemporaryDirectory() as tmp:
            ppo_rows, ppo_peak = ppo_steps(args, Path(tmp))
    command = (
        f"python scripts/bench.py --stages {args.stages} --steps {args.steps} --rounds {args.rounds} "
        f"--batch {args.batch} --max-length {args.max_length} --new-tokens {args.new_tokens} "
        f"--like-for-like '{args.like_for_like}'"
    )
    report = "\n".join([
        f"## Ours vs the baselines ({time.strftime('%Y-%m-%d')})",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine()}  ",
        f"Model: embedded SmolLM2-135M-Instruct, LoRA r={LORA['r']} alpha={LORA['alpha']} all-linear "
        "(dropout 0.05 sft, 0 reward/dpo/kto), "
        f"batch {args.batch}, max_length {args.max_length}; demo-sft / demo-prefs (kto: split into rows) / demo-prompts. "
        "Rows named by stage alone: each side's default batching (ours length-grouped, TRL random).",
        "",
        "| stage | ours (median) | baseline (median) | ratio ours / baseline | peak MiB ours / baseline | unit |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        *([
            f"One PPO step ({args.steps} steps of `rlhf ppo`, first skipped; median seconds; batch "
            f"{args.batch}, {args.new_tokens} new tokens, the shipped ppo settings; peak {ppo_peak:.0f} MiB):",
            "",
            "| part | role: work | seconds | share |",
            "|---|---|---|---|",
            *ppo_rows,
            "",
        ] if ppo_rows else []),
    ])  # fmt: skip
    publish(report, args.append)


if __name__ == "__main__":
    main()
