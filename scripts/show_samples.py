"""Print the before/after held-out samples and final metrics a stage saved in its final/ folder.

python scripts/show_samples.py runs/demo/sft/final
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table


def main(folder: str) -> None:
    final = Path(folder)
    manifest = json.loads((final / "rlhf_stage.json").read_text())
    console = Console()
    samples_file = final / "samples.json"
    if samples_file.is_file():
        samples = json.loads(samples_file.read_text())
        table = Table(
            title=f"{manifest['stage']}: held-out prompts, before vs after", show_lines=True
        )
        for column in ("prompt", "before", "after", "reference"):
            table.add_column(column, overflow="fold")
        for row in samples:
            table.add_row(row["prompt"], row["before"], row["after"], row["reference"])
        console.print(table)
    metrics = ", ".join(
        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
        for k, v in manifest["final_metrics"].items()
    )
    console.print(f"{manifest['stage']} final metrics: {metrics} ({final})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/demo/sft/final")
