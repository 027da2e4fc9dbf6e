"""GRPO throughput and peak memory: `rlhf grpo` against TRL's GRPOTrainer, side by side in one run.

    python scripts/bench_grpo.py                                  # 6 steps x 3 rounds
    python scripts/bench_grpo.py --steps 8 --rounds 2 --append docs/benchmarks.md

Both sides: the embedded SmolLM2-135M-Instruct (float32 on CPU, as loaded on GPU), LoRA r=16
alpha=32 on every linear layer with no dropout, the shipped demo-prompts, a verifiable reward (the
demo judge, `rlhf_cli.judges:demo_gold`), G samples per prompt, P prompts per step (one optimizer
step per generation batch: micro-batches of 8 completions, P x G / 8 of them accumulated), the same
number of new tokens at temperature 1, beta 0 (no reference model on either side), one iteration,
the token-mean loss (TRL's default `dapo`, our default `token_mean`), no vLLM, no evaluation or
saving inside the timed steps. Each run is its own process (cold start alike) and the two sides
alternate round by round so machine noise hits both.

A step's throughput: its P x G episodes over the wall time since the previous step ended (the
first step of a run is warm-up and skipped); generated tokens/s: the step's completion tokens over
the same time. Reported: medians over all rounds' steps, each run's peak RSS (or CUDA memory), the
ratios ours / TRL, and which share of our step is sampling (`perf/sampling_share`).

TRL is a benchmark and test dependency only; `rlhf_cli` never imports it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import LORA, REPO, run_child, step_rates
from bench import machine as describe_machine
from bench_report import publish

MICRO = 8  # completions per forward pass, both sides


def ours(args, workdir: Path) -> tuple[list[float], list[float], float, list[dict]]:
    out = workdir / f"ours-{time.time_ns()}"
    episodes = args.prompts * args.group
    command = [sys.executable, "-m", "rlhf_cli", "grpo", f"output_dir={out}", "data=demo-prompts",
               "data.eval_size=0", "data.max_length=256", "reward.fns=[rlhf_cli.judges:demo_gold]",
               f"grpo.group_size={args.group}", f"train.batch_size={MICRO}",
               f"train.grad_accum={episodes // MICRO}", f"train.max_steps={args.steps}",
               f"rollout.max_new_tokens={args.new_tokens}", f"rollout.batch_size={episodes}",
               "kl.beta=0", "optim.lr=1e-5", "train.save_every=0", "train.eval_every=0",
               "samples.every=0", f"lora.r={LORA['r']}", f"lora.alpha={LORA['alpha']}",
               "lora.dropout=0", "model.gradient_checkpointing=false", "logger=console"]  # fmt: skip
    peak = run_child(command, workdir / f"{out.name}.log")
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "reward/mean" in m]
    episodes_per_s = step_rates([{"time": m["time"], "units": episodes} for m in steps])
    tokens = [m["rollout/response_length"] * episodes for m in steps]
    tokens_per_s = step_rates([{"time": m["time"], "units": t} for m, t in zip(steps, tokens, strict=True)])  # fmt: skip
    return episodes_per_s, tokens_per_s, peak, steps[1:]


def baseline(args, workdir: Path) -> tuple[list[float], list[float], float, list[dict]]:
    out = workdir / f"trl-{time.time_ns()}"
    out.mkdir()
    command = [sys.executable, __file__, "--worker", "--out", str(out), f"--steps={args.steps}",
               f"--prompts={args.prompts}", f"--group={args.group}",
               f"--new-tokens={args.new_tokens}"]  # fmt: skip
    peak = run_child(command, workdir / f"{out.name}.log")
    records = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    episodes = args.prompts * args.group
    episodes_per_s = step_rates([{"time": r["time"], "units": episodes} for r in records])
    tokens_per_s = step_rates([{"time": r["time"], "units": r["tokens"]} for r in records])
    return episodes_per_s, tokens_per_s, peak, []


def trl_worker(out: Path, steps: int, prompts: int, group: int, new_tokens: int) -> None:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_cli.judges import demo_gold
    from rlhf_cli.modeling import resolve_model_path

    folder = resolve_model_path("embedded:smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    dataset = load_dataset(
        "json", data_files=str(REPO / "rlhf_cli/datasets/demo-prompts/train.jsonl"), split="train"
    ).select_columns(["prompt", "answer"])

    def gold(prompts, completions, answer, **_):  # TRL passes conversational completions
        return demo_gold(prompts, [c[0]["content"] for c in completions], answer)

    episodes = prompts * group
    config = GRPOConfig(
        output_dir=str(out / "run"), per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=episodes // MICRO, num_generations=group,
        max_completion_length=new_tokens, temperature=1.0, beta=0.0, num_iterations=1,
        loss_type="dapo", learning_rate=1e-5, max_steps=steps, logging_steps=1, report_to="none",
        save_strategy="no", gradient_checkpointing=False, use_cpu=not torch.cuda.is_available(),
        bf16=False, fp16=False, disable_tqdm=True, dataloader_num_workers=0, seed=42,
    )  # fmt: skip
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                      target_modules="all-linear", task_type="CAUSAL_LM")  # fmt: skip
    records: list[dict] = []
    lengths: list[float] = []

    class StepTimes(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

        def on_step_end(self, args, state, control, **kwargs):
            records.append({"time": time.time()})

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=gold, args=config, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=lora, callbacks=[StepTimes()])  # fmt: skip
    trainer.train()
    with (out / "steps.jsonl").open("w") as handle:
        for record, length in zip(records, lengths, strict=False):
            handle.write(json.dumps({**record, "tokens": length * episodes}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--group", type=int, default=8, help="samples per prompt (G)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--append", type=Path, default=None, help="append the report to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        trl_worker(args.out, args.steps, args.prompts, args.group, args.new_tokens)
        return
    if (args.prompts * args.group) % MICRO:
        parser.error(f"--prompts x --group must be a multiple of {MICRO}")

    sides = {"ours": ours, "trl": baseline}
    rates = {s: {"episodes": [], "tokens": []} for s in sides}
    peaks = dict.fromkeys(sides, 0.0)
    our_steps: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for side, run in sides.items():
                episodes, tokens, peak, steps = run(args, Path(tmp))
                rates[side]["episodes"] += episodes
                rates[side]["tokens"] += tokens
                peaks[side] = max(peaks[side], peak)
                our_steps += steps
                print(f"round {round_index + 1} {side}: median {statistics.median(episodes):.2f} "
                      f"episodes/s, {statistics.median(tokens):.1f} generated tokens/s, peak "
                      f"{peak:.0f} MiB", flush=True)  # fmt: skip
    median = {s: {k: statistics.median(v) for k, v in r.items()} for s, r in rates.items()}
    share = statistics.median(m["perf/sampling_share"] for m in our_steps)
    parts = {k: statistics.median(m[f"perf/{k}_s"] for m in our_steps)
             for k in ("generate", "score", "policy_update", "optimizer")}  # fmt: skip
    command = (f"python scripts/bench_grpo.py --steps {args.steps} --rounds {args.rounds} "
               f"--prompts {args.prompts} --group {args.group} --new-tokens {args.new_tokens}")  # fmt: skip
    ours_e, trl_e = median["ours"]["episodes"], median["trl"]["episodes"]
    ours_t, trl_t = median["ours"]["tokens"], median["trl"]["tokens"]
    report = "\n".join([
        f"## GRPO: ours vs TRL GRPOTrainer ({time.strftime('%Y-%m-%d')})",
        "",
        f"Command: `{command}`  ",
        f"Machine: {describe_machine()}  ",
        f"Model: embedded SmolLM2-135M-Instruct, LoRA r={LORA['r']} alpha={LORA['alpha']} "
        f"all-linear, no dropout; {args.prompts} prompts x {args.group} samples a step, "
        f"{args.new_tokens} new tokens, micro-batches of {MICRO}, beta 0, one iteration, token-mean "
        "loss; demo-prompts rewarded by the demo judge.",
        "",
        "| measure | ours (median) | TRL GRPOTrainer (median) | ratio ours / TRL |",
        "|---|---|---|---|",
        f"| episodes/s | {ours_e:.2f} | {trl_e:.2f} | **{ours_e / trl_e:.2f}x** |",
        f"| generated tokens/s | {ours_t:.1f} | {trl_t:.1f} | {ours_t / trl_t:.2f}x |",
        f"| peak MiB | {peaks['ours']:.0f} | {peaks['trl']:.0f} | {peaks['ours'] / peaks['trl']:.2f}x |",
        "",
        f"Our step: sampling (`generate()`) is {share:.0%} of it; median seconds: generate "
        f"{parts['generate']:.2f}, score {parts['score']:.3f}, policy update "
        f"{parts['policy_update']:.2f}, optimizer {parts['optimizer']:.3f}. Episodes/s differ from "
        "tokens/s where the two policies sampled responses of different lengths.",
        "",
    ])  # fmt: skip
    publish(report, args.append)


if __name__ == "__main__":
    main()
