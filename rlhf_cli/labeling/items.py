"""The input file -> items: what a labeller answers, one at a time.

Pairwise (`Item`): two candidates of one row of what `rlhf sample` writes (`pairs=all`: every pair,
across the two policies of an A/B file; `pairs=first`: one per row), shown side by side in an order
drawn per labeller and item (`shown_order`) and recorded with the answer.

Binary (`Response`): one response to one prompt, labelled good or bad: every candidate of an
`rlhf sample` row, or the `completion` (or `response`) of a prompt/completion row.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_cli.files import read_jsonl
from rlhf_cli.schema import UserError


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


@dataclass
class Response:
    """One response to one prompt (binary mode: good or bad)."""

    id: str  # a hash of the prompt and the response
    prompt: str | list[dict]
    response: str | list[dict]  # text, or messages (a prompt/completion row's `completion`)
    candidate: int | None  # its position in the row's candidate list | None: a completion row
    source: str | None  # the policy it came from (a / b in A/B files)
    columns: dict  # the row's other columns, for judges and the KTO rows
    row_id: Any  # the row's `id`, else its line number

    def text(self) -> str:
        """The response as text, for judges: a message list's contents, one after another."""
        if isinstance(self.response, str):
            return self.response
        return "\n\n".join(message["content"] for message in self.response)


def item_id(prompt: Any, *responses: Any) -> str:
    text = json.dumps([prompt, *responses], ensure_ascii=False, sort_keys=True)
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


def _candidates(row: dict, where: str, least: int = 2) -> list[tuple[str, str | None]]:
    """[(text, source)] of a row: strings, or objects with a string `text` (and `source`); at
    least `least` of them."""
    found = row.get("candidates")
    if not isinstance(found, list):
        raise UserError(
            f"{where} has no `candidates` list; each row needs a `prompt` and two or more "
            "`candidates` (the file rlhf sample writes)."
        )
    if not found:
        raise UserError(f"{where} has an empty `candidates` list; give one or more responses.")
    if len(found) < least:
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
    same: int = 0  # left out: pairs of identical responses | binary: a response repeated
    empty: int = 0  # left out: pairs with an empty response | binary: empty responses
    binary: bool = False

    def summary(self) -> str:
        if self.binary:
            left_out = f"; left out: {self.same} repeated responses, {self.empty} empty ones"
        else:
            left_out = (
                f"; left out: {self.same} pairs of identical responses, {self.empty} with an "
                "empty one"
            )
        return f"{self.items} items from {self.rows} rows" + (
            left_out if self.same or self.empty else ""
        )


def _rows(path: Path, expected: str) -> list[tuple[int, dict]]:
    """The rows of the input file; `expected`: what it should be, for the sentence when it is
    missing or empty."""
    if not path.is_file():
        raise UserError(f"in={path} does not exist; give {expected}.")
    rows = read_jsonl(path)
    if not rows:
        raise UserError(f"in={path} holds no rows; give {expected}.")
    return rows


def _prompt(row: dict, where: str) -> str | list[dict]:
    prompt = row.get("prompt")
    if not _is_prompt(prompt):
        raise UserError(
            f"{where}: `prompt` must be non-empty text or a list of {{role, content}} messages."
        )
    return prompt


def _columns(row: dict, *responses: str) -> dict:
    """The row's other columns (those of rlhf sample's `columns` object too), for judges; not the
    prompt, the `responses` keys, the id or rlhf sample's provenance."""
    columns = {
        k: v
        for k, v in row.items()
        if k not in ("prompt", *responses, "columns", "provenance", "id")
    }
    if isinstance(row.get("columns"), dict):
        columns |= row["columns"]
    return columns


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
    rows = _rows(path, "the pairs file that rlhf sample wrote (rlhf sample out=pairs.jsonl)")
    counts, items, seen = ItemCounts(), [], set()
    for number, row in rows:
        where = f"{path} line {number}"
        counts.rows += 1
        prompt = _prompt(row, where)
        candidates = _candidates(row, where)
        columns = _columns(row, "candidates")
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
    counts.items = len(items)
    if not items:
        raise UserError(
            f"in={path} has no pair of two different, non-empty responses to compare "
            f"({counts.same} identical, {counts.empty} with an empty response); sample at a higher "
            "temperature or with more max_new_tokens."
        )
    return items, counts


RESPONSE_KEYS = ("completion", "response")  # binary: a prompt/completion row's response


def load_responses(path: Path) -> tuple[list[Response], ItemCounts]:
    """The items of binary mode: every candidate of an rlhf sample row, or the `completion` (else
    `response`: text or messages) of a prompt/completion row. Empty responses and a response
    repeated to the same prompt are left out (counted): KTO files may not hold an empty one."""
    expected = (
        "the file rlhf sample wrote, or rows with a `prompt` and a `completion` (or `response`)"
    )
    counts, items, seen = ItemCounts(binary=True), [], set()
    for number, row in _rows(path, expected):
        where = f"{path} line {number}"
        counts.rows += 1
        prompt = _prompt(row, where)
        keys = [key for key in RESPONSE_KEYS if key in row]
        if "candidates" in row:  # (response, its candidate position, its policy)
            found = [(text, i, src) for i, (text, src) in enumerate(_candidates(row, where, 1))]
            columns = _columns(row, "candidates")
        elif len(keys) == 1:
            found = [(_response(row[keys[0]], f"{where} `{keys[0]}`"), None, None)]
            columns = _columns(row, keys[0])
        elif keys:
            raise UserError(
                f"{where} has both a `completion` and a `response`; keep the one to label."
            )
        else:
            raise UserError(
                f"{where} has no `candidates`, `completion` or `response`; give {expected}."
            )
        for response, candidate, source in found:
            if not (response.strip() if isinstance(response, str) else response):
                counts.empty += 1
            elif (key := item_id(prompt, response)) in seen:
                counts.same += 1
            else:
                seen.add(key)
                items.append(
                    Response(
                        id=key,
                        prompt=prompt,
                        response=response,
                        candidate=candidate,
                        source=source,
                        columns=columns,
                        row_id=row.get("id", number),
                    )
                )
    counts.items = len(items)
    if not items:
        raise UserError(
            f"in={path} has no non-empty response to label ({counts.empty} empty); sample with more "
            "max_new_tokens."
        )
    return items, counts


def _response(value: Any, where: str) -> str | list[dict]:
    """A completion row's response: text (as it is: a plain-text completion may start with the
    space that follows its prompt), or messages."""
    if isinstance(value, str):
        return value
    if _is_prompt(value):
        return value
    raise UserError(f"{where} must be text or a list of {{role, content}} messages.")


def shown_order(item: Item, labeler: str, seed: int) -> tuple[int, int]:
    """Which candidate is shown on the left (as A): drawn from (seed, labeller, item), so a restart
    shows an item the same way and two labellers see it independently."""
    first, second = item.candidates
    swap = random.Random(f"{seed}:{labeler}:{item.id}").random() < 0.5
    return (second, first) if swap else (first, second)
