"""One table comparing `rlhf eval` results: gold score with its 95% interval, RM score, KL, length,
EOS rate, perplexity, and whether each gold gain over the row it names is larger than the width of
either row's 95% interval (the demo's criterion).

python scripts/compare_evals.py base=runs/demo/eval-base sft=runs/demo/eval-sft \
    dpo=runs/demo/eval-dpo ppo=runs/demo/eval-ppo --vs dpo=sft --vs ppo=sft

Each argument is NAME=FOLDER (or a folder: its name is the folder's). A row's gain is over the row
above it, or over the row `--vs NAME=OTHER` names. Prints the table; with --json FILE also writes
the rows as JSON, with --png FILE a bar chart of the gold scores with their intervals (needs
matplotlib: pip install 'rlhf-cli[plot]').
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


# the score a table compares: its metric in eval.json and its 95% interval's ends
SCORES = {
    "gold": ("gold/mean", "gold/ci_low", "gold/ci_high"),
    "success": ("env/success", "env/success_ci_low", "env/success_ci_high"),  # eval env=...
}


def rows(
    results: list[tuple[str, dict]], versus: dict[str, str] | None = None, score: str = "gold"
) -> list[dict]:
    """One row per result; `gain` is the score's gain over the row above (or the one `versus`
    names) and `clear` says whether it exceeds the width of both rows' 95% intervals (the demo's
    rule). `score`: gold (the judge's) or success (an environment's, eval env=...)."""
    table: list[dict] = []
    by_name: dict[str, dict] = {}
    mean, low, high = SCORES[score]
    for name, result in results:
        m = result["metrics"]
        row = {
            "name": name,
            score: m.get(mean),
            f"{score}_ci": (m.get(low), m.get(high)),
            "rm": m.get("rm/mean"),
            "kl": m.get("kl"),
            "length": m["response_length"],
            "eos_rate": m["eos_rate"],
            "perplexity": m.get("perplexity"),
            "reference": result.get("reference"),
            "gain": None,
            "clear": None,
        }
        if score == "success":
            row |= {"turns": m.get("env/turns"), "tool_calls": m.get("env/tool_calls")}
        other = by_name.get((versus or {}).get(name, ""), table[-1] if table else None)
        if other is not None and row[score] is not None and other[score] is not None:
            widths = [high - low for low, high in (row[f"{score}_ci"], other[f"{score}_ci"])]
            row["gain"] = row[score] - other[score]
            row["clear"] = row["gain"] > max(widths)
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
    parser.add_argument("--png", type=Path, help="also draw the scores into this PNG")
    parser.add_argument(
        "--score", choices=sorted(SCORES), default="gold",
        help="gold: the judge's score; success: an environment's (rlhf eval env=...)",
    )  # fmt: skip
    args = parser.parse_args()
    versus = dict(v.split("=", 1) for v in args.vs)
    score = args.score
    table_rows = rows([load(a) for a in args.results], versus, score)
    table = Table(title=f"held-out comparison ({score}: 95% bootstrap interval)")
    columns = ["", score, "95% interval", "gain"]
    columns += ["KL", "turns", "tool calls"] if score == "success" else ["RM", "KL"]
    for column in (*columns, "length", "EOS", *(["perplexity"] if score == "gold" else [])):
        table.add_column(column, justify="left" if not column else "right")
    for r in table_rows:
        low, high = r[f"{score}_ci"]
        gain = (
            "-"
            if r["gain"] is None
            else f"{r['gain']:+.3f} vs {r['over']}{' *' if r['clear'] else ''}"
        )
        middle = (
            [_fmt(r["kl"]), _fmt(r["turns"], 2), _fmt(r["tool_calls"], 2)]
            if score == "success"
            else [_fmt(r["rm"]), _fmt(r["kl"])]
        )
        end = [_fmt(r["perplexity"])] if score == "gold" else []
        table.add_row(
            r["name"], _fmt(r[score]), f"[{_fmt(low)}, {_fmt(high)}]", gain, *middle,
            _fmt(r["length"], 1), _fmt(r["eos_rate"], 2), *end,
        )  # fmt: skip
    console = Console()
    console.width = max(console.width, 110)  # the table is 100 characters wide; pipes get 80
    console.print(table)
    console.print("* the gain exceeds the width of both rows' 95% intervals")
    references = [f"{r['name']}: {r['reference']}" for r in table_rows if r["kl"] is not None]
    if references:
        console.print(
            f"KL (nats per response) is to each policy's reference: {'; '.join(references)}"
        )
    judged = [r for r in table_rows if r["clear"] is not None]
    if judged:
        unclear = [r["name"] for r in judged if not r["clear"]]
        console.print(
            "every gain is clear" if not unclear else f"not clear: {', '.join(unclear)}",
            style="bold green" if not unclear else "bold yellow",
        )
    if args.json:
        args.json.write_text(json.dumps(table_rows, indent=2))
    if args.png:
        from rlhf_cli.plots import plot_comparison

        plot_comparison(table_rows, args.png, score)


if __name__ == "__main__":
    main()
