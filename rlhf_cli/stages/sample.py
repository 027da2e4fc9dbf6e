"""`rlhf sample`: candidate responses to label, n per prompt from a checkpoint, or A/B from two.

    rlhf sample policy=runs/sft/final data=prompts.jsonl n=2 out=pairs.jsonl
    rlhf sample policy=runs/dpo/final policy_b=runs/sft/final n=1 out=ab.jsonl   # A/B
    rlhf sample policy=null n=4 temperature=0.8                                 # the raw base

One base model in memory carries the policy's adapter (and policy_b's). For every prompt of `data`
(all of its rows: nothing is held out here), `n` responses are sampled from each policy at
`temperature` (top_k=0, top_p=1) with `rlhf eval`'s generation code, every batch's RNG seeded from
`seed`, the candidate and the batch. One JSON row per prompt is written:

    {"id": 0, "prompt": ..., "candidates": [{"text", "source": "a" | "b", "tokens", "ended"}, ...],
     "columns": {the prompt row's other columns, for judges}, "provenance": {"sources": {"a": ...},
     "sampling": {...}, ...}}

The file is written whole at the end (a temporary file renamed into place); an existing one is kept
unless overwrite=true. `rlhf label in=<out>` turns it into preference pairs.
"""

from __future__ import annotations

import signal
import time
from contextlib import contextmanager
from pathlib import Path

import rlhf_cli
from rlhf_cli import checkpoint, data, distributed, episodes
from rlhf_cli.cli.run import say
from rlhf_cli.files import check_out_file, write_jsonl_atomic
from rlhf_cli.lineage import POLICY_STAGES, check_same_base
from rlhf_cli.loop import StopOnSignal, begin
from rlhf_cli.policies import POLICY, REFERENCE, load_model, play
from rlhf_cli.schema import SampleConfig, UserError
from rlhf_cli.tracking import make_console

PAIRS_FILE = "pairs.jsonl"  # the default out, in output_dir


def adapter_folder(value: str | None) -> str | None:
    """A policy setting -> its final/ folder, or None for the raw base."""
    return None if value in (None, "base") else value


def source_info(folder: str | None, manifest: dict | None, base_model: str) -> dict:
    """Where one policy's candidates come from, for every row's provenance."""
    if folder is None:
        return {"checkpoint": None, "stage": "base", "base_model": base_model, "parent": None}
    return {
        "checkpoint": str(Path(folder).resolve()),
        "stage": manifest["stage"],
        "base_model": manifest["base_model"],
        "parent": manifest.get("parent"),
    }


def remove_unused_run_folder(output_dir: str) -> None:
    """With out= elsewhere, the run folder holds only Hydra's record: remove it, and the empty
    folders above it up to the current one (runs/sample/)."""
    checkpoint.remove_if_unused(output_dir)
    here, folder = Path.cwd().resolve(), Path(output_dir).resolve().parent
    while here in folder.parents and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent


@contextmanager
def stop_at_once():
    """Ctrl-C / SIGTERM stop sampling at once: nothing is written before the end, so there is no
    state to save (the training stages' handler would wait for a step boundary)."""

    def handle(signum, frame):
        raise KeyboardInterrupt(signum)

    saved = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def candidate(episode: episodes.Episode, source: str) -> dict:
    """A candidate of pairs.jsonl: its text (one turn: the response; an episode: the whole
    transcript, which `rlhf label` shows and ranks), where it came from, its policy tokens and
    whether its last turn ended with a stop token; an episode also keeps its messages, last reply,
    turns, why it ended and the environment's reward."""
    row = {
        "text": episodes.transcript(episode),
        "source": source,
        "tokens": sum(episode.policy),
        "ended": episode.ended,
    }
    if episode.multi_turn:
        row |= {
            "messages": episode.messages[episode.prompt_messages :],
            "response": episode.response,
            "turns": episode.turns,
            "finish": episode.finish,
            "env_reward": episode.env_reward,
        }
    return row


def train(config: SampleConfig, signals: StopOnSignal | None = None) -> dict[str, float]:
    try:
        return sample(config)
    except (UserError, SystemExit):  # refused or stopped: leave no empty run folder behind
        remove_unused_run_folder(config.output_dir)
        raise


def sample(config: SampleConfig) -> dict[str, float]:
    console = make_console()
    # ------------------------------------------------------------ checks before any model loads
    out = Path(config.out) if config.out else Path(config.output_dir) / PAIRS_FILE
    check_out_file(out, "out", config.overwrite)
    folder_a, folder_b = adapter_folder(config.policy), adapter_folder(config.policy_b)
    manifest_b = None
    if folder_b is not None:
        manifest_b = checkpoint.check_parent(folder_b, "sample", POLICY_STAGES, "policy_b")
    base_from = (manifest_b, folder_b, "policy_b") if folder_a is None and manifest_b else None
    _, manifest_a, device, tokenizer = begin(
        config, "sample", console, POLICY_STAGES, folder_a, "policy", base_from
    )
    if folder_a is not None and manifest_b is not None:  # both on one base model
        check_same_base(config, manifest_b, tokenizer, folder_b, "policy_b")
    setup = episodes.setup_for(config, config.generation)  # an env= that does not import stops here
    rows, _ = data.load_splits(config.data, config.seed)
    read = data.environment_rows if setup.env else data.tokenize_prompts
    prompts, prompt_stats = read(rows, tokenizer, config.data, config.data.path)
    what = f"rows for {config.env.name}" if setup.env else "prompts"
    console.print(f"{what}: {prompt_stats.summary()}{data.demo_note(config.data.path)}")

    # ------------------------------------------------------------ the model: policy (+ policy_b)
    config.policy = folder_a  # eval's loader: the policy adapter, or the raw base
    model, quant = load_model(config, tokenizer, device, folder_b)  # B rides as "reference"
    base = config.model.name_or_path
    # source name -> (its adapter in the model, None: the bare base; provenance)
    sources = {"a": (POLICY if folder_a else None, source_info(folder_a, manifest_a, base))}
    if config.policy_b is not None:
        sources["b"] = (REFERENCE if folder_b else None, source_info(folder_b, manifest_b, base))
    names = {name: info["checkpoint"] or "the raw base" for name, (_, info) in sources.items()}
    console.print(
        f"model: {config.model.name_or_path} on {device} (quant={quant}); "
        + "; ".join(f"{name}: {text}" for name, text in names.items())
        + f"; {len(prompts)} prompts x {config.n} candidates from each at temperature "
        f"{config.temperature} (seed {config.seed})"
    )

    # ------------------------------------------------------------ n candidates from each source
    batches = -(-len(prompts) // config.generation.batch_size)
    drawn: dict[str, list[list[episodes.Episode]]] = {}
    try:
        with stop_at_once():
            for s, (name, (role, _)) in enumerate(sources.items()):
                drawn[name] = []
                for c in range(config.n):
                    started = time.perf_counter()
                    seed = config.seed + (s * config.n + c) * batches  # distinct for every batch
                    drawn[name].append(
                        play(model, role, prompts, tokenizer, config, config.temperature, seed)
                    )
                    console.print(
                        f"candidate {c + 1}/{config.n} from {name} ({names[name]}): "
                        f"{time.perf_counter() - started:.1f} s"
                    )
    except KeyboardInterrupt as stop:
        signum = stop.args[0] if stop.args else signal.SIGINT
        say(
            f"rlhf sample: stopped by {signal.Signals(signum).name} before every candidate was "
            f"sampled; {out} was not written."
        )
        raise SystemExit(128 + signum) from None

    # ------------------------------------------------------------ one row per prompt, written whole
    provenance = {
        "sources": {name: info for name, (_, info) in sources.items()},
        "sampling": {
            "n": config.n,
            "temperature": config.temperature,
            "top_k": 0,
            "top_p": 1.0,
            "seed": config.seed,
            "max_new_tokens": config.generation.max_new_tokens,
        },
        "data": config.data.path,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rlhf_cli": rlhf_cli.__version__,
    }
    prompt_columns = (config.data.columns.prompt, config.data.columns.messages)
    out_rows = []
    for i, prompt in enumerate(prompts):
        candidates = [
            candidate(passes[i], name) for name, candidate_passes in drawn.items()
            for passes in candidate_passes
        ]  # fmt: skip
        columns = {k: v for k, v in (prompt.row or {}).items() if k not in prompt_columns}
        out_rows.append(
            {
                "id": i,
                # in an environment: what its reset gave (the same for every candidate of the row,
                # whose episodes share the environment's seeds)
                "prompt": prompt.prompt
                if not setup.env
                else next(iter(drawn.values()))[0][i].prompt,
                "candidates": candidates,
                "columns": columns,
                "provenance": provenance,
            }
        )
    if distributed.is_main():
        out.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl_atomic(out, out_rows)
        if Path(config.output_dir).resolve() not in out.resolve().parents:
            remove_unused_run_folder(config.output_dir)
    every = [c for row in out_rows for c in row["candidates"]]
    metrics = {
        "prompts": float(len(out_rows)),
        "candidates": float(len(every)),
        "response_length": sum(c["tokens"] for c in every) / len(every),
        "eos_rate": sum(c["ended"] for c in every) / len(every),
    }
    console.print(
        f"[bold green]done[/]: {out}: {len(out_rows)} prompts, {len(every)} candidates (mean "
        f"{metrics['response_length']:.1f} tokens, {metrics['eos_rate']:.0%} ended with EOS); "
        f"label them with: rlhf label in={out} out=prefs.jsonl"
    )
    return metrics
