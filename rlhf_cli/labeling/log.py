"""The answer log beside `out` and `out` rebuilt from it: records, the rows of `out`, the lock.

Every answer is appended to the log `<out>.log.jsonl` and fsync'ed before the next item shows; then
`out` is rewritten from the log under a temporary name and renamed over the old one. So `out` is at
every moment a complete file that the next stage reads as it is (pairwise: preference pairs for
`rlhf reward` and `rlhf dpo`; binary: KTO rows for `rlhf kto`), and a SIGKILL at any moment loses at
most the answer being written. Undo appends an undo record; a restart replays the log. One session
at a time holds a lock on the log, and a log holds the answers of one mode.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import time
from pathlib import Path

from rlhf_cli.files import kill_point, write_jsonl_atomic
from rlhf_cli.labeling.items import Item, Response
from rlhf_cli.schema import LabelConfig, UserError

LOG_SUFFIX = ".log.jsonl"
KTO_KEYS = ("prompt", "completion", "label", "labeler")  # what rlhf kto reads, first in a row


def record_mode(record: dict) -> str:
    """pairwise | binary: the mode an answer was given in (pairwise records name none)."""
    return record.get("mode", "pairwise")


def out_row(record: dict, config: LabelConfig) -> dict | None:
    """The row of `out` for one answer, in its mode's format (None: not written, e.g. a skip)."""
    return kto_row(record) if record_mode(record) == "binary" else preference_row(record, config)


def preference_row(record: dict, config: LabelConfig) -> dict | None:
    """The row of `out` for one answer (None: a skip, or a tie with ties=drop). The first three
    columns (and margin) are what rlhf reward / rlhf dpo read; the others say where it came from."""
    answer = record["answer"]
    if answer == "skip" or (answer == "tie" and config.ties == "drop"):
        return None
    responses, candidates = record["responses"], record["candidates"]
    winner = record["winner"]
    first = 0 if winner is None else candidates.index(winner)
    row = {"prompt": record["prompt"], "chosen": responses[first], "rejected": responses[1 - first]}
    if answer == "tie":
        row["tie"] = True
    elif record.get("strength") is not None:
        row["margin"] = (record["strength"] - 1) * config.margin_scale
        row["strength"] = record["strength"]
    sources = record.get("sources") or [None, None]
    row |= {
        "labeler": record["labeler"],
        "answer": answer,
        "shown": record["shown"],  # candidate positions, left (A) first
        "item": record["item"],
        "source": {
            "file": record.get("file"),
            "id": record.get("row_id"),
            "candidates": candidates,
            "policies": sources,
        },
    }
    if sources[0] is not None and answer != "tie":
        row["chosen_policy"], row["rejected_policy"] = sources[first], sources[1 - first]
    for key in ("note", "judge", "scores"):
        if record.get(key) is not None:
            row[key] = record[key]
    row["time"] = record["time"]
    return row


def kto_row(record: dict) -> dict | None:
    """The KTO row of a good/bad answer (None: a skip): prompt, completion, label and labeler (what
    rlhf kto reads), the input row's other columns, then where it came from. A column named like
    one of ours (item, source, judge, score, note, time) gives way to it."""
    if record["answer"] == "skip":
        return None
    row = {
        "prompt": record["prompt"],
        "completion": record["completion"],
        "label": record["answer"] == "good",
        "labeler": record["labeler"],
    }
    row |= {k: v for k, v in record.get("columns", {}).items() if k not in KTO_KEYS}
    row |= {
        "item": record["item"],
        "source": {
            "file": record.get("file"),
            "id": record.get("row_id"),
            "candidate": record.get("candidate"),
            "policy": record.get("source"),
        },
    }
    for key in ("note", "judge", "score"):
        if record.get(key) is not None:
            row[key] = record[key]
    row["time"] = record["time"]
    return row


def replay(records: list[dict]) -> list[dict]:
    """The answers in force: every label record, less those an undo record took back (an undo
    takes back its labeller's latest answer to its item)."""
    active: list[dict] = []
    for record in records:
        if record.get("event") == "label":
            active.append(record)
        elif record.get("event") == "undo":
            for index in range(len(active) - 1, -1, -1):
                if (active[index]["labeler"], active[index]["item"]) == (
                    record["labeler"],
                    record["item"],
                ):
                    del active[index]
                    break
    return active


def read_log(path: Path, fd: int | None = None) -> list[dict]:
    """The records of a log. A last line cut short by a crash (no newline) is an answer that was
    never confirmed on screen: it is dropped (and, when `fd` is the open log, cut off the file)."""
    data = path.read_bytes() if path.exists() else b""
    complete, _, torn = data.rpartition(b"\n")
    if torn and fd is not None:
        os.ftruncate(fd, len(complete) + 1 if complete else 0)
        os.fsync(fd)
    records = []
    for number, line in enumerate(complete.split(b"\n") if complete else [], start=1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or record.get("event") not in ("label", "undo"):
                raise ValueError
        except ValueError:
            raise UserError(
                f"{path} line {number} is damaged (not a label record); it is rlhf label's record "
                "of every answer: restore it from a copy, or delete that line."
            ) from None
        records.append(record)
    return records


class AnswerLog:
    """The log beside `out` (held with a lock while open) and `out`, rebuilt from it."""

    def __init__(self, out: Path, config: LabelConfig):
        self.out, self.config = out, config
        self.path = out.with_name(out.name + LOG_SUFFIX)
        self.fd: int | None = None
        self.active: list[dict] = []

    def open(self) -> AnswerLog:
        if self.out.exists() and not self.path.exists():
            raise UserError(
                f"out={self.out} exists but has no answer log ({self.path.name}) beside it, so it "
                "was not written by rlhf label (or its log was moved); choose another out= rather "
                "than overwrite it."
            )
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise UserError(
                f"another rlhf label session is writing out={self.out} (its log is locked); let it "
                "finish, or label into another out= file."
            ) from None
        self.active = replay(read_log(self.path, self.fd))
        other = next((r for r in self.active if record_mode(r) != self.config.mode), None)
        if other is not None:
            self.close()
            raise UserError(
                f"{self.path.name} holds {record_mode(other)} answers and this is mode="
                f"{self.config.mode}; label into another out= (one file holds one kind of rows)."
            )
        for stale in self.out.parent.glob(f".{self.out.name}.tmp-*"):  # from a killed session
            stale.unlink(missing_ok=True)
        self.write_out()  # catches up with an answer logged just before a crash
        return self

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
            self.fd = None

    def __enter__(self) -> AnswerLog:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def commit(self, records: list[dict]) -> None:
        """Append records to the log (fsync'ed), then rewrite `out` from the answers in force."""
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        # Ctrl-C / SIGTERM wait until the answer is in both files (then they stop the session)
        # the mask to put back, read without changing it: a signal handled inside the call that
        # blocks (CPython runs pending handlers there) must find us already inside the try
        before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        try:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            written = 0
            while written < len(data):
                written += os.write(self.fd, data[written:])
            os.fsync(self.fd)
            kill_point("label-logged")
            self.active = replay([*self.active, *records])
            self.write_out()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)

    def write_out(self) -> None:
        rows = [out_row(record, self.config) for record in self.active]
        write_jsonl_atomic(self.out, [row for row in rows if row is not None])

    def mine(self, labeler: str) -> list[dict]:
        """This labeller's answers in force, oldest first (the last is what undo takes back)."""
        return [r for r in self.active if r["labeler"] == labeler]

    def rows_in_out(self) -> int:
        return sum(out_row(r, self.config) is not None for r in self.active)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def label_record(
    item: Item, labeler: str, shown: tuple[int, int], answer: str, file: Path, **extra
) -> dict:
    """One answer as the log keeps it: everything `out` needs, so `out` can always be rebuilt."""
    winner = {"A": shown[0], "B": shown[1]}.get(answer)
    return {
        "event": "label",
        "item": item.id,
        "labeler": labeler,
        "answer": answer,
        "shown": list(shown),
        "winner": winner,
        "candidates": list(item.candidates),
        "prompt": item.prompt,
        "responses": list(item.responses),
        "sources": list(item.sources) if item.sources[0] is not None else None,
        "file": str(file),
        "row_id": item.row_id,
        **extra,
        "time": now(),
    }


def response_record(item: Response, labeler: str, answer: str, file: Path, **extra) -> dict:
    """One good/bad/skip answer (binary mode) as the log keeps it: everything its KTO row needs."""
    return {
        "event": "label",
        "mode": "binary",
        "item": item.id,
        "labeler": labeler,
        "answer": answer,
        "prompt": item.prompt,
        "completion": item.response,
        "columns": item.columns,
        "candidate": item.candidate,
        "source": item.source,
        "file": str(file),
        "row_id": item.row_id,
        **extra,
        "time": now(),
    }
