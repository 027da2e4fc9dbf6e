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

WRITE_EXIT = 4  # exit code: a file or checkpoint could not be written (disk full, permissions)
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)
KILL_ENV = "RLHF_TEST_KILL_AT"  # test hook: "POINT:N" SIGKILLs the process at the Nth pass of POINT
_passes: dict[str, int] = {}


def kill_point(name: str) -> None:
    """Test hook for the kill tests: with RLHF_TEST_KILL_AT="NAME:N" the process SIGKILLs itself
    the Nth time it passes the point called NAME. The points: "update" (a step's gradients are
    computed, the optimizer has not stepped), "step-end" (a step is done, before its checkpoint),
    "checkpoint-files" / "final-files" (the files are written, no COMPLETE marker yet),
    "checkpoint-marked" / "final-marked" (complete, not yet renamed into place), "checkpoint-swap"
    / "final-swap" (the older copy moved aside, the new one not yet in place), "checkpoint-saved"
    (in place, older checkpoints not yet pruned), "label-logged" (an answer is in the label log,
    `out` not yet rewritten), "file-written" (a file is written under its temporary name, not yet
    renamed into place). A no-op without the variable."""
    want, _, count = os.environ.get(KILL_ENV, "").partition(":")
    if want == name:
        _passes[name] = _passes.get(name, 0) + 1
        if str(_passes[name]) == count:
            os.kill(os.getpid(), signal.SIGKILL)


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
