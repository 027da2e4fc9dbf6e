"""What every training loop does, around the algorithm its stage file writes out: the start
(`begin`), the optimizer and its schedule, step counts, the data stream and the resume position,
the non-finite guard, the end of a step (checkpoint, stop on a signal), and stopping.

    resume_from, parent, device, tokenizer = begin(config, "dpo", console, parents=("sft",))
    optimizer = build_optimizer(params, config.optim); scheduler = lr_schedule(...)
    for step in ...: ...; optimizer_step(...); end_of_step(config, step, ..., stop=stop)
"""

from __future__ import annotations

import math
import os
import random
import signal
import sys
import threading

import torch

from rlhf_cli import checkpoint, data, distributed, files, modeling
from rlhf_cli.lineage import check_same_base, inherit_base_model
from rlhf_cli.schema import OptimConfig, StageConfig, TrainConfig, to_container

SIGNAL_ENV = "RLHF_TEST_SIGNAL_AT_STEP"  # test hook: "STEP:TERM" or "STEP:INT" sends that signal


class Stopped(Exception):
    """SIGINT/SIGTERM arrived during training: a resume checkpoint was saved at a step boundary."""

    def __init__(self, signum: int, step: int):
        super().__init__(signum, step)
        self.signum, self.step = signum, step


class StopOnSignal:
    """While training (`run_stage` installs one around every stage's `train`): the first SIGINT
    (Ctrl-C) or SIGTERM asks the loop to stop at the next step boundary (`at_step_end`), where it
    saves a resume checkpoint and raises `Stopped`; a second signal stops at once, as the default
    handlers would."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._saved: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # asked twice: give up at once
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        name = signal.Signals(signum).name
        print(f"\n{name}: saving a checkpoint at the end of this step, then stopping (send it "
              "again to stop at once)", file=sys.stderr, flush=True)  # fmt: skip

    def __enter__(self) -> StopOnSignal:
        self.signum = None
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._saved[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)
        self._saved.clear()

    def at_step_end(self, step: int, total_steps: int) -> int:
        """At the end of `step`: the signal number when a SIGINT/SIGTERM asked to stop, else 0.
        The stage then saves a resume checkpoint and raises `Stopped`. A signal during the last
        step lets the run finish (it is about to write final/). The test hook
        RLHF_TEST_SIGNAL_AT_STEP="STEP:TERM" (or INT) sends the signal itself at the end of STEP."""
        want, _, name = os.environ.get(SIGNAL_ENV, "").partition(":")
        if want == str(step):
            os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
        return self.signum if self.requested and step < total_steps else 0


DIVERGED_EXIT = 3  # the loss or gradients stayed non-finite for train.max_nonfinite updates


class Diverged(Exception):
    """Too many non-finite updates in a row; no checkpoint is written after them."""


class NonFiniteGuard:
    """Skips an optimizer update whose loss or gradient norm is NaN/inf (the weights and the
    optimizer state stay as they were) and counts it; `limit` such updates in a row raise
    `Diverged`, which stops the run, leaving the last checkpoint as the last good state."""

    def __init__(self, limit: int, output_dir: str, skipped: int = 0):
        self.limit, self.output_dir = limit, output_dir
        self.skipped, self.in_a_row = skipped, 0

    def finite(self, step: int, loss: float, grad_norm: float) -> bool:
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_a_row = 0
            return True
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            latest = checkpoint.latest_checkpoint(self.output_dir)
            last = f"the last good checkpoint is {latest}" if latest else "no checkpoint was saved"
            raise Diverged(
                f"the loss or gradient was not finite in {self.in_a_row} updates in a row (at step {step}; "
                f"{self.skipped} skipped in all); {last}; lower optim.lr, check the data, or raise "
                "train.max_nonfinite."
            )
        return False


def nonfinite_guard(config: StageConfig, progress: dict) -> NonFiniteGuard:
    """The run's guard, with the count of updates skipped before a resume."""
    return NonFiniteGuard(
        config.train.max_nonfinite, config.output_dir, progress.get("skipped_updates", 0)
    )


def begin(
    config: StageConfig,
    stage: str,
    console,
    parents: tuple[str, ...] = (),
    init_from: str | None = None,
    key: str = "init_from",
    base_from: tuple[dict, str, str] | None = None,
):
    """The start every stage shares, before any model is loaded: check the output folder (-> the
    checkpoint to resume from), check the parent checkpoint (`init_from`, by default the config's)
    and inherit its base, pick the device, seed, load the tokenizer and check it matches the
    parent's base. Without a parent, `base_from` (manifest, path, key) of another checkpoint the
    run uses (a reward model) gives the base instead. Returns (resume_from, parent manifest or None,
    device, tokenizer)."""
    device = distributed.local_device(modeling.resolve_device(config.device))
    distributed.init(device)  # under torchrun: join the other processes
    # rank 0 tidies and prepares the folder first; then the others find the same checkpoint in it
    if distributed.is_main():
        resume_from = checkpoint.prepare_output_dir(
            config.output_dir, config.overwrite, config.resume_mode
        )
    distributed.barrier()
    if not distributed.is_main():
        resume_from = checkpoint.prepare_output_dir(
            config.output_dir, config.overwrite, config.resume_mode
        )
    init_from = init_from or getattr(config, "init_from", None)
    parent = None
    if init_from:
        parent = checkpoint.check_parent(init_from, stage, parents, key)
        base_from = (parent, init_from, key)
    if base_from is not None:  # before the tokenizer loads: it must be the inherited base's
        inherit_base_model(config, base_from[0], console, base_from[2])
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    tokenizer = modeling.load_tokenizer(config.model)
    if base_from is not None:
        check_same_base(config, base_from[0], tokenizer, base_from[1], base_from[2])
    return resume_from, parent, device, tokenizer


def build_optimizer(
    params: list[torch.nn.Parameter],
    optim: OptimConfig,
    more: list[torch.nn.Parameter] = (),
    more_lr: float | None = None,
) -> torch.optim.AdamW:
    """AdamW over `params` at optim.lr, and over `more` (PPO's value adapter and head) at
    `more_lr` (None: optim.lr). The schedule scales every group's rate alike."""
    groups = [{"params": list(params)}]
    if more:
        groups.append({"params": list(more), "lr": more_lr or optim.lr})
    return torch.optim.AdamW(
        groups,
        lr=optim.lr,
        betas=tuple(optim.betas),
        eps=optim.eps,
        weight_decay=optim.weight_decay,
    )


def lr_schedule(
    optimizer, optim: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0, then cosine / linear decay to lr * min_lr_ratio, or constant."""
    warmup = int(optim.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if optim.scheduler == "cosine":
            decay = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        elif optim.scheduler == "linear":
            decay = max(0.0, 1 - progress)
        else:
            decay = 1.0
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * decay

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def plan_steps(num_items: int, train: TrainConfig) -> int:
    """Optimizer steps: train.max_steps, or enough micro-batches for train.epochs passes."""
    if train.max_steps:
        return train.max_steps
    micro_per_epoch = math.ceil(num_items / (train.batch_size * distributed.world()))
    return max(1, math.ceil(train.epochs * micro_per_epoch / train.grad_accum))


def due(step: int, every: int, total_steps: int) -> bool:
    """Periodic work (eval, checkpoint) every `every` steps; the last step has its own."""
    return every > 0 and step % every == 0 and step < total_steps


def step_size(total_steps: int, train: TrainConfig, unit: str) -> str:
    """The start-up line's account of a step: per-process batch x accumulation x processes."""
    world = distributed.world()
    per_step = train.batch_size * train.grad_accum * world
    processes = f" x {world} processes" if world > 1 else ""
    return (
        f"{total_steps} steps x {train.batch_size} {unit} x {train.grad_accum} accumulation"
        f"{processes} = {per_step} {unit} per step"
    )


def resume_position(
    resume_from, model, optimizer, scheduler, config: StageConfig, console, heads=None,
    adapters=None,
) -> tuple[int, dict]:  # fmt: skip
    """(step done, progress dict with the data-stream position): from the checkpoint when resuming,
    else the start."""
    if resume_from is None:
        distributed.seed_this_rank(config.seed)
        return 0, {"step": 0, "stream": {"epoch": 0, "index": 0}}
    progress = checkpoint.load_checkpoint(
        resume_from, model, optimizer, scheduler, heads, to_container(config), adapters
    )
    console.print(f"resumed from {resume_from} (step {progress['step']})")
    return progress["step"], progress


def train_stream(items: list, config: StageConfig, progress: dict) -> data.BatchStream:
    """The training micro-batches from where `progress` left off. Every process walks the same
    stream of world x batch_size items (the order one process with the whole batch would see) and
    trains on its own share of each: `distributed.shard(stream.next())`. With
    data.group_by_length the batches are length-grouped (`data.epoch_order`)."""
    lengths = [data.item_length(x) for x in items] if config.data.group_by_length else None
    return data.BatchStream(
        items, config.train.batch_size * distributed.world(), config.seed, **progress["stream"],
        lengths=lengths,
    )  # fmt: skip


def optimizer_step(
    params, optimizer, scheduler, config: StageConfig, loss: float, guard: NonFiniteGuard, step: int
) -> dict[str, float]:
    """Clip (optim.max_grad_norm; 0 = off), step, advance the schedule, clear gradients. A
    non-finite loss or gradient skips the update and leaves the schedule where it was. Returns the
    step's metrics: lr (the one this step used), grad_norm, skipped_updates (so far)."""
    distributed.sum_gradients(params)  # the step's gradient over all ranks' rows
    max_norm = config.optim.max_grad_norm or float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
    lr = optimizer.param_groups[0]["lr"]
    if guard.finite(step, loss, grad_norm):
        files.kill_point("update")
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"lr": lr, "grad_norm": grad_norm, "skipped_updates": guard.skipped}


def save_resume_state(
    config: StageConfig, step: int, model, optimizer, scheduler, stream, heads=None,
    adapters=None, **extra,
) -> None:  # fmt: skip
    """A resume checkpoint; `extra` values (e.g. a KL controller's state) come back in the progress
    dict on resume."""
    progress = {"step": step, "stream": stream.position(), **extra}
    checkpoint.save_checkpoint(
        config.output_dir, step, model, optimizer, scheduler, progress, config.train.keep_last, heads,
        to_container(config), adapters,
    )  # fmt: skip


def end_of_step(
    config: StageConfig, step: int, total_steps: int, model, optimizer, scheduler, stream,
    heads=None, adapters=None, guard: NonFiniteGuard | None = None,
    signals: StopOnSignal | None = None, **extra,
) -> None:  # fmt: skip
    """What every training loop does after a step: save a resume checkpoint when one is due or a
    SIGINT/SIGTERM caught by `signals` asked to stop (then raise `Stopped`), and the "step-end"
    kill point. The arguments after `total_steps` are `save_resume_state`'s (the guard's count of
    skipped updates is saved with them)."""
    asked = signals.at_step_end(step, total_steps) if signals is not None else 0
    stop = distributed.agree(asked)  # every rank stops at the same step
    if stop or due(step, config.train.save_every, total_steps):
        if guard is not None:
            extra["skipped_updates"] = guard.skipped
        save_resume_state(
            config, step, model, optimizer, scheduler, stream, heads, adapters, **extra
        )
    if stop:
        raise Stopped(stop, step)
    files.kill_point("step-end")
