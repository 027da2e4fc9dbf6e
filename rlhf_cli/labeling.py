"""`rlhf label`: preference pairs from a person at a terminal, or from a judge function.

    rlhf label in=pairs.jsonl out=prefs.jsonl labeler=alice            # keys: a b t s u q
    rlhf label in=pairs.jsonl out=prefs.jsonl strength=true notes=true  # + 1-7 strength, a note
    rlhf label in=pairs.jsonl out=prefs.jsonl judge=my_judges:shorter   # no terminal needed
    rlhf label --stats out=prefs.jsonl                                  # agreement, position bias

`in` is what `rlhf sample` writes: one row per prompt with two or more candidate responses. An item
is two candidates of one row (`pairs=all`: every pair, across the two policies of an A/B file;
`pairs=first`: one per row), shown side by side in an order drawn per labeller and item and recorded.

Files. Every answer is appended to the log `<out>.log.jsonl` and fsync'ed before the next item
shows; then `out` is rewritten from the log under a temporary name and renamed over the old one.
So `out` is at every moment a complete preference file that `rlhf reward` and `rlhf dpo` read as it
is (prompt, chosen, rejected, margin with strength=true, and columns they ignore), and a SIGKILL at
any moment loses at most the answer being written. Undo appends an undo record. A restart replays
the log (it is the record; `out` is rebuilt from it) and continues with the first item this
labeller has not answered. One session at a time holds a lock on the log.
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import json
import math
import os
import random
import select
import shlex
import signal
import sys
import termios
import time
import tty
from collections import Counter, defaultdict
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from rlhf_cli.files import (
    WRITE_ERRNOS,
    WRITE_EXIT,
    check_out_file,
    kill_point,
    read_jsonl,
    write_jsonl_atomic,
)
from rlhf_cli.schema import USER_CODE_EXIT, LabelConfig, UserCodeError, UserError

LOG_SUFFIX = ".log.jsonl"
ANSWER_OF_KEY = {"a": "A", "b": "B", "t": "tie", "s": "skip"}


# ---------------------------------------------------------------- files
# ---------------------------------------------------------------- the pairs file -> items
@dataclass
class Item:
    """Two candidate responses to one prompt, in the pairs file's order."""

    id: str  # a hash of the prompt and the two responses
    prompt: str | list[dict]
    responses: tuple[str, str]
    candidates: tuple[int, int]  # their positions in the row's candidate list
    sources: tuple[str | None, str | None]  # the policy each came from (a / b in A/B files)
    columns: dict  # the row's other columns, for judges
    row_id: Any  # the row's `id`, else its line number

    def text_of(self, candidate: int) -> str:
        return self.responses[self.candidates.index(candidate)]


def item_id(prompt: Any, first: str, second: str) -> str:
    text = json.dumps([prompt, first, second], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _is_prompt(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in value
        )
    )


def _candidates(row: dict, where: str) -> list[tuple[str, str | None]]:
    """[(text, source)] of a row: strings, or objects with a string `text` (and `source`)."""
    found = row.get("candidates")
    if not isinstance(found, list):
        raise UserError(
            f"{where} has no `candidates` list; each row needs a `prompt` and two or more "
            "`candidates` (the file rlhf sample writes)."
        )
    if len(found) < 2:
        raise UserError(
            f"{where} has {len(found)} candidate(s); rlhf label compares two responses to the same "
            "prompt, so every row needs at least 2 (rlhf sample n=2 writes them)."
        )
    out = []
    for index, candidate in enumerate(found):
        text = candidate.get("text") if isinstance(candidate, dict) else candidate
        if not isinstance(text, str):
            raise UserError(
                f"{where} candidate {index} is not text nor an object with a `text` string."
            )
        source = candidate.get("source") if isinstance(candidate, dict) else None
        out.append((text.strip(), None if source is None else str(source)))
    return out


@dataclass
class ItemCounts:
    rows: int = 0
    items: int = 0
    same: int = 0  # pairs left out: the two responses are identical
    empty: int = 0  # pairs left out: a response is empty (no preference file may hold one)

    def summary(self) -> str:
        left_out = (
            f"; left out: {self.same} pairs of identical responses, {self.empty} with an empty one"
        )
        return f"{self.items} items from {self.rows} rows" + (
            left_out if self.same or self.empty else ""
        )


def candidate_pairs(sources: list[str | None], pairs: str) -> list[tuple[int, int]]:
    """The (i, j) candidate positions a row's items compare: every pair, or, when the candidates
    come from two policies (A/B), every pair across them; `first`: only the first of those."""
    mixed = len(set(sources)) > 1
    found = [
        (i, j)
        for i in range(len(sources))
        for j in range(i + 1, len(sources))
        if not mixed or sources[i] != sources[j]
    ]
    return found[:1] if pairs == "first" else found


def load_items(path: Path, pairs: str) -> tuple[list[Item], ItemCounts]:
    """The items of a pairs file. `pairs=all`: every pair of candidates (across sources when the
    row has two); `first`: the first such pair. Pairs of identical or empty responses are left out
    (counted): the first teaches nothing, and preference files may not hold an empty response."""
    if not path.is_file():
        raise UserError(
            f"in={path} does not exist; give the pairs file that rlhf sample wrote (rlhf sample "
            "out=pairs.jsonl)."
        )
    counts, items, seen = ItemCounts(), [], set()
    for number, row in read_jsonl(path):
        where = f"{path} line {number}"
        counts.rows += 1
        prompt = row.get("prompt")
        if not _is_prompt(prompt):
            raise UserError(
                f"{where}: `prompt` must be non-empty text or a list of {{role, content}} messages."
            )
        candidates = _candidates(row, where)
        columns = {
            k: v
            for k, v in row.items()
            if k not in ("prompt", "candidates", "columns", "provenance", "id")
        }
        if isinstance(row.get("columns"), dict):
            columns |= row["columns"]
        for i, j in candidate_pairs([source for _, source in candidates], pairs):
            (first, source_i), (second, source_j) = candidates[i], candidates[j]
            if not first or not second:
                counts.empty += 1
            elif first == second:
                counts.same += 1
            elif (key := item_id(prompt, first, second)) not in seen:
                seen.add(key)
                items.append(
                    Item(
                        id=key,
                        prompt=prompt,
                        responses=(first, second),
                        candidates=(i, j),
                        sources=(source_i, source_j),
                        columns=columns,
                        row_id=row.get("id", number),
                    )
                )
    if counts.rows == 0:
        raise UserError(f"in={path} holds no rows; give the pairs file that rlhf sample wrote.")
    counts.items = len(items)
    if not items:
        raise UserError(
            f"in={path} has no pair of two different, non-empty responses to compare "
            f"({counts.same} identical, {counts.empty} with an empty response); sample at a higher "
            "temperature or with more max_new_tokens."
        )
    return items, counts


# ---------------------------------------------------------------- the log and the preference file
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
        rows = [preference_row(record, self.config) for record in self.active]
        write_jsonl_atomic(self.out, [row for row in rows if row is not None])

    def mine(self, labeler: str) -> list[dict]:
        """This labeller's answers in force, oldest first (the last is what undo takes back)."""
        return [r for r in self.active if r["labeler"] == labeler]

    def pairs_in_out(self) -> int:
        return sum(preference_row(r, self.config) is not None for r in self.active)


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


def shown_order(item: Item, labeler: str, seed: int) -> tuple[int, int]:
    """Which candidate is shown on the left (as A): drawn from (seed, labeller, item), so a restart
    shows an item the same way and two labellers see it independently."""
    first, second = item.candidates
    swap = random.Random(f"{seed}:{labeler}:{item.id}").random() < 0.5
    return (second, first) if swap else (first, second)


# ---------------------------------------------------------------- the screen
KEYS_HELP = "[a] A is better   [b] B is better   [t] tie   [s] skip   [u] undo   [q] quit"
STRENGTH_HELP = (
    "How much better is {side}?  [1] slightly ... [7] far better   [Enter] no strength   [Esc] back"
)


def _prompt_text(prompt: str | list[dict]):
    from rich.text import Text

    if isinstance(prompt, str):
        return Text(prompt)
    text = Text()
    for index, message in enumerate(prompt):
        text.append(("\n" if index else "") + f"{message['role']}: ", style="bold dim")
        text.append(message["content"])
    return text


def screen(
    item: Item,
    shown: tuple[int, int],
    done: int,
    total: int,
    skipped: int,
    labeler: str,
    out: Path,
    footer: str = KEYS_HELP,
    message: str = "",
):
    """What the labeller shows for one item: the prompt, the two responses side by side (left: A),
    the keys and a progress bar."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    header = Text.assemble(
        ("rlhf label", "bold"), f"   item {done + 1} of {total}   labeller: {labeler}   out: {out}"
    )
    sides = Table.grid(expand=True, padding=(0, 1))
    sides.add_column(ratio=1)
    sides.add_column(ratio=1)
    sides.add_row(
        *(
            Panel(
                Text(item.text_of(c)),
                title=f"[bold]{side}[/]",
                title_align="left",
                border_style=colour,
            )
            for side, c, colour in (("A", shown[0], "green"), ("B", shown[1], "magenta"))
        )
    )
    bar = Table.grid(padding=(0, 1))
    bar.add_row(
        ProgressBar(total=total, completed=done, width=40),
        Text(f"{done}/{total} answered, {skipped} skipped, {total - done} to go", style="dim"),
    )
    parts = [header]
    if message:
        parts.append(Text(message, style="yellow"))
    parts += [
        Panel(_prompt_text(item.prompt), title="prompt", title_align="left", border_style="cyan"),
        sides,
        Text(footer, style="bold"),
        bar,
    ]
    return Group(*parts)


# ---------------------------------------------------------------- keys from the terminal
class Keys:
    """Single keypresses from the terminal on stdin, in cbreak mode (no echo, no line editing;
    Ctrl-C still interrupts). The terminal's settings are put back on leaving."""

    def __init__(self, fd: int = 0):
        self.fd, self.saved = fd, None

    def __enter__(self) -> Keys:
        self.saved = termios.tcgetattr(self.fd)
        tty.setcbreak(self.fd, termios.TCSANOW)  # TCSANOW: keys typed ahead are kept
        return self

    def __exit__(self, *exc) -> None:
        termios.tcsetattr(self.fd, termios.TCSANOW, self.saved)

    def read(self) -> str:
        """One key: a character, or 'enter', 'esc', 'backspace', 'eof'; '' for keys that mean
        nothing here (arrows and other escape sequences)."""
        first = os.read(self.fd, 1)
        if not first or first == b"\x04":
            return "eof"
        if first == b"\x1b":
            if not select.select([self.fd], [], [], 0.05)[0]:
                return "esc"
            while select.select([self.fd], [], [], 0.01)[0]:  # the rest of an escape sequence
                os.read(self.fd, 64)
            return ""
        if first in (b"\r", b"\n"):
            return "enter"
        if first in (b"\x7f", b"\x08"):
            return "backspace"
        data = first
        while True:  # a UTF-8 character may take several bytes
            try:
                return data.decode("utf-8")
            except UnicodeDecodeError:
                if len(data) >= 4:
                    return ""
                data += os.read(self.fd, 1)


class Session:
    """One labeller at the terminal, through the items of a pairs file."""

    def __init__(
        self,
        config: LabelConfig,
        items: list[Item],
        log: AnswerLog,
        labeler: str,
        source: Path,
        console,
        keys: Keys,
    ):
        self.config, self.log, self.labeler, self.source = config, log, labeler, source
        self.console, self.keys = console, keys
        self.items = {item.id: item for item in items}
        done = {r["item"] for r in log.mine(labeler)}
        self.queue = [item for item in items if item.id not in done]
        self.answered = Counter()  # this session's answers

    def progress(self) -> tuple[int, int]:
        """(items of this file answered, of them skipped) by this labeller."""
        mine = [r for r in self.log.mine(self.labeler) if r["item"] in self.items]
        return len(mine), sum(r["answer"] == "skip" for r in mine)

    def show(self, item: Item, shown: tuple[int, int], footer: str = KEYS_HELP, message: str = ""):
        done, skipped = self.progress()
        self.console.clear()
        self.console.print(
            screen(
                item,
                shown,
                done,
                len(self.items),
                skipped,
                self.labeler,
                self.log.out,
                footer,
                message,
            )
        )

    def run(self) -> None:
        message = ""
        while self.queue:
            item = self.queue[0]
            shown = shown_order(item, self.labeler, self.config.seed)
            self.show(item, shown, message=message)
            message = ""
            key = self.keys.read().lower()
            if key in ("q", "eof"):
                return
            if key == "u":
                message = self.undo()
            elif key in ANSWER_OF_KEY:
                extra = self.details(item, shown, ANSWER_OF_KEY[key])
                if extra is not None:
                    self.log.commit(
                        [
                            label_record(
                                item, self.labeler, shown, ANSWER_OF_KEY[key], self.source, **extra
                            )
                        ]
                    )
                    self.answered[ANSWER_OF_KEY[key]] += 1
                    self.queue.pop(0)

    def details(self, item: Item, shown: tuple[int, int], answer: str) -> dict | None:
        """The optional strength (after A or B) and note; None: Esc, back to the choice."""
        extra: dict[str, Any] = {}
        if self.config.strength and answer in ("A", "B"):
            self.show(item, shown, STRENGTH_HELP.format(side=answer))
            while True:
                key = self.keys.read()
                if key == "esc":
                    return None
                if key == "enter" or (len(key) == 1 and key in "1234567"):
                    extra["strength"] = int(key) if key != "enter" else None
                    break
        if self.config.notes and answer != "skip":
            note = self.read_line("note (Enter: done, empty: none, Esc: back): ")
            if note is None:
                return None
            extra["note"] = note or None
        return extra

    def read_line(self, prompt: str) -> str | None:
        """A line typed in cbreak mode (Backspace edits); None on Esc."""
        write = self.console.file.write
        write(prompt)
        self.console.file.flush()
        chars: list[str] = []
        while True:
            key = self.keys.read()
            if key == "enter":
                write("\n")
                return "".join(chars).strip()
            if key == "esc":
                return None
            if key == "backspace" and chars:
                chars.pop()
                write("\b \b")
            elif len(key) == 1 and key.isprintable():
                chars.append(key)
                write(key)
            self.console.file.flush()

    def undo(self) -> str:
        """Take back this labeller's latest answer (this session's or an earlier one's) and show its
        item again."""
        mine = self.log.mine(self.labeler)
        if not mine:
            return "nothing to undo"
        last = mine[-1]
        self.log.commit(
            [{"event": "undo", "item": last["item"], "labeler": self.labeler, "time": now()}]
        )
        self.answered["undo"] += 1
        item = self.items.get(last["item"])
        if item is None:
            return f"undid an answer ({last['answer']}) to an item of {last.get('file')}"
        self.queue.insert(0, item)
        return f"undid your answer to this item ({last['answer']})"


# ---------------------------------------------------------------- a judge instead of a person
def load_judge(spec: str, items: list[Item], source: Path):
    """The judge function, checked: importable, and the row columns it names are there."""
    from rlhf_cli.scoring import ProgrammaticReward

    judge = ProgrammaticReward(spec, "judge")
    judge.check_columns(items[0].columns, str(source))
    return judge


def judge_items(
    config: LabelConfig,
    judge,
    items: list[Item],
    log: AnswerLog,
    labeler: str,
    source: Path,
    console,
) -> Counter:
    """Score both responses of every item this judge has not answered with the judge function
    (prompts, responses, [row columns]) -> floats; the higher one wins, equal scores tie. Batches
    of `batch_size` items, each committed as it is scored."""
    done = {r["item"] for r in log.mine(labeler)}
    todo = [item for item in items if item.id not in done]
    answered: Counter = Counter()
    for start in range(0, len(todo), config.batch_size):
        batch = todo[start : start + config.batch_size]
        scores = judge.score(
            [item.prompt for item in batch for _ in range(2)],
            [text for item in batch for text in item.responses],
            [item.columns for item in batch for _ in range(2)],
        )
        records = []
        for index, item in enumerate(batch):
            first, second = scores[2 * index], scores[2 * index + 1]
            answer = "A" if first > second else "B" if second > first else "tie"
            records.append(
                label_record(
                    item,
                    labeler,
                    item.candidates,
                    answer,
                    source,
                    judge=config.judge,
                    scores=[first, second],
                )
            )
            answered[answer] += 1
        log.commit(records)
        console.print(f"judged {start + len(batch)} of {len(todo)} items", soft_wrap=True)
    return answered


# ---------------------------------------------------------------- agreement and position bias
def cohen_kappa(first: list, second: list) -> float | None:
    """Cohen's kappa of two labellers' answers to the same items (aligned lists): (p_o - p_e) /
    (1 - p_e). None when p_e = 1 (both gave one and the same answer throughout: undefined)."""
    n = len(first)
    observed = sum(a == b for a, b in zip(first, second, strict=True)) / n
    counts_a, counts_b = Counter(first), Counter(second)
    expected = sum(counts_a[c] * counts_b[c] for c in counts_a) / (n * n)
    return None if expected >= 1 else (observed - expected) / (1 - expected)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def stats_records(paths: list[Path]) -> list[dict]:
    """The answers in force in one or more preference files: from each one's log when it is beside
    it (ties and skips included), else from its rows. A labeller's later answer to an item wins."""
    answers: dict[tuple[str, str], dict] = {}
    for path in paths:
        log = path.with_name(path.name + LOG_SUFFIX)
        if log.exists():
            records = replay(read_log(log))
        elif path.is_file():
            records = [_record_of_row(row, f"{path} line {n}") for n, row in read_jsonl(path)]
        else:
            raise UserError(f"out={path} does not exist; give a file rlhf label wrote.")
        for record in records:
            answers[record["labeler"], record["item"]] = record
    return list(answers.values())


def _record_of_row(row: dict, where: str) -> dict:
    """A row of `out` as the answer it records (the stats of a file whose log was not kept)."""
    if not all(key in row for key in ("labeler", "item", "answer", "shown")):
        raise UserError(
            f"{where} lacks the labeller, item, answer and shown columns of rlhf label's rows, and no "
            "log is beside the file; give a file rlhf label wrote."
        )
    winner = {"A": row["shown"][0], "B": row["shown"][1]}.get(row["answer"])
    policies = (row.get("source") or {}).get("policies")
    return {
        "labeler": row["labeler"],
        "item": row["item"],
        "answer": row["answer"],
        "shown": row["shown"],
        "winner": winner,
        "judge": row.get("judge"),
        "candidates": (row.get("source") or {}).get("candidates"),
        "sources": policies,
    }


def agreement(records: list[dict]) -> list[tuple[str, str, int, float, float | None]]:
    """(labeller, labeller, shared items, share of equal answers, Cohen's kappa) for every pair of
    labellers that answered some item both (skips left out). An answer is the candidate that won,
    or a tie, so the sides each saw do not matter."""
    by_labeler: dict[str, dict[str, Any]] = defaultdict(dict)
    for record in records:
        if record["answer"] != "skip":
            by_labeler[record["labeler"]][record["item"]] = record["winner"]
    names = sorted(by_labeler)
    rows = []
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            shared = sorted(set(by_labeler[first]) & set(by_labeler[second]))
            if shared:
                a = [by_labeler[first][item] for item in shared]
                b = [by_labeler[second][item] for item in shared]
                equal = sum(x == y for x, y in zip(a, b, strict=True)) / len(shared)
                rows.append((first, second, len(shared), equal, cohen_kappa(a, b)))
    return rows


def position_bias(records: list[dict]) -> tuple[int, int]:
    """(answers that picked the response shown on the left, answers that picked a side) over the
    non-tie, non-skip answers of people (a judge sees no sides)."""
    sided = [r for r in records if r["answer"] in ("A", "B") and not r.get("judge")]
    return sum(r["answer"] == "A" for r in sided), len(sided)


def print_stats(paths: list[Path], console) -> None:
    from rich.table import Table

    records = stats_records(paths)
    if not records:
        console.print(f"{', '.join(map(str, paths))}: no answers yet.")
        return
    labelers = sorted({r["labeler"] for r in records})
    console.print(
        f"{', '.join(map(str, paths))}: {len(records)} answers by {len(labelers)} "
        f"labeller(s) on {len({r['item'] for r in records})} items"
    )
    table = Table(title="answers", title_justify="left")
    table.add_column("labeller", no_wrap=True)
    for column in ("answers", "A better", "B better", "tie", "skip", "picked the left side"):
        table.add_column(column, justify="right")
    for name in labelers:
        mine = [r for r in records if r["labeler"] == name]
        counts = Counter(r["answer"] for r in mine)
        left, sided = position_bias(mine)
        table.add_row(
            name,
            str(len(mine)),
            *(str(counts[a]) for a in ("A", "B", "tie", "skip")),
            _share(left, sided) if not any(r.get("judge") for r in mine) else "- (a judge)",
        )
    console.print(table)
    left, sided = position_bias(records)
    if sided:
        console.print(
            f"position bias (people): the response shown on the left was picked in "
            f"{_share(left, sided)} answers that picked a side (no bias: 50%)"
        )
    pairs = agreement(records)
    if pairs:
        table = Table(title="agreement on shared items (skips left out)", title_justify="left")
        table.add_column("labellers", no_wrap=True)
        for column in ("shared items", "same answer", "Cohen's kappa"):
            table.add_column(column, justify="right")
        for first, second, shared, equal, kappa in pairs:
            shown = "undefined (one answer throughout)" if kappa is None else f"{kappa:.3f}"
            table.add_row(f"{first} ~ {second}", str(shared), f"{equal:.0%}", shown)
        console.print(table)
        kappas = [k for *_, k in pairs if k is not None]
        if kappas:
            console.print(
                f"mean Cohen's kappa over {len(kappas)} pair(s) of labellers: "
                f"{sum(kappas) / len(kappas):.3f}"
            )
    else:
        console.print("agreement: no item was answered by two labellers")
    _print_ab(records, console)


def _share(part: int, whole: int) -> str:
    if not whole:
        return "0 of 0"
    low, high = wilson_interval(part, whole)
    return f"{part} of {whole} ({part / whole:.0%}, 95% interval {low:.0%}-{high:.0%})"


def _print_ab(records: list[dict], console) -> None:
    """A/B files: how often each policy's response won."""
    wins: Counter = Counter()
    ties = 0
    for record in records:
        sources = record.get("sources")
        if not sources or sources[0] == sources[1] or record["answer"] == "skip":
            continue
        wins.update({name: 0 for name in sources})  # every policy is listed, winner or not
        if record["winner"] is None:
            ties += 1
        else:
            wins[sources[record["candidates"].index(record["winner"])]] += 1
    decided = sum(wins.values())
    if decided or ties:
        parts = [
            f"{name} preferred {_share(count, decided)}" for name, count in sorted(wins.items())
        ]
        console.print(f"A/B: {'; '.join(parts)}; {ties} ties")


# ---------------------------------------------------------------- the command
USAGE = """usage: rlhf label in=PAIRS.jsonl out=PREFS.jsonl [labeler=NAME] [strength=true] [notes=true] [key=value ...]
       rlhf label in=PAIRS.jsonl out=PREFS.jsonl judge=package.module:function
       rlhf label --stats out=PREFS.jsonl[,MORE.jsonl ...]
       rlhf label --cfg job [key=value ...]   # print the settings and exit

keys: a (A is better), b (B is better), t (tie), s (skip), u (undo), q (quit); Ctrl-C quits too.
Every answer is saved as it is given; the same command continues where you stopped."""


def _defaults_file() -> Path:
    return Path(str(resources.files("rlhf_cli.configs"))) / "label.yaml"


def parse_command_line(argv: list[str]) -> tuple[set[str], LabelConfig, list[Path]]:
    """-> (flags, typed config, the files --stats reads). key=value and config=FILE work as for the
    stages (the same override syntax and typed checks), without Hydra running anything."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from rlhf_cli.cli.args import build_overrides
    from rlhf_cli.schema import build_config

    flags, words, config_file = set(), [], None
    for index, arg in enumerate(argv):
        if arg.startswith("-"):
            if arg not in ("--stats", "--help", "-h", "--cfg"):
                raise UserError(
                    f"rlhf label has no flag {arg}; it takes --stats, --cfg job and --help."
                )
            flags.add(arg)
        elif arg.startswith("config="):
            config_file = arg.split("=", 1)[1]
        elif "=" in arg:
            words.append(arg)
        elif not (arg == "job" and argv[index - 1 : index] == ["--cfg"]):
            raise UserError(
                f"{arg!r} is not key=value; e.g. rlhf label in=pairs.jsonl out=prefs.jsonl."
            )
    cfg = OmegaConf.load(_defaults_file())
    stats_files: list[str] = []
    try:
        parsed = OverridesParser.create().parse_overrides(build_overrides(config_file, words, {}))
    except UserError:
        raise
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"could not parse the command line: {first}.") from None
    for override in parsed:
        key = override.key_or_group
        if override.is_sweep_override():
            if key == "out" and "--stats" in flags:  # several labellers' files
                stats_files = list(override.sweep_string_iterator())
                OmegaConf.update(cfg, key, stats_files[0], force_add=True)
                continue
            raise UserError(
                f"{override.input_line.lstrip('+')} lists several values; rlhf label takes one per "
                "key (quote a value that contains commas)."
            )
        if override.is_delete():
            raise UserError(
                f"{override.input_line}: rlhf label cannot delete keys; set them instead."
            )
        OmegaConf.update(cfg, key, override.value(), merge=True, force_add=True)
    config: LabelConfig = build_config("label", cfg)  # type: ignore[assignment]
    return flags, config, [Path(f) for f in stats_files or ([config.out] if config.out else [])]


def default_labeler(config: LabelConfig) -> str:
    if config.labeler:
        return config.labeler
    if config.judge:
        return f"judge:{config.judge}"
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "anonymous"


def label(config: LabelConfig, console, argv: list[str]) -> int:
    """Label the items of `in` into `out` (at the terminal, or with the judge). -> exit code.
    `argv`: the command line, for the command that continues."""
    if config.judge is None and not os.isatty(0):
        raise UserError(
            "stdin is not a terminal, so nobody can press keys: run rlhf label in a terminal, or give "
            "judge=package.module:function to label without one."
        )
    if not config.in_ or not config.out:
        raise UserError(
            "give in=<the pairs file from rlhf sample> and out=<the preference file to write>, e.g. "
            "rlhf label in=pairs.jsonl out=prefs.jsonl."
        )
    source, out = Path(config.in_), Path(config.out)
    if source.absolute() == out.absolute():
        raise UserError(f"in and out are the same file ({source}); give another out=.")
    items, counts = load_items(source, config.pairs)
    judge = load_judge(config.judge, items, source) if config.judge else None
    check_out_file(out, "out", None)
    labeler = default_labeler(config)
    answered: Counter = Counter()
    interrupted = None
    # Ctrl-C and SIGTERM end a session with every answer saved, whatever the parent process left
    # behind (an ignored SIGINT survives exec; a blocked one too): our handler, neither blocked
    stops = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.getsignal(signum) for signum in stops}
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])  # read only
    try:
        for signum in stops:
            signal.signal(signum, _raise_interrupt)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)  # a pending Ctrl-C is raised here
        with AnswerLog(out, config) as log:
            try:
                if config.judge:
                    console.print(
                        f"{source}: {counts.summary()}; judge: {config.judge}", soft_wrap=True
                    )
                    answered = judge_items(config, judge, items, log, labeler, source, console)
                else:
                    with Keys() as keys:
                        session = Session(config, items, log, labeler, source, console, keys)
                        try:
                            session.run()
                        finally:
                            answered = session.answered
            except KeyboardInterrupt as stop:
                interrupted = stop.args[0] if stop.args else signal.SIGINT
            left = sum(item.id not in {r["item"] for r in log.mine(labeler)} for item in items)
            console.print(
                summary(answered, log, labeler, left, len(items), source, out, argv), soft_wrap=True
            )
    except OSError as err:
        if err.errno not in WRITE_ERRNOS:
            raise
        raise WriteFailed(
            f"could not write {err.filename or out} ({err.strerror}); every answer "
            f"before it is in {out.name}{LOG_SUFFIX}: free space or fix the "
            "permissions, then run the same command to continue."
        ) from None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
    return 128 + int(interrupted) if interrupted is not None else 0


class WriteFailed(Exception):
    """A write failed (disk full, permissions): exit code 4, as for the training stages."""


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(signum)


def summary(
    answered: Counter,
    log: AnswerLog,
    labeler: str,
    left: int,
    total: int,
    source: Path,
    out: Path,
    argv: list[str],
) -> str:
    """The line a session ends with: what was answered, what is left and how to go on."""
    names = ("A", "B", "tie", "skip", "undo")
    given = ", ".join(f"{answered[name]} {name}" for name in names if answered[name]) or "none"
    where = (
        f"{out} holds {log.pairs_in_out()} preference pairs (answers and undos: {log.path.name})"
    )
    if not left:
        return f"{labeler}: all {total} items of {source} answered (this session: {given}); {where}"
    again = shlex.join(["rlhf", "label", *argv])
    return (
        f"{labeler}: {total - left} of {total} items answered, {left} to go (this session: "
        f"{given}); {where}; continue with: {again}"
    )


def main(argv: list[str]) -> None:
    """`rlhf label ...`: exit 0 when done or quit, 2 on bad input, 4 when a write failed, 128 + the
    signal after Ctrl-C / SIGTERM (every answer given is saved in all of these cases)."""
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=False)
    try:
        flags, config, stats_files = parse_command_line(argv)
        if flags & {"--help", "-h"}:
            print(USAGE + "\n\nsettings (defaults):\n" + _defaults_file().read_text())
            return
        if "--cfg" in flags:
            from omegaconf import OmegaConf

            from rlhf_cli.schema import to_container

            print(OmegaConf.to_yaml(to_container(config)), end="")
            return
        if "--stats" in flags:
            if not stats_files:
                raise UserError(
                    "--stats reads out=<a preference file rlhf label wrote> (or several, "
                    "comma-separated)."
                )
            print_stats(stats_files, Console(highlight=False, soft_wrap=True))
            return
        code = label(config, console, argv)
    except UserCodeError as err:
        print(f"rlhf label: error: {err}.\n{err.report()}", file=sys.stderr, flush=True)
        sys.exit(USER_CODE_EXIT)
    except UserError as err:
        print(f"rlhf label: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except WriteFailed as err:
        print(f"rlhf label: error: {err}", file=sys.stderr, flush=True)
        sys.exit(WRITE_EXIT)
    if code:
        sys.exit(code)
