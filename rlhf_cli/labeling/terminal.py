"""A person at the terminal: single keys in cbreak mode, the screen for one item, the session loop
(answer, strength, note, undo, quit) that commits each answer to the log. Pairwise mode shows two
responses side by side (keys a b t s); binary mode one response (keys g b s)."""

from __future__ import annotations

import os
import select
import termios
import tty
from collections import Counter
from pathlib import Path
from typing import Any

from rlhf_cli.labeling.items import Item, Response, shown_order
from rlhf_cli.labeling.log import AnswerLog, label_record, now, response_record
from rlhf_cli.schema import LabelConfig

ANSWER_OF_KEY = {"a": "A", "b": "B", "t": "tie", "s": "skip"}
KEYS_HELP = "[a] A is better   [b] B is better   [t] tie   [s] skip   [u] undo   [q] quit"
BINARY_ANSWER_OF_KEY = {"g": "good", "b": "bad", "s": "skip"}
BINARY_KEYS_HELP = "[g] good   [b] bad   [s] skip   [u] undo   [q] quit"
STRENGTH_HELP = (
    "How much better is {side}?  [1] slightly ... [7] far better   [Enter] no strength   [Esc] back"
)


def _prompt_text(prompt: str | list[dict]):
    """Text, or messages as `role: content` lines (a prompt, or a binary item's completion)."""
    from rich.text import Text

    if isinstance(prompt, str):
        return Text(prompt)
    text = Text()
    for index, message in enumerate(prompt):
        text.append(("\n" if index else "") + f"{message['role']}: ", style="bold dim")
        text.append(message["content"])
    return text


def screen(
    item: Item | Response,
    shown: tuple[int, int] | None,
    done: int,
    total: int,
    skipped: int,
    labeler: str,
    out: Path,
    footer: str = KEYS_HELP,
    message: str = "",
):
    """What the labeller shows for one item: the prompt, the two responses side by side (left: A)
    or, binary (`shown` None), the one response, then the keys and a progress bar."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    header = Text.assemble(
        ("rlhf label", "bold"), f"   item {done + 1} of {total}   labeller: {labeler}   out: {out}"
    )
    if shown is None:
        responses = Panel(
            _prompt_text(item.response), title="response", title_align="left", border_style="green"
        )
    else:
        responses = Table.grid(expand=True, padding=(0, 1))
        responses.add_column(ratio=1)
        responses.add_column(ratio=1)
        responses.add_row(
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
        responses,
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
    """One labeller at the terminal, through the items of the input file (pairs, or binary: single
    responses)."""

    def __init__(
        self,
        config: LabelConfig,
        items: list[Item] | list[Response],
        log: AnswerLog,
        labeler: str,
        source: Path,
        console,
        keys: Keys,
    ):
        self.config, self.log, self.labeler, self.source = config, log, labeler, source
        self.console, self.keys = console, keys
        self.binary = config.mode == "binary"
        self.answer_of_key = BINARY_ANSWER_OF_KEY if self.binary else ANSWER_OF_KEY
        self.keys_help = BINARY_KEYS_HELP if self.binary else KEYS_HELP
        self.items = {item.id: item for item in items}
        done = {r["item"] for r in log.mine(labeler)}
        self.queue = [item for item in items if item.id not in done]
        self.answered = Counter()  # this session's answers

    def progress(self) -> tuple[int, int]:
        """(items of this file answered, of them skipped) by this labeller."""
        mine = [r for r in self.log.mine(self.labeler) if r["item"] in self.items]
        return len(mine), sum(r["answer"] == "skip" for r in mine)

    def show(
        self,
        item: Item | Response,
        shown: tuple[int, int] | None,
        footer: str = "",
        message: str = "",
    ):
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
                footer or self.keys_help,
                message,
            )
        )

    def run(self) -> None:
        message = ""
        while self.queue:
            item = self.queue[0]
            shown = None if self.binary else shown_order(item, self.labeler, self.config.seed)
            self.show(item, shown, message=message)
            message = ""
            key = self.keys.read().lower()
            if key in ("q", "eof"):
                return
            if key == "u":
                message = self.undo()
            elif key in self.answer_of_key:
                answer = self.answer_of_key[key]
                extra = self.details(item, shown, answer)
                if extra is not None:
                    self.log.commit([self.record(item, shown, answer, extra)])
                    self.answered[answer] += 1
                    self.queue.pop(0)

    def record(
        self, item: Item | Response, shown: tuple[int, int] | None, answer: str, extra: dict
    ) -> dict:
        """The log record of an answer, in this session's mode."""
        if self.binary:
            return response_record(item, self.labeler, answer, self.source, **extra)
        return label_record(item, self.labeler, shown, answer, self.source, **extra)

    def details(
        self, item: Item | Response, shown: tuple[int, int] | None, answer: str
    ) -> dict | None:
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
