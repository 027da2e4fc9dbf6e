"""Loading, formats, chat templates, loss masks, packing and collation.

Sources: a shipped name (`demo-sft`, `demo-prompts`), a local .json/.jsonl/.parquet file, or a hub
dataset id. SFT formats: `messages` (chat; loss on assistant turns only) or `prompt` + `completion`
(plain text or message lists; loss on the completion only, EOS appended to plain text). Masks come
from character offsets of the rendered text mapped onto token offsets, never from string search.
"""

from __future__ import annotations

import functools
import json
import math
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from rlhf_cli import chat, files
from rlhf_cli.schema import ROLES, DataConfig, UserError

IGNORE_INDEX = -100
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")


# ---------------------------------------------------------------- sources
def shipped_names() -> list[str]:
    root = Path(str(resources.files("rlhf_cli.datasets")))
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "train.jsonl").is_file())


def demo_note(path: str) -> str:
    """What a stage adds to its data line when it runs on a shipped demo set."""
    if path in shipped_names():
        return f" ({path} is the demo data shipped with rlhf; your own: data=path/to/file.jsonl)"
    return ""


def _shipped_file(name: str, split: str) -> Path:
    return Path(str(resources.files("rlhf_cli.datasets"))) / name / f"{split}.jsonl"


class Rows(list):
    """Dataset rows that remember where each came from ("line 6" of a .jsonl file), so an error
    about a row names its place in the file even after the rows were shuffled and split."""

    def __init__(self, rows=(), places: list[str] | None = None):
        super().__init__(rows)
        self.places = places if places is not None else [f"row {i + 1}" for i in range(len(self))]

    def pick(self, indices) -> Rows:
        return Rows([self[i] for i in indices], [self.places[i] for i in indices])


def row_place(rows: list[dict], index: int, source: str) -> str:
    """'<source> line 6' (or 'row 6'): where rows[index] is in its file."""
    place = rows.places[index] if isinstance(rows, Rows) else f"row {index + 1}"
    return f"{source} {place}"


def read_json_rows(path: Path) -> Rows:
    """Rows of a .json (array of objects) or .jsonl file; a bad line is reported by number."""
    text = files.read_utf8(path)
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = Rows(json.loads(text))
        except json.JSONDecodeError as err:
            raise UserError(f"{path} is not valid JSON (line {err.lineno}: {err.msg}).") from None
        for index, row in enumerate(rows):
            if not isinstance(row, dict):
                raise UserError(
                    f"{row_place(rows, index, str(path))} is a {type(row).__name__}, not a JSON "
                    "object with named fields."
                )
        return rows
    numbered = files.read_jsonl(path, text)
    return Rows([row for _, row in numbered], [f"line {number}" for number, _ in numbered])


def _read_local(path: Path) -> Rows:
    if not path.is_file():
        raise UserError(
            f"dataset file {path} does not exist; give a .json/.jsonl/.parquet file, a hub id or one of: "
            + ", ".join(shipped_names())
            + "."
        )
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return Rows(pq.read_table(path).to_pylist())
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise UserError(
                f"{path} could not be read as Parquet ({type(err).__name__}: {str(err)[:120]})."
            ) from None
    return read_json_rows(path)


def _read_hub(path: str, subset: str | None, split: str) -> Rows:
    import datasets

    try:
        return Rows(datasets.load_dataset(path, subset, split=split).to_list())
    except Exception as err:  # datasets raises many types for a missing dataset or split
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"data.path={path!r} is not a shipped dataset ({', '.join(shipped_names())}), not a local "
            f".json/.jsonl/.parquet file, and could not be loaded from the hub: {first}"
        ) from None


def load_rows(
    path: str, subset: str | None = None, split: str = "train", allow_eval: bool = False
) -> Rows:
    """Rows from a shipped name, a local file or a hub dataset id."""
    if path in shipped_names():
        if split == "eval" and not allow_eval:
            raise UserError(
                f"data.split=eval would train on {path}'s held-out rows; use data.split=train."
            )
        file = _shipped_file(path, split)
        if not file.is_file():
            raise UserError(
                f"the shipped dataset {path} has no split {split!r}; it has train and eval."
            )
        return read_json_rows(file)
    local = Path(path).expanduser()
    if local.is_dir():
        raise UserError(
            f"data path {path} is a folder; give a .json/.jsonl/.parquet file in it, or a hub dataset id."
        )
    if local.exists() or local.suffix in LOCAL_SUFFIXES:
        return _read_local(local)
    return _read_hub(path, subset, split)


def load_splits(data: DataConfig, seed: int) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows). Held-out rows come from eval_path / eval_split, the shipped eval
    file, or else `eval_size` rows held out of the training rows with a fixed shuffle."""
    rows = load_rows(data.path, data.subset, data.split)
    if not rows:
        raise UserError(f"the dataset {data.path} (split {data.split}) has no rows.")
    if data.eval_path:
        held_out = load_rows(data.eval_path)
    elif data.eval_split:
        if data.path in shipped_names() or Path(data.path).expanduser().exists():
            raise UserError(
                f"data.eval_split={data.eval_split} names a hub split, but {data.path} is a local or shipped "
                "dataset; give the held-out file as data.eval_path=FILE (or use data.eval_size)."
            )
        held_out = load_rows(data.path, data.subset, data.eval_split)
    elif data.path in shipped_names():
        held_out = load_rows(data.path, split="eval", allow_eval=True)
    else:
        n_eval = (
            int(round(data.eval_size * len(rows))) if data.eval_size < 1 else int(data.eval_size)
        )
        if n_eval >= len(rows):
            raise UserError(
                f"data.eval_size={data.eval_size} would hold out all {len(rows)} rows; use a smaller value."
            )
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        held_out = rows.pick(order[:n_eval])
        rows = rows.pick(sorted(order[n_eval:]))
    if data.max_rows:
        rows = rows.pick(range(min(data.max_rows, len(rows))))
    return rows, held_out


def load_examples(config, tokenizer, console, stage: str, tokenize=None, what: str = "pairs"):
    """The training and held-out rows of `config.data`, tokenized by `tokenize` (default:
    preference pairs for `rlhf <stage>`): (train, held out, train stats, held-out stats), with the
    counts printed."""
    tokenize = tokenize or functools.partial(tokenize_preferences, stage=f"rlhf {stage}")
    train_rows, eval_rows = load_splits(config.data, config.seed)
    train, train_stats = tokenize(train_rows, tokenizer, config.data, config.data.path)
    held_out, eval_stats = [], TokenizeStats()
    if eval_rows:
        held_out, eval_stats = tokenize(
            eval_rows, tokenizer, config.data, f"{config.data.path} (held out)"
        )
    console.print(
        f"{what}: train {train_stats.summary()}; held out {eval_stats.summary()}"
        f"{demo_note(config.data.path)}"
    )
    return train, held_out, train_stats, eval_stats


# ---------------------------------------------------------------- formats
SFT_NEEDS = "`{messages}` (chat), `{conversations}` (ShareGPT) or `{prompt}` + `{completion}`"
PAIRS_NEED = (
    "preference pairs: `{prompt}` + `{chosen}` + `{rejected}` (text or messages), or `{chosen}` + "
    "`{rejected}` alone as whole conversations sharing their start"
)


def _needs(template: str, columns) -> str:
    return template.format(**vars(columns))


def kind_of_rows(row: dict, columns) -> str | None:
    """What a row looks like, to tell a user who gave a stage the wrong kind of data."""
    if columns.chosen in row and columns.rejected in row:
        return "preference pairs"
    if isinstance(row.get("label"), bool) and (
        columns.completion in row or columns.messages in row
    ):
        return "unpaired feedback (prompt/completion with a good/bad `label`, KTO's format)"
    if columns.messages in row or columns.conversations in row or columns.completion in row:
        return "SFT demonstrations"
    if columns.prompt in row:
        return "prompts without responses"
    return None


def detect_format(rows: list[dict], data: DataConfig, source: str) -> str:
    """SFT rows: `messages` (chat), `conversations` (ShareGPT) or `prompt` + `completion`."""
    columns, fmt = data.columns, data.format
    first = rows[0]
    kind = kind_of_rows(first, columns)
    if fmt == "auto" and kind is not None and kind.startswith(("preference", "unpaired")):
        raise UserError(
            f"{source} holds {kind}, which rlhf sft cannot train on (it would learn the rejected "
            f"responses too); it needs {_needs(SFT_NEEDS, columns)} (preference pairs train rlhf "
            "reward, dpo and kto; unpaired feedback trains rlhf kto)."
        )
    if fmt == "messages" or (fmt == "auto" and columns.messages in first):
        _require_columns(first, [columns.messages], source, "messages")
        return "messages"
    if fmt == "sharegpt" or (fmt == "auto" and columns.conversations in first):
        _require_columns(first, [columns.conversations], source, "ShareGPT")
        return "sharegpt"
    if fmt == "prompt_completion" or (fmt == "auto" and columns.prompt in first):
        _require_columns(first, [columns.prompt, columns.completion], source, "prompt/completion")
        return "prompt_completion"
    raise UserError(
        f"{source} has columns {sorted(first)}, but SFT needs {_needs(SFT_NEEDS, columns)}; "
        "rename yours with data.columns.<name>=<your column>."
    )


def _require_columns(row: dict, names: list[str], source: str, what: str) -> None:
    missing = [n for n in names if n not in row]
    if missing:
        raise UserError(
            f"{source} is missing column(s) {missing} for the {what} format (it has {sorted(row)}); "
            "map yours with data.columns.<name>=<your column>."
        )


def _text_or_messages(value: Any, where: str, roles: tuple[str, ...]) -> str | list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise UserError(f"{where} is empty; every row needs some text there.")
        return value
    return chat.check_messages(value, where, roles)


# ---------------------------------------------------------------- tokenization and masks
@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] = field(default_factory=list)  # empty: 0..n-1

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class TokenizeStats:
    rows: int = 0
    kept: int = 0
    truncated: int = 0
    response_cut: int = 0  # preference data: truncated ones that lost response tokens too
    dropped_too_long: int = 0
    dropped_no_target: int = 0

    def summary(self) -> str:
        lost = f" ({self.response_cut} of them into the response)" if self.response_cut else ""
        return (
            f"{self.kept}/{self.rows} examples kept; {self.truncated} truncated{lost}, "
            f"{self.dropped_too_long} dropped as too long, {self.dropped_no_target} dropped with no trainable token"
        )


def tokenize_with_spans(
    tokenizer, text: str, spans: list[tuple[int, int]], add_special_tokens: bool
) -> tuple[list[int], list[int]]:
    """Token ids and labels: a token is a target when its character range overlaps a span."""
    encoded = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    for t, (start, end) in enumerate(encoded["offset_mapping"]):
        if end > start and any(start < s_end and end > s_start for s_start, s_end in spans):
            labels[t] = ids[t]
    return ids, labels


def tokenize_prompt_completion(
    tokenizer, prompt: str | list[dict], completion: str | list[dict], where: str
) -> tuple[list[int], list[int]]:
    """Ids and labels for a prompt and its completion; only the completion's assistant turns are
    targets.

    A conversation (either side a message list; a text prompt is then one user turn, a text
    completion one assistant turn) is rendered with the chat template; plain text is concatenated
    and EOS appended so the model learns to stop."""
    if isinstance(prompt, list) or isinstance(completion, list):
        prompt = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        turns = (
            completion
            if isinstance(completion, list)
            else [{"role": "assistant", "content": completion}]
        )
        messages = prompt + turns
        text, spans = chat.assistant_spans(tokenizer, messages)
        answered = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        spans = [span for i, span in zip(answered, spans, strict=True) if i >= len(prompt)]
        return tokenize_with_spans(tokenizer, text, spans, add_special_tokens=False)
    text = prompt + completion
    ids, labels = tokenize_with_spans(
        tokenizer, text, [(len(prompt), len(text))], add_special_tokens=True
    )
    # the model must learn to stop: a trained EOS at the end (the tokenizer may have added an
    # untrained one itself)
    if not ids or ids[-1] != tokenizer.eos_token_id:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    labels[-1] = tokenizer.eos_token_id
    return ids, labels


def tokenize_unfinished(tokenizer, prompt: str | list[dict], response: str) -> list[int]:
    """Ids of a response that was cut before it ended (at max_new_tokens), as the policy wrote
    it: the prompt as generation starts from it (`encode_prompt`), then the response's tokens,
    with no text closing the turn and no EOS. `tokenize_prompt_completion` would close the turn,
    and a reward model would score the cut response as a finished one."""
    return (
        encode_prompt(tokenizer, prompt)
        + tokenizer(response, add_special_tokens=False)["input_ids"]
    )


def tokenize_sft_row(
    row: dict, fmt: str, tokenizer, data: DataConfig, where: str
) -> tuple[list[int], list[int]]:
    columns, roles = data.columns, data.roles
    if fmt in ("messages", "sharegpt"):
        if fmt == "messages":
            messages = chat.check_messages(
                row.get(columns.messages), f"{where} `{columns.messages}`", roles
            )
        else:
            messages = sharegpt(row, columns, where, roles)
        if not any(m["role"] == "assistant" for m in messages):
            return [], []
        text, spans = chat.assistant_spans(tokenizer, messages)
        return tokenize_with_spans(tokenizer, text, spans, add_special_tokens=False)
    prompt = _text_or_messages(row.get(columns.prompt), f"{where} `{columns.prompt}`", roles)
    completion = _text_or_messages(
        row.get(columns.completion), f"{where} `{columns.completion}`", roles
    )
    return tokenize_prompt_completion(tokenizer, prompt, completion, where)


def _fit(
    ids: list[int], labels: list[int], data: DataConfig, stats: TokenizeStats
) -> Example | None:
    """Apply max_length (truncate or drop, counted in `stats`); None when the example is unusable."""
    if len(ids) > data.max_length:
        if data.truncation == "drop":
            stats.dropped_too_long += 1
            return None
        ids, labels = ids[: data.max_length], labels[: data.max_length]
        stats.truncated += 1
    if all(label == IGNORE_INDEX for label in labels):
        stats.dropped_no_target += 1
        return None
    return Example(ids, labels)


def _require_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(
            "this tokenizer has no fast (Rust) version, which loss masks need for token offsets."
        )


def tokenize_sft(
    rows: list[dict], tokenizer, data: DataConfig, source: str
) -> tuple[list[Example], TokenizeStats]:
    _require_fast(tokenizer)
    fmt = detect_format(rows, data, source)
    stats = TokenizeStats(rows=len(rows))
    examples = []
    for index, row in enumerate(rows):
        ids, labels = tokenize_sft_row(row, fmt, tokenizer, data, row_place(rows, index, source))
        example = _fit(ids, labels, data, stats)
        if example is not None:
            examples.append(example)
    return examples, _finish(stats, len(examples), source, data)


def _finish(stats: TokenizeStats, kept: int, source: str, data: DataConfig) -> TokenizeStats:
    stats.kept = kept
    if not kept:
        raise UserError(
            f"no usable example in {source}: {stats.summary()}; raise data.max_length "
            f"(now {data.max_length}) or check the data."
        )
    return stats


# ---------------------------------------------------------------- preference pairs
@dataclass
class PairExample:
    chosen: Example
    rejected: Example
    margin: float = 0.0
    index: int = 0  # position among the kept pairs (keys cached reference log-probs)


def keep_end(
    ids: list[int], labels: list[int], max_length: int, keep_first: int = 0
) -> tuple[list[int], list[int], bool]:
    """The truncation rule for preference data (rlhf reward, rlhf dpo and every reward-model
    scorer): a sequence longer than max_length loses tokens from its start, after its first
    `keep_first` tokens (a BOS), so the prompt's start goes first and the response's end (the
    token a reward model scores, the EOS a policy must learn) is never cut before it. Returns
    (ids, labels, whether response tokens were cut too)."""
    excess = len(ids) - max_length
    if excess <= 0:
        return ids, labels, False
    first_target = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(ids))
    cut = slice(keep_first, keep_first + excess)
    kept = lambda seq: seq[: cut.start] + seq[cut.stop :]  # noqa: E731
    return kept(ids), kept(labels), cut.stop > first_target


def leading_bos(tokenizer, ids: list[int]) -> int:
    """1 when `ids` starts with the tokenizer's BOS (which truncation keeps), else 0."""
    return int(
        bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id
    )


def _same_turns(a: list[dict], b: list[dict]) -> bool:
    return [(m["role"], m["content"]) for m in a] == [(m["role"], m["content"]) for m in b]


def _common_turns(chosen: list[dict], rejected: list[dict]) -> int:
    n = 0
    while n < min(len(chosen), len(rejected)) and _same_turns(
        chosen[n : n + 1], rejected[n : n + 1]
    ):
        n += 1
    return n


HH_ASSISTANT = "\n\nAssistant:"  # how an assistant turn starts in HH-RLHF's transcripts


def _common_text(chosen: str, rejected: str) -> int:
    """Where the prompt of two transcripts sharing their start ends: after the last
    "\\n\\nAssistant:" of the shared start (in HH-RLHF both responses may begin alike, "I ..."),
    or else at the whitespace before the first word that differs."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    turn = chosen.rfind(HH_ASSISTANT, 0, n)
    if turn != -1:  # the prompt ends where the last assistant turn's text starts
        return turn + len(HH_ASSISTANT)
    while n and not chosen[n - 1].isspace():
        n -= 1
    while n and chosen[n - 1].isspace():
        n -= 1
    return n


def sharegpt(row: dict, columns, where: str, roles: tuple[str, ...] = ROLES) -> list[dict]:
    """A ShareGPT row's turns as messages, its `system` column (LLaMA-Factory's) first."""
    messages = chat.from_sharegpt(
        row.get(columns.conversations), f"{where} `{columns.conversations}`", roles
    )
    system = row.get("system")
    if isinstance(system, str) and system.strip() and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    return messages


def pair_parts(row: dict, columns, where: str, roles: tuple[str, ...] = ROLES):
    """(prompt, chosen, rejected) of a preference row in any of the shapes people bring:
    - an explicit prompt (text or messages) with chosen/rejected (text or messages);
    - chosen/rejected message lists that repeat the prompt's turns (UltraFeedback-binarized:
      the prompt is a string, the responses [user, assistant]);
    - no prompt column: chosen/rejected are whole conversations (or HH-RLHF's text transcripts)
      sharing their start, which is the prompt;
    - ShareGPT (LLaMA-Factory): `conversations` turns, chosen/rejected {from, value} turns."""
    if columns.conversations in row and columns.prompt not in row:
        prompt = sharegpt(row, columns, where, roles)
        return (
            prompt,
            chat.from_sharegpt(row.get(columns.chosen), f"{where} `{columns.chosen}`", roles),
            chat.from_sharegpt(row.get(columns.rejected), f"{where} `{columns.rejected}`", roles),
        )
    chosen = _text_or_messages(row.get(columns.chosen), f"{where} `{columns.chosen}`", roles)
    rejected = _text_or_messages(row.get(columns.rejected), f"{where} `{columns.rejected}`", roles)
    if columns.prompt in row:
        prompt = _text_or_messages(row[columns.prompt], f"{where} `{columns.prompt}`", roles)
        as_turn = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        repeated = [
            isinstance(side, list)
            and len(side) > len(as_turn)
            and _same_turns(side[: len(as_turn)], as_turn)
            for side in (chosen, rejected)
        ]
        if all(repeated):
            return as_turn, chosen[len(as_turn) :], rejected[len(as_turn) :]
        if isinstance(chosen, list) or isinstance(rejected, list):  # a conversation: one user turn
            return as_turn, chosen, rejected
        return prompt, chosen, rejected
    if isinstance(chosen, list) and isinstance(rejected, list):
        n = _common_turns(chosen, rejected)
        if 0 < n < min(len(chosen), len(rejected)):
            return chosen[:n], chosen[n:], rejected[n:]
    elif isinstance(chosen, str) and isinstance(rejected, str):
        n = _common_text(chosen, rejected)
        if n and chosen[n:].strip() and rejected[n:].strip():
            return chosen[:n], chosen[n:], rejected[n:]
    raise UserError(
        f"{where} has no `{columns.prompt}` column, and `{columns.chosen}`/`{columns.rejected}` do "
        "not share a start to take as the prompt; add a prompt column."
    )


def _require_pairs(row: dict, columns, source: str, stage: str) -> None:
    """A preference stage given another kind of data: one sentence naming what it needs."""
    if columns.chosen in row or columns.rejected in row:
        _require_columns(row, [columns.chosen, columns.rejected], source, "preference")
        return
    kind = kind_of_rows(row, columns)
    looks = f"holds {kind}" if kind else f"has columns {sorted(row)}"
    fix = (
        "train it with rlhf kto"
        if kind and kind.startswith("unpaired")
        else "map your columns with data.columns.<name>=<your column>"
    )
    raise UserError(f"{source} {looks}, but {stage} needs {_needs(PAIRS_NEED, columns)}; {fix}.")


def tokenize_preferences(
    rows: list[dict], tokenizer, data: DataConfig, source: str, stage: str = "this stage"
) -> tuple[list[PairExample], TokenizeStats]:
    """Preference rows -> tokenized pairs (`pair_parts` lists the shapes). Each side longer than
    data.max_length is cut from its start (`keep_end`) or, with data.truncation=drop, the pair is
    dropped; a pair is kept only when both sides keep at least one response token."""
    _require_fast(tokenizer)
    columns = data.columns
    _require_pairs(rows[0], columns, source, stage)
    stats = TokenizeStats(rows=len(rows))
    pairs = []
    for index, row in enumerate(rows):
        where = row_place(rows, index, source)
        prompt, chosen, rejected = pair_parts(row, columns, where, data.roles)
        margin = row.get(columns.margin, 0.0)
        if (
            isinstance(margin, bool)
            or not isinstance(margin, (int, float))
            or not math.isfinite(margin)
        ):
            raise UserError(f"{where} `{columns.margin}` must be a finite number, got {margin!r}.")
        sides, truncated, response_cut = [], False, False
        for response in (chosen, rejected):
            ids, labels = tokenize_prompt_completion(tokenizer, prompt, response, where)
            truncated |= len(ids) > data.max_length
            ids, labels, cut = keep_end(ids, labels, data.max_length, leading_bos(tokenizer, ids))
            response_cut |= cut
            sides.append(Example(ids, labels))
        # counted per pair: dropped or truncated when either side is
        if truncated and data.truncation == "drop":
            stats.dropped_too_long += 1
        elif any(all(label == IGNORE_INDEX for label in side.labels) for side in sides):
            stats.dropped_no_target += 1
        else:
            stats.truncated += truncated
            stats.response_cut += response_cut
            pairs.append(PairExample(sides[0], sides[1], float(margin), len(pairs)))
    return pairs, _finish(stats, len(pairs), source, data)


# ---------------------------------------------------------------- unpaired feedback (KTO)
UNPAIRED_NEED = (
    "unpaired feedback: `{prompt}` + `{completion}` (text or messages) + a true/false `{label}`, "
    "or preference pairs (each pair gives one desirable and one undesirable row)"
)


@dataclass
class UnpairedExample:
    example: Example  # prompt + completion; the completion's tokens are the targets
    prompt_length: int  # tokens before the first target (the prompt and any assistant header)
    desirable: bool
    index: int = 0

    @property
    def input_ids(self) -> list[int]:
        return self.example.input_ids


def _require_unpaired(row: dict, columns, source: str, stage: str) -> bool:
    """True when the rows are preference pairs (split into two rows each); one sentence when they
    are neither pairs nor unpaired feedback."""
    if columns.chosen in row and columns.rejected in row:
        return True
    if columns.completion in row and columns.label in row and columns.prompt in row:
        return False
    kind = kind_of_rows(row, columns)
    looks = f"holds {kind}" if kind else f"has columns {sorted(row)}"
    raise UserError(
        f"{source} {looks}, but {stage} needs {_needs(UNPAIRED_NEED, columns)}; map your columns "
        "with data.columns.<name>=<your column>."
    )


def tokenize_unpaired(
    rows: list[dict], tokenizer, data: DataConfig, source: str, stage: str = "rlhf kto"
) -> tuple[list[UnpairedExample], TokenizeStats]:
    """Unpaired feedback rows (`prompt`, `completion`, boolean `label`) -> tokenized rows; preference
    pairs give two rows each (chosen desirable, rejected undesirable). Truncation as for pairs
    (`keep_end`: the prompt's start goes first); a row is kept only with a response token left."""
    _require_fast(tokenizer)
    columns = data.columns
    paired = _require_unpaired(rows[0], columns, source, stage)
    stats = TokenizeStats(rows=len(rows))
    kept: list[UnpairedExample] = []
    for index, row in enumerate(rows):
        where = row_place(rows, index, source)
        if paired:
            _require_pairs(row, columns, source, stage)
            prompt, chosen, rejected = pair_parts(row, columns, where, data.roles)
            items = [(chosen, True), (rejected, False)]
        else:
            _require_unpaired(row, columns, where, stage)
            label = row[columns.label]
            if not isinstance(label, bool):
                raise UserError(
                    f"{where} `{columns.label}` must be true (desirable) or false (undesirable), "
                    f"got {label!r}."
                )
            prompt = _text_or_messages(
                row[columns.prompt], f"{where} `{columns.prompt}`", data.roles
            )
            completion = _text_or_messages(
                row[columns.completion], f"{where} `{columns.completion}`", data.roles
            )
            items = [(completion, label)]
        for completion, desirable in items:
            ids, labels = tokenize_prompt_completion(tokenizer, prompt, completion, where)
            truncated = len(ids) > data.max_length
            ids, labels, cut = keep_end(ids, labels, data.max_length, leading_bos(tokenizer, ids))
            targets = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
            if truncated and data.truncation == "drop":
                stats.dropped_too_long += 1
            elif not targets:
                stats.dropped_no_target += 1
            else:
                stats.truncated += truncated
                stats.response_cut += cut
                kept.append(UnpairedExample(Example(ids, labels), targets[0], desirable, len(kept)))
    stats.rows = len(kept) + stats.dropped_too_long + stats.dropped_no_target
    return kept, _finish(stats, len(kept), source, data)


def mismatched(rows: list[UnpairedExample], max_length: int, bos_id: int | None) -> list[Example]:
    """KTO's KL pairs: row i's prompt with row i-1's completion (cyclically, so the completions are
    the batch's own, each paired with another prompt: TRL's rotation by one). Token ids are joined
    as they are; a sequence over max_length loses its prompt's start (`keep_end`)."""
    joined = []
    for row, other in zip(rows, rows[-1:] + rows[:-1], strict=True):
        ids = row.input_ids[: row.prompt_length] + other.input_ids[other.prompt_length :]
        labels = [IGNORE_INDEX] * row.prompt_length + other.example.labels[other.prompt_length :]
        keep_first = int(bos_id is not None and bool(ids) and ids[0] == bos_id)
        ids, labels, _ = keep_end(ids, labels, max_length, keep_first)
        joined.append(Example(ids, labels))
    return joined


def collate_unpaired(
    rows: list[UnpairedExample], kl_pairs: list[Example], pad_token_id: int
) -> dict:
    """One micro-batch of KTO rows: the rows themselves ("rows"), their KL pairs ("kl", from
    `mismatched`), the (B,) labels ("desirable") and positions ("index")."""
    return {
        "rows": collate([r.example for r in rows], pad_token_id, packed=False),
        "kl": collate(kl_pairs, pad_token_id, packed=False),
        "desirable": torch.tensor([r.desirable for r in rows], dtype=torch.bool),
        "index": torch.tensor([r.index for r in rows], dtype=torch.long),
    }


# ---------------------------------------------------------------- prompts (PPO, eval)
@dataclass
class PromptExample:
    prompt: str | list[dict]  # as in the data: plain text or chat messages
    input_ids: list[int]  # rendered with the generation prompt, ready to generate from
    index: int = 0
    row: dict | None = None  # the data row (reward functions and judges may read its columns)


def prompt_text(prompt: str | list[dict]) -> str:
    """A prompt for display: plain text, or the content of its last message."""
    return prompt[-1]["content"] if isinstance(prompt, list) else prompt


def encode_prompt(tokenizer, prompt: str | list[dict]) -> list[int]:
    """Token ids to generate a reply from: chat messages rendered with the chat template and its
    generation prompt; plain text with the tokenizer's special tokens (e.g. BOS)."""
    if isinstance(prompt, list):
        return tokenizer(
            chat.render(tokenizer, prompt, add_generation_prompt=True), add_special_tokens=False
        )["input_ids"]
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def _prompt_of(row: dict, columns, where: str, roles: tuple[str, ...]) -> str | list[dict]:
    """The prompt of a row: its `prompt` column; or a conversation (`messages`, ShareGPT
    `conversations`) without its last assistant turn; or the shared start of a preference pair."""
    if columns.chosen in row and columns.rejected in row:  # as reward and dpo render the pair
        return pair_parts(row, columns, where, roles)[0]
    if columns.prompt in row:
        return _text_or_messages(row[columns.prompt], f"{where} `{columns.prompt}`", roles)
    if columns.messages in row:
        messages = chat.check_messages(
            row[columns.messages], f"{where} `{columns.messages}`", roles
        )
    else:
        messages = sharegpt(row, columns, where, roles)
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages:
        raise UserError(f"{where} has no turn before the assistant's reply.")
    return messages


def tokenize_prompts(
    rows: list[dict], tokenizer, data: DataConfig, source: str
) -> tuple[list[PromptExample], TokenizeStats]:
    """Prompt rows (`prompt`: text or messages; a conversation, `messages` or ShareGPT
    `conversations`, whose last assistant turn is dropped; or a preference pair, whose prompt is
    taken as rlhf reward and rlhf dpo take it) -> token ids to generate from. Prompts longer than data.max_length are dropped (cutting one would
    lose the question or the generation prompt); the count is reported."""
    columns = data.columns
    usable = (columns.prompt, columns.messages, columns.conversations)
    pair = (columns.chosen, columns.rejected)
    if not any(c in rows[0] for c in (*usable, *pair)):
        raise UserError(
            f"{source} has columns {sorted(rows[0])}, but prompts need `{columns.prompt}` (text or "
            f"messages), `{columns.messages}` or `{columns.conversations}`; rename yours with "
            "data.columns.prompt=<your column>."
        )
    stats = TokenizeStats(rows=len(rows))
    prompts = []
    for index, row in enumerate(rows):
        where = row_place(rows, index, source)
        if not any(c in row for c in usable) and not all(c in row for c in pair):
            raise UserError(
                f"{where} has none of the columns {', '.join(f'`{c}`' for c in usable)}, nor "
                f"`{columns.chosen}` and `{columns.rejected}`."
            )
        prompt = _prompt_of(row, columns, where, data.roles)
        ids = encode_prompt(tokenizer, prompt)
        if len(ids) > data.max_length:
            stats.dropped_too_long += 1
            continue
        prompts.append(PromptExample(prompt, ids, len(prompts), row))
    return prompts, _finish(stats, len(prompts), source, data)


def environment_rows(
    rows: list[dict], tokenizer, data: DataConfig, source: str
) -> tuple[list[PromptExample], TokenizeStats]:
    """Rows for an environment (env=...): each row as it is, for the environment's reset(row) to
    build the prompt from; nothing is tokenised here (the episode does it)."""
    stats = TokenizeStats(rows=len(rows))
    examples = [PromptExample(None, [], index, row) for index, row in enumerate(rows)]
    return examples, _finish(stats, len(examples), source, data)


# ---------------------------------------------------------------- packing and batches
def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Greedy packing in order: examples are concatenated into rows of at most max_length tokens.
    Position ids restart at 0 for each example (the model then attends only within an example), and
    the label at each example's first token is IGNORE_INDEX (no prediction across examples)."""
    rows: list[Example] = []
    current = Example([], [], [])
    for example in examples:
        if current.input_ids and len(current) + len(example) > max_length:
            rows.append(current)
            current = Example([], [], [])
        current.input_ids += example.input_ids
        current.labels += [IGNORE_INDEX] + example.labels[1:]
        current.position_ids += list(range(len(example)))
    if current.input_ids:
        rows.append(current)
    return rows


def collate(batch: list[Example], pad_token_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row. Padded rows get an attention mask; packed rows get position ids
    and no attention mask: transformers then builds a block-diagonal causal mask from them (only
    with use_cache=False, which the training forward passes). The padding forms its own block and
    carries no labels."""
    longest = max(len(ex) for ex in batch)
    input_ids = torch.full((len(batch), longest), pad_token_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
    position_ids = torch.zeros((len(batch), longest), dtype=torch.long)
    for i, ex in enumerate(batch):
        n = len(ex)
        input_ids[i, :n] = torch.tensor(ex.input_ids)
        labels[i, :n] = torch.tensor(ex.labels)
        attention_mask[i, :n] = 1
        position_ids[i, :n] = torch.tensor(ex.position_ids or list(range(n)))
        position_ids[i, n:] = torch.arange(longest - n)
    out = {"input_ids": input_ids, "labels": labels}
    if packed:
        out["position_ids"] = position_ids
    else:
        out["attention_mask"] = attention_mask
    out["num_real_tokens"] = attention_mask.sum()
    return out


def collate_pairs(pairs: list[PairExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One batch of 2B rows, the B chosen sequences first, then the B rejected ones (one forward pass
    scores both), plus the (B,) margins."""
    batch = collate(
        [p.chosen for p in pairs] + [p.rejected for p in pairs], pad_token_id, packed=False
    )
    batch["margin"] = torch.tensor([p.margin for p in pairs], dtype=torch.float32)
    batch["index"] = torch.tensor([p.index for p in pairs], dtype=torch.long)
    return batch


# segments of a shared-prefix row (collate_shared_prefix)
PAD, PREFIX, CHOSEN, REJECTED = -1, 0, 1, 2


def shared_prefix_length(chosen: list[int], rejected: list[int]) -> int:
    """How many leading tokens two sequences share, leaving each at least its last token."""
    limit = min(len(chosen), len(rejected)) - 1
    n = 0
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    return n


def collate_shared_prefix(pairs: list[PairExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One row per pair: the tokens chosen and rejected share (the prompt), then the rest of the
    chosen sequence, then the rest of the rejected one, right-padded. `segments` says which part each
    position is (PREFIX, CHOSEN, REJECTED, PAD), and position ids restart after the prefix for both
    continuations, so with an attention mask that keeps REJECTED from seeing CHOSEN
    (`modeling.shared_prefix_mask`) every token sees exactly what it sees in its own sequence. The
    prompt then runs once per pair instead of twice. `last` holds the (B, 2) positions of the
    chosen and rejected sequences' last tokens."""
    rows = []
    for pair in pairs:
        chosen, rejected = pair.chosen.input_ids, pair.rejected.input_ids
        n = shared_prefix_length(chosen, rejected)
        rows.append((chosen[:n], chosen[n:], rejected[n:]))
    longest = max(sum(map(len, row)) for row in rows)
    input_ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)  # (B, T)
    position_ids = torch.zeros((len(rows), longest), dtype=torch.long)
    segments = torch.full((len(rows), longest), PAD, dtype=torch.long)
    last = torch.zeros((len(rows), 2), dtype=torch.long)
    for i, (prefix, chosen, rejected) in enumerate(rows):
        start = 0
        for segment, tokens in ((PREFIX, prefix), (CHOSEN, chosen), (REJECTED, rejected)):
            end = start + len(tokens)
            input_ids[i, start:end] = torch.tensor(tokens, dtype=torch.long)
            segments[i, start:end] = segment
            first = 0 if segment == PREFIX else len(prefix)
            position_ids[i, start:end] = torch.arange(first, first + len(tokens))
            start = end
        last[i] = torch.tensor([len(prefix) + len(chosen) - 1, start - 1])
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "segments": segments,
        "last": last,
        "margin": torch.tensor([p.margin for p in pairs], dtype=torch.float32),
        "index": torch.tensor([p.index for p in pairs], dtype=torch.long),
    }


class BatchStream:
    """Micro-batches over a list, epoch after epoch, each epoch in its own shuffled order.
    The position (epoch, index) is all that resuming needs. With `drop_last` every batch is full
    (an epoch's remainder is skipped; the next epoch's shuffle puts other items last). With
    `lengths` (one per item) batches are length-grouped (`group_by_length`)."""

    def __init__(
        self,
        items: list,
        batch_size: int,
        seed: int,
        epoch: int = 0,
        index: int = 0,
        drop_last: bool = False,
        lengths: list[int] | None = None,
    ):
        self.items, self.batch_size, self.seed, self.lengths = items, batch_size, seed, lengths
        self.epoch, self.index = epoch, index
        self.per_epoch = batches_per_epoch(len(items), batch_size, drop_last)
        self.order = self._order()

    def _order(self) -> list[int]:
        """This epoch's order (`epoch_order`)."""
        return epoch_order(len(self.items), self.seed, self.epoch, self.lengths, self.batch_size)

    def next(self) -> list:
        if self.index >= self.per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
            self.order = self._order()
        picked = self.order[self.index * self.batch_size : (self.index + 1) * self.batch_size]
        self.index += 1
        return [self.items[i] for i in picked]

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def progress(self) -> float:
        """Epochs done, fractional."""
        return self.epoch + self.index / self.per_epoch


# batches per sorted group in length-grouped epochs (transformers' LengthGroupedSampler uses 50)
GROUP_BATCHES = 50


def epoch_order(
    num_items: int,
    seed: int,
    epoch: int,
    lengths: list[int] | None = None,
    batch_size: int = 1,
) -> list[int]:
    """The shuffled order of one epoch; a pure function of its arguments, so resuming needs only
    the epoch and the position within it. With `lengths`, length-grouped: the shuffled order is cut
    into groups of GROUP_BATCHES x batch_size items, each group is sorted by length and cut into
    batches, and the full batches are shuffled (an incomplete last batch stays last). A batch then
    holds items of similar length, so little of it is padding; which items meet in a batch is still
    random, within the limits of the sort."""
    generator = torch.Generator().manual_seed(seed * 1000003 + epoch)
    order = torch.randperm(num_items, generator=generator).tolist()
    if lengths is None or batch_size <= 1:
        return order
    full = num_items - num_items % batch_size
    span = GROUP_BATCHES * batch_size
    batches = []
    for start in range(0, full, span):
        group = sorted(order[start : min(start + span, full)], key=lambda i: lengths[i])
        batches += [group[k : k + batch_size] for k in range(0, len(group), batch_size)]
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [i for b in shuffled for i in batches[b]] + order[full:]


def item_length(item: Example | PairExample | PromptExample | UnpairedExample) -> int:
    """Tokens an item brings to a batch (what length grouping sorts by): a pair's two sequences."""
    if isinstance(item, PairExample):
        return len(item.chosen) + len(item.rejected)
    return len(item.input_ids)


def batches_per_epoch(num_items: int, batch_size: int, drop_last: bool = False) -> int:
    return num_items // batch_size if drop_last else math.ceil(num_items / batch_size)
