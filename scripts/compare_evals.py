"""One table comparing `rlhf eval` results: gold score with its 95% interval, RM score, KL, length,
EOS rate, perplexity, and whether each gain over the row it names is larger than the interval.

python scripts/compare_evals.py base=runs/demo/eval-base sft=runs/demo/eval-sft \
    dpo=runs/demo/eval-dpo ppo=runs/demo/eval-ppo --vs dpo=sft --vs ppo=sft

Each argument is NAME=FOLDER (or a folder: its name is the folder's). A row's gain is over the row
above it, or over the row `--vs NAME=OTHER` names. Prints the table; with --json FILE also writes
the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table


def load(argument: str) -> tuple[str, dict]:
    name, _, folder = argument.rpartition("=") if "=" in argument else ("", "", argument)
    path = Path(folder)
    file = path / "eval.json" if path.is_dir() else path
    if not file.is_file():
        raise SystemExit(f"compare_evals: {folder} holds no eval.json; run rlhf eval first.")
    return name or path.name, json.loads(file.read_text())


def rows(results: list[tuple[str, dict]], versus: dict[str, str] | None = None) -> list[dict]:
    """One row per result; `gain` is the gold gain over the row above (or the one `versus` names)
    and `clear` says whether it exceeds the width of that row's 95% interval (the demo's rule)."""
    table: list[dict] = []
    by_name: dict[str, dict] = {}
    for name, result in results:
        m = result["metrics"]
        row = {
            "name": name,
            "gold": m.get("gold/mean"),
            "gold_ci": (m.get("gold/ci_low"), m.get("gold/ci_high")),
            "rm": m.get("rm/mean"),
            "kl": m.get("kl"),
            "length": m["response_length"],
            "eos_rate": m["eos_rate"],
            "perplexity": m.get("perplexity"),
            "gain": None,
            "clear": None,
        }
        other = by_name.get((versus or {}).get(name, ""), table[-1] if table else None)
        if other is not None and row["gold"] is not None and other["gold"] is not None:
            low, high = other["gold_ci"]
            row["gain"] = row["gold"] - other["gold"]
            row["clear"] = row["gain"] > high - low
            row["over"] = other["name"]
        table.append(row)
        by_name[name] = row
    return table


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="NAME=FOLDER of an rlhf eval (or FOLDER)")
    parser.add_argument(
        "--vs", action="append", default=[], help="NAME=OTHER: NAME's gain is over OTHER"
    )
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args()
    versus = dict(v.split("=", 1) for v in args.vs)
    table_rows = rows([load(a) for a in args.results], versus)
    table = Table(title="held-out comparison (gold: 95% bootstrap interval)")
    for column in ("", "gold", "95% interval", "gain", "RM", "KL", "length", "EOS", "perplexity"):
        table.add_column(column, justify="left" if not column else "right")
    for r in table_rows:
        low, high = r["gold_ci"]
        gain = (
            "-"
            if r["gain"] is None
            else f"{r['gain']:+.3f} vs {r['over']}{' *' if r['clear'] else ''}"
        )
        table.add_row(
            r["name"], _fmt(r["gold"]), f"[{_fmt(low)}, {_fmt(high)}]", gain, _fmt(r["rm"]),
            _fmt(r["kl"]), _fmt(r["length"], 1), _fmt(r["eos_rate"], 2), _fmt(r["perplexity"]),
        )  # fmt: skip
    console = Console()
    console.print(table)
    console.print("* the gain exceeds the width of the compared row's 95% interval")
    if args.json:
        args.json.write_text(json.dumps(table_rows, indent=2))


if __name__ == "__main__":
    main()
