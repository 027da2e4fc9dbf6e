"""What every benchmark script does with its report: print it and, with --append, add it to the
markdown file (docs/benchmarks.md) as a new section."""

from __future__ import annotations

from pathlib import Path


def publish(report: str, append: Path | None) -> None:
    print(report)
    if append:
        with append.open("a", encoding="utf-8") as handle:
            handle.write("\n" + report)
