"""`rlhf label --stats`: answers per labeller, agreement (Cohen's kappa), position bias, A/B wins;
for binary (KTO) files: good/bad/skip per labeller, agreement, and KTO weights for the balance."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from rlhf_cli.files import read_jsonl
from rlhf_cli.labeling.log import LOG_SUFFIX, read_log, record_mode, replay
from rlhf_cli.schema import UserError, kto_weight_ranges


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
    """The answers in force in one or more preference (or KTO) files: from each one's log when it is
    beside it (ties and skips included), else from its rows. A labeller's later answer to an item
    wins. Files of both modes together are refused: their answers do not compare."""
    answers: dict[tuple[str, str], dict] = {}
    modes: dict[str, Path] = {}
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
            modes.setdefault(record_mode(record), path)
    if len(modes) > 1:
        raise UserError(
            f"{modes['pairwise']} holds preference pairs and {modes['binary']} good/bad (binary) "
            "answers; give --stats files of one mode."
        )
    return list(answers.values())


def _record_of_row(row: dict, where: str) -> dict:
    """A row of `out` as the answer it records (the stats of a file whose log was not kept)."""
    if isinstance(row.get("label"), bool) and "chosen" not in row:  # a KTO row (binary mode)
        if not all(key in row for key in ("labeler", "item")):
            raise UserError(
                f"{where} lacks the labeler and item columns of rlhf label's rows, and no log is "
                "beside the file; give a file rlhf label wrote."
            )
        answer = "good" if row["label"] else "bad"
        return {"mode": "binary", "labeler": row["labeler"], "item": row["item"], "answer": answer}
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
    labellers that answered some item both (skips left out). A pairwise answer is the candidate
    that won, or a tie, so the sides each saw do not matter; a binary one is good or bad."""
    by_labeler: dict[str, dict[str, Any]] = defaultdict(dict)
    for record in records:
        if record["answer"] != "skip":
            verdict = record["answer"] if record_mode(record) == "binary" else record["winner"]
            by_labeler[record["labeler"]][record["item"]] = verdict
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


def kto_weights(good: int, bad: int) -> tuple[float, float] | None:
    """(desirable_weight, undesirable_weight) for KTO on `good` desirable and `bad` undesirable
    rows: None when the default (1, 1) keeps desirable_weight x good / (undesirable_weight x bad)
    within [1, 4/3], the KTO paper's advice (Ethayarajh et al. 2024); else the rarer
    kind is weighed up, to two decimals rounded towards a ratio of 1 or a little above."""
    if kto_weight_ranges(good, bad, 1.0, 1.0) is None:
        return None
    if good < bad:
        return -(-100 * bad // good) / 100, 1.0  # ceil(100 bad / good) / 100
    return 1.0, (100 * good // bad) / 100  # floor(100 good / bad) / 100


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
    if record_mode(records[0]) == "binary":
        _print_binary(records, labelers, console)
        return
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
    _print_agreement(records, console)
    _print_ab(records, console)


def _print_binary(records: list[dict], labelers: list[str], console) -> None:
    """Binary (KTO) files: good/bad/skip per labeller, agreement, and the good/bad balance."""
    from rich.table import Table

    table = Table(title="answers", title_justify="left")
    table.add_column("labeller", no_wrap=True)
    for column in ("answers", "good", "bad", "skip", "good share"):
        table.add_column(column, justify="right")
    for name in labelers:
        counts = Counter(r["answer"] for r in records if r["labeler"] == name)
        table.add_row(
            name,
            str(counts.total()),
            *(str(counts[a]) for a in ("good", "bad", "skip")),
            _share(counts["good"], counts["good"] + counts["bad"]),
        )
    console.print(table)
    _print_agreement(records, console)
    counts = Counter(r["answer"] for r in records)
    good, bad = counts["good"], counts["bad"]
    if not good or not bad:
        console.print(
            f"balance: {good} good and {bad} bad rows; KTO learns from the contrast, so label "
            "until both kinds are there"
        )
        return
    weights = kto_weights(good, bad)
    if weights is None:
        console.print(
            f"balance: {good} good, {bad} bad (good/bad {good / bad:.2f}, within the KTO paper's 1 "
            "to 4/3): rlhf kto's equal weights (kto.desirable_weight = kto.undesirable_weight = 1) "
            "suit it"
        )
        return
    desirable, undesirable = weights
    console.print(
        f"balance: {good} good, {bad} bad (good/bad {good / bad:.2f}); the KTO paper keeps "
        "desirable_weight x good / (undesirable_weight x bad) within 1 to 4/3, so train with "
        f"rlhf kto kto.desirable_weight={desirable:g} kto.undesirable_weight={undesirable:g} "
        f"(that ratio: {desirable * good / (undesirable * bad):.2f})"
    )


def _print_agreement(records: list[dict], console) -> None:
    from rich.table import Table

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
