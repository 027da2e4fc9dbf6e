"""Console output, metrics.jsonl, optional wandb or TensorBoard, and the sweep summary.

`Tracker.log(step, metrics)` appends one JSON object per logged step to metrics.jsonl (always),
prints a line (or updates the progress bar on a terminal) and forwards to wandb when
`logger=wandb`, or to TensorBoard event files in `<output_dir>/tensorboard/` when
`logger=tensorboard`. wandb and TensorBoard are imported only then. Nothing here ever logs
environment variables.
"""

from __future__ import annotations

import csv
import json
import math
import netrc
import os
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from rlhf_cli import distributed
from rlhf_cli.files import write_text_atomic
from rlhf_cli.schema import LoggerConfig, StageConfig, UserError

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"  # beside metrics.jsonl: `tensorboard --logdir <output_dir>`


def check_logger(logger: LoggerConfig) -> None:
    """Fail before any model loads when the chosen logger cannot work: TensorBoard is not
    installed, or online wandb logging has no API key to log in with."""
    check_tensorboard(logger)
    if (
        logger.backend != "wandb"
        or logger.wandb.mode != "online"
        or os.environ.get("WANDB_API_KEY")
    ):
        return
    try:
        has_login = netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        has_login = False
    if not has_login:
        raise UserError(
            "logger.wandb.mode=online needs a W&B API key: run `wandb login` or set WANDB_API_KEY, "
            "or use logger.wandb.mode=offline (sync later with `wandb sync`)."
        )


def check_tensorboard(logger: LoggerConfig) -> None:
    """logger=tensorboard needs the optional `tensorboard` package (torch's SummaryWriter)."""
    if logger.backend != "tensorboard":
        return
    try:
        import torch.utils.tensorboard  # noqa: F401 (raises ImportError without `tensorboard`)
    except ImportError:
        raise UserError(
            "logger=tensorboard needs the tensorboard package, which is not installed: "
            "run `pip install 'rlhf-cli[tensorboard]'` (or `pip install tensorboard`)."
        ) from None


def make_console() -> Console:
    """The console: long lines stay whole in log files; silent on every rank but 0."""
    return Console(stderr=False, highlight=False, soft_wrap=True, quiet=not distributed.is_main())


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.3e}" if abs(value) < 1e-3 or abs(value) >= 1e5 else f"{value:.4f}"
    return str(value)


class Tracker:
    """metrics.jsonl + console (+ wandb or TensorBoard). On resume, lines past the resumed step are
    dropped first, so the file reads as one uninterrupted run; TensorBoard does the same with
    `purge_step`: events of an earlier run at steps past the resumed one are hidden when read."""

    def __init__(
        self,
        output_dir: str,
        stage: str,
        logger: LoggerConfig,
        config: dict,
        run_name: str,
        total_steps: int,
        start_step: int = 0,
        console: Console | None = None,
    ):
        self.console = console or make_console()
        self.path = Path(output_dir) / METRICS_FILE
        self.wandb = None
        self.tensorboard = None
        self.step = start_step  # the last step logged: where tables go in TensorBoard
        main = distributed.is_main()  # rank 0 logs for all: the others log nowhere
        if main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._truncate_after(start_step)
            self.file = self.path.open("a", encoding="utf-8")
        else:
            self.file = open(os.devnull, "w")  # noqa: SIM115 (closed in finish)
        if main and logger.backend == "wandb" and logger.wandb.mode != "disabled":
            import wandb

            self.wandb = wandb.init(
                project=logger.wandb.project,
                entity=logger.wandb.entity,
                name=logger.wandb.name or run_name,
                mode=logger.wandb.mode,
                dir=output_dir,
                config=config,
                tags=list(logger.wandb.tags),
                resume="allow",
                id=run_name.replace("/", "_"),
            )
        if main and logger.backend == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            # purge_step mirrors _truncate_after: steps > start_step from an earlier run are
            # dropped when TensorBoard reads the folder, so a resumed run reads as one run
            self.tensorboard = SummaryWriter(
                str(Path(output_dir) / TENSORBOARD_DIR), purge_step=start_step + 1, flush_secs=10
            )
        self.progress = Progress(
            TextColumn(f"[bold]{stage}[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.console.is_terminal,
            transient=False,
        )
        self.task = self.progress.add_task(stage, total=total_steps, completed=start_step, info="")
        self.progress.start()

    def _truncate_after(self, step: int) -> None:
        kept = [
            record for record in read_metrics(self.path.parent) if record.get("step", 0) <= step
        ]
        write_text_atomic(self.path, "".join(json.dumps(record) + "\n" for record in kept))

    def log(self, step: int, metrics: dict[str, Any], show: bool = True) -> None:
        if _cuda_in_use():
            # the process's peak tensor memory so far (the allocator's cache not counted)
            metrics = {**metrics, "perf/peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        self.step = step
        if self.tensorboard is not None:
            # every number under its own name; NaN/inf are logged too (as metrics.jsonl keeps them)
            for name, value in metrics.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(name, value, global_step=step)
        if not show:
            return
        text = "  ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
        if self.console.is_terminal:
            self.progress.update(self.task, completed=step, info=_short(metrics))
            self.progress.console.print(f"step {step}  {text}", style="dim")
        else:
            self.console.print(f"step {step}  {text}")

    def table(self, title: str, columns: list[str], rows: list[list[str]]) -> None:
        table = Table(title=title, show_lines=True)
        for column in columns:
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(*row)
        self.console.print(table)
        if self.wandb is not None:
            import wandb

            self.wandb.log({title: wandb.Table(columns=columns, data=rows)})
        if self.tensorboard is not None:
            self.tensorboard.add_text(title, _markdown_table(columns, rows), global_step=self.step)

    def finish(self) -> None:
        self.progress.stop()
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()  # flushes the event file
            self.tensorboard = None
        if self.wandb is not None:
            self.wandb.finish()  # a sweep runs its jobs in one process: close before the next
            self.wandb = None


class Stopwatch:
    """Seconds spent in each named part of a step, for `perf/<name>_s` metrics:

        watch = Stopwatch()
        with watch("generate"):
            ...
        metrics |= watch.metrics()

    On CUDA the clock stops after the queued kernels finish, so a part's time is its own."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str):
        _sync()
        started = time.perf_counter()
        try:
            yield
        finally:
            _sync()
            self.seconds[name] += time.perf_counter() - started

    def metrics(self) -> dict[str, float]:
        return {f"perf/{name}_s": seconds for name, seconds in self.seconds.items()}


def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _sync() -> None:
    if _cuda_in_use():
        torch.cuda.synchronize()


def _markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    """A table as Markdown, which TensorBoard's Text tab renders as a table."""

    def cell(text: Any) -> str:
        return str(text).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _short(metrics: dict[str, Any]) -> str:
    keys = [k for k in ("loss", "eval/loss", "lr") if k in metrics]
    return " ".join(f"{k}={_fmt(metrics[k])}" for k in keys)


def _job_overrides(job: Path) -> list[str]:
    """The overrides Hydra recorded for one job of a sweep."""
    from omegaconf import OmegaConf

    return [str(o) for o in OmegaConf.load(job / ".hydra" / "overrides.yaml")]


def _job_metrics(job: Path) -> dict | None:
    """The final metrics a job in another process recorded as it ended; None: it did not finish
    (it failed, was killed, or is still running)."""
    try:
        result = json.loads((job / ".hydra" / JOB_RESULT).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return result["metrics"] if result.get("status") == "done" else None


def read_metrics(output_dir: str | Path) -> list[dict]:
    """The records of metrics.jsonl; a line cut short by a crash is skipped."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


JOB_RESULT = "job_result.json"  # in a sweep job's .hydra/: {"status": "done", "metrics": {...}}


def record_job_result(output_dir: str, final_metrics: dict | None) -> None:
    """How a sweep job ended: its final metrics (a training stage's final/, an eval.json, a
    sample's pairs file), or None when it stopped on bad input. It goes to the job's
    .hydra/job_result.json, in the process that ran it, where the sweep's summary reads it
    whichever process (or machine) ran the job."""
    job = Path(output_dir)
    if (job / ".hydra").is_dir() and distributed.is_main():
        status = "done" if final_metrics is not None else "failed"
        write_text_atomic(
            job / ".hydra" / JOB_RESULT,
            json.dumps({"status": status, "metrics": final_metrics or {}}),
        )


class SweepSummary(Callback):
    """After a multirun: one row per job (its overrides, how it ended and its final metrics) as a
    rich table and as sweep_summary.csv in the sweep folder. Every stage's finished job (sft,
    reward, dpo, ppo, eval, sample) wrote its .hydra/job_result.json in the process that ran it
    (`record_job_result`), so jobs that a launcher ran elsewhere (launcher=local, launcher=slurm)
    are read back the same way. A job stopped by bad input leaves no folder, so it is known here
    only when it ran in this process. When any job did not finish, the command exits 2 after the
    summary (the other jobs ran)."""

    def __init__(self) -> None:
        self.jobs: dict[str, list[str]] = {}  # job folder -> its overrides, as jobs end here

    def on_job_end(self, config, job_return, **kwargs: Any) -> None:
        job = Path(job_return.hydra_cfg.hydra.runtime.output_dir).resolve()
        self.jobs[str(job)] = list(job_return.overrides or [])

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        for job in sweep_dir.resolve().glob("*"):
            if job.name.isdigit() and (job / ".hydra").is_dir() and str(job) not in self.jobs:
                self.jobs[str(job)] = _job_overrides(job)
        if not self.jobs:
            return
        results = {job: _job_metrics(Path(job)) for job in self.jobs}
        jobs = sorted((Path(d) for d in self.jobs), key=lambda d: (len(d.name), d.name))
        settings = [
            dict(o.lstrip("+").split("=", 1) for o in self.jobs[str(job)] if "=" in o)
            for job in jobs
        ]
        swept = [
            k
            for k in dict.fromkeys(k for s in settings for k in s)
            if len({s.get(k) for s in settings}) > 1
        ]
        rows = []
        for job, setting in zip(jobs, settings, strict=True):
            metrics = results[str(job)]
            rows.append(
                {
                    "job": job.name,
                    **{k: setting.get(k, "") for k in swept},
                    "status": "done" if metrics is not None else "failed",
                    **(metrics or {}),
                }
            )
        columns = list(dict.fromkeys(key for row in rows for key in row))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        with (sweep_dir / "sweep_summary.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        table = Table(title=f"sweep summary ({sweep_dir / 'sweep_summary.csv'})")
        for column in columns:
            table.add_column(column)
        for row in rows:
            table.add_row(*[_fmt(row.get(c, "")) for c in columns])
        make_console().print(table)
        failed = [row["job"] for row in rows if row["status"] == "failed"]
        if failed and distributed.is_main():  # the command's exit code says it, as for one run
            print(f"rlhf: error: {len(failed)} of {len(rows)} sweep jobs did not finish (jobs "
                  f"{', '.join(failed)}; each said why above); the others ran.", file=sys.stderr,
                  flush=True)  # fmt: skip
            sys.exit(2)


def run_name(stage: str, config: StageConfig) -> str:
    """{stage}__{model}__{seed}__{time}, as CleanRL names runs."""
    model = Path(config.model.name_or_path.replace(":", "-")).name
    return f"{stage}__{model}__{config.seed}__{int(time.time())}"
