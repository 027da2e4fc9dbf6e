"""Generate the embedded demo datasets shipped with ``rlhf_cli``.

The demo task is a set of short questions with one objective answer, each followed by a strict
output-format instruction::

    What is 17 + 25? Reply in the form "Answer: <answer>".

The ideal assistant reply is exactly ``Answer: 42``. Questions come from three families:

* ``arithmetic``: ``a + b`` and ``a - b`` with operands in 1..50 (``a > b`` for subtraction),
  and ``a x b`` with operands in 2..12;
* ``capital``: capitals of 84 well-known countries;
* ``fact``: small tables of unambiguous facts (animal legs, paint colour mixing, polygon sides,
  unit conversions, chemical symbols).

Train and eval are disjoint in their template values: every pool (arithmetic operand pairs per
operator, countries, each fact table) is shuffled with a fixed seed and 20% of it is reserved for
eval. Commutative operand pairs are split as unordered pairs, so ``3 + 5`` and ``5 + 3`` always
land in the same split. 45% of the SFT train demonstrations are deliberately imperfect: the right
answer followed by an explanation (``Answer: 42. 17 + 25 = 42. Hope this helps!``), which breaks
the format. That is the violation greedy decoding keeps after SFT (a reply that starts wrongly,
like ``The answer is 42.``, loses to the majority at its first token; one that starts right and
goes on is a coin flip at the end of the answer), so preference learning has something to fix.
Eval demonstrations are always ideal.

The held-out prompts (219) are as many as the eval pools allow for products, capitals and facts,
plus 140 sums and 40 differences, so that the demo's 95% intervals are about +-0.07 wide.

Output (JSON Lines, UTF-8, one object per line), under ``rlhf_cli/datasets/``:

* ``demo-sft/{train,eval}.jsonl``:
  ``{"messages": [user, assistant], "answer": ..., "family": ..., "ideal": bool}``
* ``demo-prompts/{train,eval}.jsonl``: ``{"prompt": [user], "answer": ..., "family": ...}``
* ``demo-prefs/{train,eval}.jsonl``: ``{"prompt": [user], "chosen": [assistant],
  "rejected": [assistant], "answer": ..., "family": ..., "rejected_kind": ...}``

Prompts use the same train/eval partition as the SFT data but prefer items not already used by
the SFT rows of the same split.

Preference pairs use the same train/eval partition too. ``chosen`` is always the ideal reply;
``rejected`` is, in equal shares per family sub-pool, one of ``wrong_answer`` (ideal format, a
plausible wrong value), ``bad_format`` (right value, one of the imperfect styles), ``verbose``
(``Answer: X.`` plus an explanation) or ``both_wrong`` (wrong value, imperfect style). They are
drawn from their own RNG stream (seeded from ``--seed`` plus a suffix), so adding them left the
SFT and prompt files unchanged.

The tool-use demo (``env=calculator``, products of two 3-digit numbers) writes
``demo-tools-sft/{train,eval}.jsonl`` (transcripts: system, user, assistant tool call, tool,
assistant answer; or, for half of the train rows, a guess without the tool) and
``demo-tools/{train,eval}.jsonl`` (``{"question", "answer"}`` rows for the environment), from its
own RNG stream; see ``TOOL_QUOTAS`` below.

Run from the repository root (deterministic; rewrites the ten files; only the tool instructions
import rlhf_cli, so that they are the rollout layer's own)::

    python scripts/make_demo_data.py
    python scripts/make_demo_data.py --out-dir /tmp/d --imperfect-fraction 0.2 --imperfect-style mixed

(the second: a variant with fewer imperfect demonstrations, in every imperfect style: after SFT on
it the model follows the format almost always, which leaves DPO and PPO little to fix)
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

SEED = 20240601
EVAL_FRACTION = 0.2
IMPERFECT_FRACTION = 0.45
INSTRUCTION = 'Reply in the form "Answer: <answer>".'
DEFAULT_OUT_DIR = Path(__file__).resolve().parent.parent / "rlhf_cli" / "datasets"

# Rows per (dataset, split, family, sub-pool). Sub-pools are arithmetic operators, "capital" for
# capitals, and fact table names for facts (drawn round-robin across tables).
ARITH_QUOTAS: dict[tuple[str, str], dict[str, int]] = {
    ("sft", "train"): {"+": 61, "-": 61, "x": 30},
    ("sft", "eval"): {"+": 8, "-": 8, "x": 4},
    ("prompts", "train"): {"+": 50, "-": 50, "x": 20},
    # The held-out prompts the demo's evals score: as many as the eval pools allow for
    # multiplication, capitals and facts, and many sums, so that 95% intervals are ~+-0.07.
    ("prompts", "eval"): {"+": 140, "-": 40, "x": 13},
}
CAPITAL_QUOTAS: dict[tuple[str, str], int] = {
    ("sft", "train"): 48,
    ("sft", "eval"): 12,
    ("prompts", "train"): 48,
    ("prompts", "eval"): 17,
}
FACT_QUOTAS: dict[tuple[str, str], int] = {
    ("sft", "train"): 40,
    ("sft", "eval"): 8,
    ("prompts", "train"): 32,
    ("prompts", "eval"): 9,
}
# Preference pairs: same sub-pools, each a multiple of len(REJECTED_KINDS) so that the kinds are
# exactly balanced within every sub-pool.
PREFS_ARITH_QUOTAS: dict[str, dict[str, int]] = {
    "train": {"+": 100, "-": 100, "x": 40},
    "eval": {"+": 16, "-": 16, "x": 8},
}
PREFS_CAPITAL_QUOTAS: dict[str, int] = {"train": 80, "eval": 20}
PREFS_FACT_QUOTAS: dict[str, int] = {"train": 80, "eval": 20}
REJECTED_KINDS = ("wrong_answer", "bad_format", "verbose", "both_wrong")
# The preference pairs get their own RNG stream, Random(f"{seed}{PREFS_SEED_SUFFIX}"), so that
# they never shift the draws of the SFT and prompt data (str seeds are hashed with SHA-512, so
# this does not depend on PYTHONHASHSEED).
PREFS_SEED_SUFFIX = "/demo-prefs"

# Country names are written as they appear mid-sentence ("the capital of the Philippines").
CAPITALS: list[tuple[str, str]] = [
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Portugal", "Lisbon"),
    ("the United Kingdom", "London"),
    ("Ireland", "Dublin"),
    ("Belgium", "Brussels"),
    ("Austria", "Vienna"),
    ("Poland", "Warsaw"),
    ("the Czech Republic", "Prague"),
    ("Hungary", "Budapest"),
    ("Greece", "Athens"),
    ("Sweden", "Stockholm"),
    ("Norway", "Oslo"),
    ("Denmark", "Copenhagen"),
    ("Finland", "Helsinki"),
    ("Russia", "Moscow"),
    ("Romania", "Bucharest"),
    ("Bulgaria", "Sofia"),
    ("Croatia", "Zagreb"),
    ("Serbia", "Belgrade"),
    ("Slovakia", "Bratislava"),
    ("Slovenia", "Ljubljana"),
    ("Estonia", "Tallinn"),
    ("Latvia", "Riga"),
    ("Lithuania", "Vilnius"),
    ("Turkey", "Ankara"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Nigeria", "Abuja"),
    ("Ghana", "Accra"),
    ("Ethiopia", "Addis Ababa"),
    ("Morocco", "Rabat"),
    ("Senegal", "Dakar"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("South Korea", "Seoul"),
    ("India", "New Delhi"),
    ("Pakistan", "Islamabad"),
    ("Bangladesh", "Dhaka"),
    ("Nepal", "Kathmandu"),
    ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"),
    ("the Philippines", "Manila"),
    ("Malaysia", "Kuala Lumpur"),
    ("Iran", "Tehran"),
    ("Iraq", "Baghdad"),
    ("Saudi Arabia", "Riyadh"),
    ("Australia", "Canberra"),
    ("New Zealand", "Wellington"),
    ("Canada", "Ottawa"),
    ("Mexico", "Mexico City"),
    ("Cuba", "Havana"),
    ("Argentina", "Buenos Aires"),
    ("Chile", "Santiago"),
    ("Peru", "Lima"),
    ("Venezuela", "Caracas"),
    ("Uruguay", "Montevideo"),
    ("Ecuador", "Quito"),
    ("the Netherlands", "Amsterdam"),
    ("Switzerland", "Bern"),
    ("Luxembourg", "Luxembourg"),
    ("Ukraine", "Kyiv"),
    ("Israel", "Jerusalem"),
    ("Jordan", "Amman"),
    ("Lebanon", "Beirut"),
    ("Syria", "Damascus"),
    ("Afghanistan", "Kabul"),
    ("Sri Lanka", "Colombo"),
    ("Indonesia", "Jakarta"),
    ("Singapore", "Singapore"),
    ("Taiwan", "Taipei"),
    ("North Korea", "Pyongyang"),
    ("Algeria", "Algiers"),
    ("Tunisia", "Tunis"),
    ("Libya", "Tripoli"),
    ("Sudan", "Khartoum"),
    ("Uganda", "Kampala"),
    ("Zimbabwe", "Harare"),
    ("Brazil", "Brasilia"),
    ("Colombia", "Bogota"),
    ("Bolivia", "La Paz"),
    ("Jamaica", "Kingston"),
]

# Subjects carry their article so that questions and sentences read naturally.
ANIMAL_LEGS: list[tuple[str, int]] = [
    ("a spider", 8),
    ("a scorpion", 8),
    ("an ant", 6),
    ("a bee", 6),
    ("a beetle", 6),
    ("a butterfly", 6),
    ("a dog", 4),
    ("a cat", 4),
    ("a horse", 4),
    ("a cow", 4),
    ("a frog", 4),
    ("an elephant", 4),
    ("a chicken", 2),
    ("a duck", 2),
    ("an ostrich", 2),
    ("a penguin", 2),
]
PAINT_MIXES: list[tuple[str, str, str]] = [
    ("blue", "yellow", "green"),
    ("red", "yellow", "orange"),
    ("red", "blue", "purple"),
    ("red", "white", "pink"),
]
POLYGON_SIDES: list[tuple[str, int]] = [
    ("a triangle", 3),
    ("a square", 4),
    ("a pentagon", 5),
    ("a hexagon", 6),
    ("a heptagon", 7),
    ("an octagon", 8),
    ("a decagon", 10),
]
# (counted unit, container) -> "How many <unit> are in <container>?"
UNIT_COUNTS: list[tuple[str, str, int]] = [
    ("seconds", "a minute", 60),
    ("minutes", "an hour", 60),
    ("hours", "a day", 24),
    ("days", "a week", 7),
    ("months", "a year", 12),
    ("days", "a leap year", 366),
    ("centimetres", "a metre", 100),
    ("millimetres", "a centimetre", 10),
    ("metres", "a kilometre", 1000),
    ("grams", "a kilogram", 1000),
]
CHEMICAL_SYMBOLS: list[tuple[str, str]] = [
    ("gold", "Au"),
    ("silver", "Ag"),
    ("iron", "Fe"),
    ("copper", "Cu"),
    ("lead", "Pb"),
    ("sodium", "Na"),
    ("potassium", "K"),
    ("oxygen", "O"),
    ("hydrogen", "H"),
    ("carbon", "C"),
    ("nitrogen", "N"),
    ("helium", "He"),
]

# Plausible wrong answers for the fact tables without an obvious rule.
UNIT_COUNT_WRONG: dict[int, tuple[int, ...]] = {
    60: (100, 30, 24),
    24: (12, 60, 48),
    7: (5, 10, 6),
    12: (10, 52, 13),
    366: (365, 364, 360),
    100: (10, 1000, 60),
    10: (100, 12, 5),
    1000: (100, 10000, 10),
}
SYMBOL_WRONG: dict[str, tuple[str, ...]] = {
    "gold": ("Go", "Ag", "Gd"),
    "silver": ("Si", "Au", "Sv"),
    "iron": ("Ir", "I", "Fr"),
    "copper": ("Co", "Cp", "Cr"),
    "lead": ("Le", "Ld", "Pd"),
    "sodium": ("So", "S", "Sd"),
    "potassium": ("P", "Po", "Pt"),
    "oxygen": ("Ox", "Og", "Os"),
    "hydrogen": ("Hy", "He", "Hd"),
    "carbon": ("Ca", "Co", "Cb"),
    "nitrogen": ("Ni", "Nt", "Ne"),
    "helium": ("H", "Hl", "Hm"),
}
PAINT_COLOURS = ("green", "orange", "purple", "pink", "brown")
VERBOSE_TAILS = ("", " Hope this helps!", " Let me know if you have another question.")

ARITH_TEMPLATES = ["What is {a} {op} {b}?", "Calculate {a} {op} {b}.", "Compute {a} {op} {b}."]
CAPITAL_TEMPLATES = [
    "What is the capital of {country}?",
    "Which city is the capital of {country}?",
    "Name the capital city of {country}.",
]


@dataclass(frozen=True)
class Item:
    """One concrete question with its gold answer.

    ``claim`` is a prose statement with an ``{answer}`` placeholder: ``sentence`` (the claim with
    the gold answer) is used for imperfect demonstrations, ``claim`` with a wrong answer for
    rejected preference replies. ``wrong`` lists plausible wrong answers (sorted, never the gold
    one; empty for capitals, whose wrong answers depend on the split).
    """

    family: str
    question: str
    answer: str
    claim: str
    wrong: tuple[str, ...] = ()

    @property
    def sentence(self) -> str:
        return self.stated(self.answer)

    def stated(self, answer: str) -> str:
        return self.claim.format(answer=answer)


def cap_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def wrong_numbers(gold: int, candidates: Sequence[int]) -> tuple[str, ...]:
    """Distinct non-negative candidates other than ``gold``, in numeric order, as strings."""
    return tuple(str(n) for n in sorted(set(candidates)) if n >= 0 and n != gold)


def wrong_words(gold: str, candidates: Sequence[str]) -> tuple[str, ...]:
    return tuple(sorted(set(candidates) - {gold}))


def split_pool(rng: random.Random, pool: Sequence[tuple]) -> tuple[list[tuple], list[tuple]]:
    """Shuffle ``pool``; return (train, eval) with ``EVAL_FRACTION`` of it (at least 1) in eval."""
    shuffled = list(pool)
    rng.shuffle(shuffled)
    n_eval = max(1, round(len(shuffled) * EVAL_FRACTION))
    return shuffled[n_eval:], shuffled[:n_eval]


def arithmetic_pools() -> dict[str, list[tuple[int, int]]]:
    """Canonical operand pairs per operator (unordered for the commutative ones)."""
    return {
        "+": [(a, b) for a in range(1, 51) for b in range(a, 51)],
        "-": [(a, b) for a in range(1, 51) for b in range(1, a)],
        "x": [(a, b) for a in range(2, 13) for b in range(a, 13)],
    }


def make_arithmetic(rng: random.Random, op: str, pair: tuple[int, int]) -> Item:
    a, b = pair
    if op in ("+", "x") and rng.random() < 0.5:
        a, b = b, a
    value = {"+": a + b, "-": a - b, "x": a * b}[op]
    question = rng.choice(ARITH_TEMPLATES).format(a=a, op=op, b=b)
    # Off by one or ten (a carry slip), off by one row of the times table, or the wrong operation.
    wrong = {
        "+": [value - 1, value + 1, value - 10, value + 10, abs(a - b)],
        "-": [value - 1, value + 1, value - 10, value + 10, a + b],
        "x": [value - a, value + a, value - b, value + b, a + b],
    }[op]
    return Item(
        family="arithmetic",
        question=question,
        answer=str(value),
        claim=f"{a} {op} {b} = {{answer}}.",
        wrong=wrong_numbers(value, wrong),
    )


def make_capital(rng: random.Random, entry: tuple[str, str]) -> Item:
    country, city = entry
    return Item(
        family="capital",
        question=rng.choice(CAPITAL_TEMPLATES).format(country=country),
        answer=city,
        claim=f"{{answer}} is the capital of {country}.",
    )


def _legs(rng: random.Random, entry: tuple) -> Item:
    animal, legs = entry
    return Item(
        family="fact",
        question=f"How many legs does {animal} have?",
        answer=str(legs),
        claim=f"{cap_first(animal)} has {{answer}} legs.",
        wrong=wrong_numbers(legs, [2, 4, 6, 8]),
    )


def _paint(rng: random.Random, entry: tuple) -> Item:
    first, second, result = entry
    if rng.random() < 0.5:
        first, second = second, first
    return Item(
        family="fact",
        question=f"What colour do you get by mixing {first} and {second} paint?",
        answer=result,
        claim=f"Mixing {first} and {second} paint gives {{answer}}.",
        wrong=wrong_words(result, PAINT_COLOURS),
    )


def _polygon(rng: random.Random, entry: tuple) -> Item:
    shape, sides = entry
    return Item(
        family="fact",
        question=f"How many sides does {shape} have?",
        answer=str(sides),
        claim=f"{cap_first(shape)} has {{answer}} sides.",
        wrong=wrong_numbers(sides, [sides - 2, sides - 1, sides + 1, sides + 2]),
    )


def _units(rng: random.Random, entry: tuple) -> Item:
    unit, container, count = entry
    return Item(
        family="fact",
        question=f"How many {unit} are in {container}?",
        answer=str(count),
        claim=f"There are {{answer}} {unit} in {container}.",
        wrong=wrong_numbers(count, UNIT_COUNT_WRONG[count]),
    )


def _symbol(rng: random.Random, entry: tuple) -> Item:
    element, symbol = entry
    return Item(
        family="fact",
        question=f"What is the chemical symbol for {element}?",
        answer=symbol,
        claim=f"The chemical symbol for {element} is {{answer}}.",
        wrong=wrong_words(symbol, SYMBOL_WRONG[element]),
    )


FactMaker = Callable[[random.Random, tuple], Item]
FACT_TABLES: list[tuple[str, Sequence[tuple], FactMaker]] = [
    ("legs", ANIMAL_LEGS, _legs),
    ("paint", PAINT_MIXES, _paint),
    ("polygon", POLYGON_SIDES, _polygon),
    ("units", UNIT_COUNTS, _units),
    ("symbol", CHEMICAL_SYMBOLS, _symbol),
]


def take(pool: Sequence[tuple], used: list[tuple], n: int) -> list[tuple]:
    """Take ``n`` entries from ``pool``, preferring ones not in ``used``, cycling if needed.

    Chosen entries are appended to ``used`` so that later calls prefer different ones.
    """
    fresh = [entry for entry in pool if entry not in used]
    stale = [entry for entry in pool if entry in used]
    order = fresh + stale
    chosen = [order[i % len(order)] for i in range(n)]
    used.extend(entry for entry in chosen if entry not in used)
    return chosen


def take_facts(
    rng: random.Random,
    fact_split: list[tuple[list[tuple], list[tuple]]],
    split_index: int,
    used: list[list[tuple]],
    n: int,
) -> list[Item]:
    """Take ``n`` facts round-robin over the tables, preferring entries not in ``used[table]``."""
    per_table: list[list[tuple]] = []
    for splits, table_used in zip(fact_split, used, strict=True):
        pool = list(splits[split_index])
        rng.shuffle(pool)
        fresh = [entry for entry in pool if entry not in table_used]
        stale = [entry for entry in pool if entry in table_used]
        per_table.append(fresh + stale)

    order: list[tuple[int, tuple]] = []
    for i in range(max(len(entries) for entries in per_table)):
        order.extend((t, entries[i]) for t, entries in enumerate(per_table) if i < len(entries))

    items = []
    for t, entry in (order[i % len(order)] for i in range(n)):
        if entry not in used[t]:
            used[t].append(entry)
        items.append(FACT_TABLES[t][2](rng, entry))
    return items


def user_message(item: Item) -> str:
    return f"{item.question} {INSTRUCTION}"


def ideal_reply(item: Item) -> str:
    return f"Answer: {item.answer}"


def bad_format_replies(item: Item, answer: str) -> list[str]:
    """Replies stating ``answer`` that violate the required output format."""
    sentence = item.stated(answer)
    return [
        f"The answer is {answer}.",
        sentence,
        f"Sure! {sentence}",
        f"{answer}",
        f"**Answer:** {answer}",
    ]


def verbose_replies(item: Item) -> list[str]:
    """The ideal answer followed by an unrequested explanation."""
    return [f"Answer: {item.answer}. {item.sentence}{tail}" for tail in VERBOSE_TAILS]


def imperfect_reply(rng: random.Random, item: Item, style: str = "verbose") -> str:
    """A reply with correct content that violates the required output format: any of the bad
    formats and the verbose reply (`mixed`), or only a verbose one (`verbose`)."""
    if style == "verbose":
        return rng.choice(verbose_replies(item))
    styles = bad_format_replies(item, item.answer)
    styles.insert(2, verbose_replies(item)[0])
    return rng.choice(styles)


def rejected_replies(item: Item, kind: str) -> list[str]:
    """Every rejected reply of ``kind`` for ``item`` (deterministic order)."""
    if kind == "wrong_answer":
        return [f"Answer: {wrong}" for wrong in item.wrong]
    if kind == "bad_format":
        return bad_format_replies(item, item.answer)
    if kind == "verbose":
        return verbose_replies(item)
    if kind == "both_wrong":
        return [reply for wrong in item.wrong for reply in bad_format_replies(item, wrong)]
    raise ValueError(f"unknown rejected kind {kind!r}")


@dataclass(frozen=True)
class Partition:
    """The train/eval split of every pool of template values: (train, eval) per pool."""

    arith: dict[str, tuple[list[tuple], list[tuple]]]
    capital: tuple[list[tuple], list[tuple]]
    facts: list[tuple[list[tuple], list[tuple]]]


def split_all(rng: random.Random) -> Partition:
    return Partition(
        arith={op: split_pool(rng, pool) for op, pool in arithmetic_pools().items()},
        capital=split_pool(rng, CAPITALS),
        facts=[split_pool(rng, table) for _, table, _ in FACT_TABLES],
    )


def build_items(rng: random.Random, partition: Partition) -> dict[tuple[str, str], list[Item]]:
    """Draw the concrete items of every (dataset, split), SFT first, then prompts."""
    arith_split = partition.arith
    capital_split = partition.capital
    fact_split = partition.facts

    items: dict[tuple[str, str], list[Item]] = {}
    for split_index, split in enumerate(("train", "eval")):
        arith_used: dict[str, list[tuple]] = {op: [] for op in arith_split}
        capital_used: list[tuple] = []
        fact_used: list[list[tuple]] = [[] for _ in FACT_TABLES]
        for dataset in ("sft", "prompts"):
            rows: list[Item] = []
            for op, count in ARITH_QUOTAS[dataset, split].items():
                pool = list(arith_split[op][split_index])
                rng.shuffle(pool)
                rows.extend(make_arithmetic(rng, op, p) for p in take(pool, arith_used[op], count))

            pool = list(capital_split[split_index])
            rng.shuffle(pool)
            count = CAPITAL_QUOTAS[dataset, split]
            rows.extend(make_capital(rng, entry) for entry in take(pool, capital_used, count))

            count = FACT_QUOTAS[dataset, split]
            rows.extend(take_facts(rng, fact_split, split_index, fact_used, count))

            rng.shuffle(rows)
            items[dataset, split] = rows
    return items


def build_pref_blocks(rng: random.Random, partition: Partition, split: str) -> list[list[Item]]:
    """The preference items of ``split``, one list per sub-pool (operator, capitals, facts)."""
    split_index = ("train", "eval").index(split)
    blocks: list[list[Item]] = []
    for op, count in PREFS_ARITH_QUOTAS[split].items():
        pool = list(partition.arith[op][split_index])
        rng.shuffle(pool)
        blocks.append([make_arithmetic(rng, op, p) for p in take(pool, [], count)])

    # Wrong capitals are other capitals of the same split, so no eval country leaks into train.
    pool = list(partition.capital[split_index])
    cities = [city for _, city in pool]
    rng.shuffle(pool)
    capitals = []
    for entry in take(pool, [], PREFS_CAPITAL_QUOTAS[split]):
        item = make_capital(rng, entry)
        capitals.append(replace(item, wrong=wrong_words(item.answer, cities)))
    blocks.append(capitals)

    used: list[list[tuple]] = [[] for _ in FACT_TABLES]
    blocks.append(take_facts(rng, partition.facts, split_index, used, PREFS_FACT_QUOTAS[split]))
    return blocks


def pref_rows(rng: random.Random, blocks: list[list[Item]]) -> list[dict]:
    """One preference pair per item; the rejected kinds are balanced within every block.

    A rejected reply is drawn among those of its kind that do not repeat a (prompt, rejected)
    pair of this split (chosen is fixed by the prompt).
    """
    pairs: list[tuple[Item, str, str]] = []
    seen: set[tuple[str, str]] = set()
    for block in blocks:
        kinds = [REJECTED_KINDS[i % len(REJECTED_KINDS)] for i in range(len(block))]
        rng.shuffle(kinds)
        for item, kind in zip(block, kinds, strict=True):
            prompt = user_message(item)
            options = [r for r in rejected_replies(item, kind) if (prompt, r) not in seen]
            if not options:
                raise RuntimeError(f"no unused {kind} reply left for {prompt!r}")
            rejected = rng.choice(options)
            assert rejected != ideal_reply(item)
            seen.add((prompt, rejected))
            pairs.append((item, kind, rejected))
    rng.shuffle(pairs)
    return [
        {
            "prompt": [{"role": "user", "content": user_message(item)}],
            "chosen": [{"role": "assistant", "content": ideal_reply(item)}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "answer": item.answer,
            "family": item.family,
            "rejected_kind": kind,
        }
        for item, kind, rejected in pairs
    ]


def sft_rows(
    rng: random.Random,
    items: list[Item],
    imperfect: bool,
    fraction: float = IMPERFECT_FRACTION,
    style: str = "verbose",
) -> list[dict]:
    n_imperfect = round(len(items) * fraction) if imperfect else 0
    imperfect_ids = set(rng.sample(range(len(items)), n_imperfect))
    rows = []
    for i, item in enumerate(items):
        ideal = i not in imperfect_ids
        reply = ideal_reply(item) if ideal else imperfect_reply(rng, item, style)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": user_message(item)},
                    {"role": "assistant", "content": reply},
                ],
                "answer": item.answer,
                "family": item.family,
                "ideal": ideal,
            }
        )
    return rows


def prompt_rows(items: list[Item]) -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": user_message(item)}],
            "answer": item.answer,
            "family": item.family,
        }
        for item in items
    ]


# ---------------------------------------------------------------- the tool-use demo
# Products of two 3-digit numbers, which a 135M model cannot compute in its head, for
# `env=calculator`. The SFT demonstrations are transcripts in exactly the form the rollout layer
# plays them with the embedded model (its ChatML template takes `tool` messages but not `tools=`):
# a system message of the tool instructions (rlhf_cli.envs.tools.tool_instructions), the
# question, a <tool_call> of `calculate`, the tool's result, then "Answer: <value>".
# TOOL_IMPERFECT_FRACTION of them skip the tool and guess (the product rounded to two significant
# digits: always wrong), which SFT copies and GRPO in the environment is there to remove. Their
# own RNG stream, so the other files are unchanged.
TOOLS_SEED_SUFFIX = "/demo-tools"
TOOL_IMPERFECT_FRACTION = 0.5
TOOL_QUOTAS = {
    ("sft", "train"): 160,
    ("sft", "eval"): 20,
    ("rows", "train"): 160,
    ("rows", "eval"): 120,
}


def tool_instructions() -> str:
    """The system message the rollout layer writes for `env=calculator` with this template."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from rlhf_cli.envs import calculator, tools

    return tools.tool_instructions(tools.tool_schemas([calculator.calculate]))


def rounded_guess(value: int) -> int:
    """A confident wrong guess: the value to two significant digits (never equal to it here)."""
    scale = 10 ** (len(str(value)) - 2)
    guess = round(value / scale) * scale
    return guess if guess != value else guess + scale


def tool_items(rng: random.Random) -> dict[tuple[str, str], list[tuple[int, int]]]:
    """Disjoint operand pairs for every (dataset, split): no pair in two of them."""
    needed = sum(TOOL_QUOTAS.values())
    pairs: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    while len(pairs) < needed:
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        if (a, b) not in seen and (b, a) not in seen:
            seen.add((a, b))
            pairs.append((a, b))
    out, first = {}, 0
    for key, n in TOOL_QUOTAS.items():
        out[key], first = pairs[first : first + n], first + n
    return out


def tool_question(a: int, b: int) -> str:
    return f"What is {a} * {b}? {INSTRUCTION}"


def tool_sft_rows(
    rng: random.Random, pairs: list[tuple[int, int]], imperfect: bool, system: str
) -> list[dict]:
    n_guesses = round(len(pairs) * TOOL_IMPERFECT_FRACTION) if imperfect else 0
    guessed = set(rng.sample(range(len(pairs)), n_guesses))
    rows = []
    for i, (a, b) in enumerate(pairs):
        opening = [
            {"role": "system", "content": system},
            {"role": "user", "content": tool_question(a, b)},
        ]
        if i in guessed:
            turns = [{"role": "assistant", "content": f"Answer: {rounded_guess(a * b)}"}]
        else:
            call = json.dumps({"name": "calculate", "arguments": {"expression": f"{a} * {b}"}})
            turns = [
                {"role": "assistant", "content": f"<tool_call>{call}</tool_call>"},
                {"role": "tool", "content": str(a * b)},
                {"role": "assistant", "content": f"Answer: {a * b}"},
            ]
        rows.append({"messages": opening + turns, "answer": a * b, "ideal": i not in guessed})
    return rows


def tool_env_rows(pairs: list[tuple[int, int]]) -> list[dict]:
    return [{"question": tool_question(a, b), "answer": a * b} for a, b in pairs]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=DEFAULT_OUT_DIR,
        help="datasets directory to write into (default: rlhf_cli/datasets)",
    )
    parser.add_argument("--seed", type=int, default=SEED, help=f"RNG seed (default: {SEED})")
    parser.add_argument(
        "--imperfect-fraction",
        type=float,
        default=IMPERFECT_FRACTION,
        help=f"share of SFT train demonstrations that break the format (default: {IMPERFECT_FRACTION})",
    )
    parser.add_argument(
        "--imperfect-style",
        choices=("mixed", "verbose"),
        default="verbose",
        help="mixed: any bad format or a verbose reply; verbose: only 'Answer: X. <explanation>'",
    )
    args = parser.parse_args()

    rng = random.Random(args.seed)
    partition = split_all(rng)
    items = build_items(rng, partition)
    outputs = {
        "demo-sft/train.jsonl": sft_rows(
            rng, items["sft", "train"], True, args.imperfect_fraction, args.imperfect_style
        ),
        "demo-sft/eval.jsonl": sft_rows(rng, items["sft", "eval"], imperfect=False),
        "demo-prompts/train.jsonl": prompt_rows(items["prompts", "train"]),
        "demo-prompts/eval.jsonl": prompt_rows(items["prompts", "eval"]),
    }
    prefs_rng = random.Random(f"{args.seed}{PREFS_SEED_SUFFIX}")
    for split in ("train", "eval"):
        blocks = build_pref_blocks(prefs_rng, partition, split)
        outputs[f"demo-prefs/{split}.jsonl"] = pref_rows(prefs_rng, blocks)
    tools_rng = random.Random(f"{args.seed}{TOOLS_SEED_SUFFIX}")
    pairs, system = tool_items(tools_rng), tool_instructions()
    outputs["demo-tools-sft/train.jsonl"] = tool_sft_rows(
        tools_rng, pairs["sft", "train"], True, system
    )
    outputs["demo-tools-sft/eval.jsonl"] = tool_sft_rows(
        tools_rng, pairs["sft", "eval"], False, system
    )
    outputs["demo-tools/train.jsonl"] = tool_env_rows(pairs["rows", "train"])
    outputs["demo-tools/eval.jsonl"] = tool_env_rows(pairs["rows", "eval"])
    for relative, rows in outputs.items():
        path = args.out_dir / relative
        write_jsonl(path, rows)
        print(f"wrote {len(rows):4d} rows to {path}")


if __name__ == "__main__":
    main()
