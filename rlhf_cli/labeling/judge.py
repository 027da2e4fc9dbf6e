"""A judge function instead of a person: it scores both responses of each item, the higher wins;
binary mode: it scores each response, good when the score reaches `threshold`."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from rlhf_cli.labeling.items import Item, Response
from rlhf_cli.labeling.log import AnswerLog, label_record, response_record
from rlhf_cli.schema import LabelConfig


def load_judge(spec: str, items: list[Item] | list[Response], source: Path):
    """The judge function, checked: importable, and the row columns it names are there."""
    from rlhf_cli.scoring import ProgrammaticReward

    judge = ProgrammaticReward(spec, "judge")
    judge.check_columns(items[0].columns, str(source))
    return judge


def judge_items(
    config: LabelConfig,
    judge,
    items: list[Item],
    log: AnswerLog,
    labeler: str,
    source: Path,
    console,
) -> Counter:
    """Score both responses of every item this judge has not answered with the judge function
    (prompts, responses, [row columns]) -> floats; the higher one wins, equal scores tie. Batches
    of `batch_size` items, each committed as it is scored."""
    done = {r["item"] for r in log.mine(labeler)}
    todo = [item for item in items if item.id not in done]
    answered: Counter = Counter()
    for start in range(0, len(todo), config.batch_size):
        batch = todo[start : start + config.batch_size]
        scores = judge.score(
            [item.prompt for item in batch for _ in range(2)],
            [text for item in batch for text in item.responses],
            [item.columns for item in batch for _ in range(2)],
        )
        records = []
        for index, item in enumerate(batch):
            first, second = scores[2 * index], scores[2 * index + 1]
            answer = "A" if first > second else "B" if second > first else "tie"
            records.append(
                label_record(
                    item,
                    labeler,
                    item.candidates,
                    answer,
                    source,
                    judge=config.judge,
                    scores=[first, second],
                )
            )
            answered[answer] += 1
        log.commit(records)
        console.print(f"judged {start + len(batch)} of {len(todo)} items", soft_wrap=True)
    return answered


def judge_responses(
    config: LabelConfig,
    judge,
    items: list[Response],
    log: AnswerLog,
    labeler: str,
    source: Path,
    console,
) -> Counter:
    """Binary mode: score every response this judge has not answered with the judge function
    (prompts, responses as text, [row columns]) -> floats; good when score >= `threshold`, else
    bad. A wrong count or a non-finite score stops with one sentence naming the judge. Batches of
    `batch_size` responses, each committed as it is scored."""
    done = {r["item"] for r in log.mine(labeler)}
    todo = [item for item in items if item.id not in done]
    answered: Counter = Counter()
    for start in range(0, len(todo), config.batch_size):
        batch = todo[start : start + config.batch_size]
        scores = judge.score(
            [item.prompt for item in batch],
            [item.text() for item in batch],
            [item.columns for item in batch],
        )
        records = []
        for item, score in zip(batch, scores, strict=True):
            answer = "good" if score >= config.threshold else "bad"
            records.append(
                response_record(item, labeler, answer, source, judge=config.judge, score=score)
            )
            answered[answer] += 1
        log.commit(records)
        console.print(f"judged {start + len(batch)} of {len(todo)} responses", soft_wrap=True)
    return answered
