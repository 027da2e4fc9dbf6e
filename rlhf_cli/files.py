"""Files written whole, safely, and the kill-test hook; no torch, so `rlhf label` starts fast.

A crash at any moment leaves the old file or the new one, never a part: the content goes to a
hidden file beside the target, is fsync'ed, and is renamed over it; then the folder is fsync'ed.
"""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path

from rlhf_cli.schema import UserError

WRITE_EXIT = 4  # exit code: a file or checkpoint could not be written (disk full, permissions)
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)
KILL_ENV = "RLHF_TEST_KILL_AT"  # test hook: "POINT:N" SIGKILLs the process at the Nth pass of POINT


def kill_point(name: str) -> None:
    """Test hook for the kill tests: with RLHF_TEST_KILL_AT="NAME:N" the process SIGKILLs itself
    the Nth time it passes the point called NAME. The points: "update" (a step's gradients are
    computed, the optimizer has not stepped), "step-end" (a step is done, before its checkpoint),
    "checkpoint-files" / "final-files" (the files are written, no COMPLETE marker yet),
    "checkpoint-marked" / "final-marked" (complete, not yet renamed into place), "checkpoint-swap"
    / "final-swap" (the older copy moved aside, the new one not yet in place), "checkpoint-saved"
    (in place, older checkpoints not yet pruned), "label-logged" (an answer is in the label log,
    `out` not yet rewritten), "file-written" (a file is written under its temporary name, not yet
    renamed into place), "episode-turn" (a turn of a multi-turn rollout is played, the next not
    yet sampled). A no-op without the variable."""
    want, _, count = os.environ.get(KILL_ENV, "").partition(":")
    if want == name:  # the passes still to go are counted down in the variable itself
        if count == "1":
            os.kill(os.getpid(), signal.SIGKILL)
        os.environ[KILL_ENV] = f"{name}:{int(count) - 1}"


def fsync(path: Path) -> None:
    """Flush a file's or a folder's entry to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace a file whole (see the module docstring)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        kill_point("file-written")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync(path.parent)


def write_json_atomic(path: Path, content) -> None:
    write_text_atomic(path, json.dumps(content, indent=2, ensure_ascii=False))


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    """Replace a file whole with one JSON object per line."""
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_utf8(path: Path) -> str:
    """A text file's content; one sentence (a UserError) when it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(
            f"{path} is not UTF-8 text (bad byte at offset {err.start}); re-save it as UTF-8."
        ) from None


def read_jsonl(path: Path, text: str | None = None) -> list[tuple[int, dict]]:
    """(line number, object) for every non-empty line of a JSONL file (or of its `text`, already
    read). A line that is not JSON or not a JSON object: one sentence naming it (a UserError)."""
    rows = []
    for number, line in enumerate((read_utf8(path) if text is None else text).splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(
                f"{path} line {number} is not valid JSON ({err.msg}); each line must be one JSON object."
            ) from None
        if not isinstance(value, dict):
            raise UserError(
                f"{path} line {number} is a {type(value).__name__}, not a JSON object with named fields."
            )
        rows.append((number, value))
    return rows


def check_out_file(path: Path, key: str, overwrite: bool | None) -> None:
    """Before any work: `path` can be written, and (overwrite=False) is not there yet."""
    if path.is_dir():
        raise UserError(
            f"{key}={path} is a folder; give a file path such as {path / 'pairs.jsonl'}."
        )
    if overwrite is False and path.exists():
        raise UserError(
            f"{key}={path} already exists; choose another {key}= or pass overwrite=true to replace it."
        )
    folder = next(p for p in (path.absolute().parent, *path.absolute().parents) if p.exists())
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{key}={path} cannot be written ({folder} does not allow it).")
