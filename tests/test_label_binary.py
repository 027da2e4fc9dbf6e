"""`rlhf label mode=binary`: single responses labelled good or bad into KTO rows. The labeller
through a pseudo-terminal (good, bad, skip, undo, quit, Ctrl-C, restart, SIGKILL), a gold judge
and its threshold, --stats on two labellers' KTO files (Cohen's kappa, KTO weights), bad input."""

from __future__ import annotations

import json
import random
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
from test_sample_label import Terminal, read_rows

from rlhf_cli.labeling.items import load_responses
from rlhf_cli.labeling.log import AnswerLog, read_log, replay, response_record
from rlhf_cli.labeling.stats import kto_weights

from conftest import data_config, label_config, model_config, run_in_process
from tiny import write_jsonl

KTO_FIRST = ["prompt", "completion", "label", "labeler"]  # what rlhf kto reads, first in a row


# ---------------------------------------------------------------- helpers
def sample_rows(n: int) -> list[dict]:
    """n rows as rlhf sample writes them: two candidates "alpha i" / "beta i" to "Question i?"
    (so 2n items, in that order), the prompt data's `answer` column under `columns`."""
    return [
        {"id": i, "prompt": f"Question {i}?", "candidates": [{"text": f"alpha {i}", "source": "a"},
                                                             {"text": f"beta {i}", "source": "a"}],
         "columns": {"answer": f"alpha {i}"}, "provenance": {"sampling": {"n": 2}}}
        for i in range(n)
    ]  # fmt: skip


def response_on_screen(term: Terminal, number: int, total: int) -> str:
    """Wait for item `number` on screen; -> the response shown ("alpha 0", "beta 1", ...)."""
    screen = term.wait_for(f"item {number} of {total}", "to go", "[g] good")
    [shown] = re.findall(r"(?:alpha|beta) \d+", screen)  # the prompt says "Question i?" only
    return shown


def assert_kto_file(path: Path, tokenizer_model: Path) -> None:
    """`path` is a file rlhf kto reads as it is: its loader and tokenizer keep every row, with the
    row's label as the desirable flag."""
    from rlhf_cli import data, modeling

    rows = read_rows(path)
    tokenizer = modeling.load_tokenizer(model_config(str(tokenizer_model)))
    examples, stats = data.tokenize_unpaired(
        data.read_json_rows(path), tokenizer, data_config(path=str(path)), str(path)
    )
    assert stats.kept == len(rows) == len(examples)
    assert [example.desirable for example in examples] == [row["label"] for row in rows]


def labels(path: Path) -> list[tuple[str, bool]]:
    return [(row["completion"], row["label"]) for row in read_rows(path)]


# ---------------------------------------------------------------- the labeller on a terminal
def test_good_bad_skip_undo_quit_ctrl_c_and_restarts_continue(tmp_path):
    source = write_jsonl(tmp_path / "pairs.jsonl", sample_rows(2))
    out = tmp_path / "kto.jsonl"
    args = ["mode=binary", f"in={source}", f"out={out}", "labeler=alice"]
    term = Terminal(args, tmp_path)
    assert response_on_screen(term, 1, 4) == "alpha 0"
    assert "Question 0?" in term.screen() and "0/4 answered, 0 skipped, 4 to go" in term.screen()
    term.press("g")
    assert response_on_screen(term, 2, 4) == "beta 0"
    term.press("b")
    assert response_on_screen(term, 3, 4) == "alpha 1"
    term.press("s")
    assert response_on_screen(term, 4, 4) == "beta 1"
    assert "3/4 answered, 1 skipped, 1 to go" in term.screen()
    term.press("u")  # takes back the skip: item 3 again
    assert response_on_screen(term, 3, 4) == "alpha 1"
    assert "undid your answer to this item (skip)" in term.screen()
    term.press("G")  # keys are case-insensitive
    assert response_on_screen(term, 4, 4) == "beta 1"
    term.press("q")
    assert term.finish() == 0
    assert "alice: 3 of 4 items answered, 1 to go" in term.text()
    assert f"{out} holds 3 KTO rows" in term.text()

    rows = read_rows(out)
    assert [list(row)[:4] for row in rows] == [KTO_FIRST] * 3
    assert labels(out) == [("alpha 0", True), ("beta 0", False), ("alpha 1", True)]
    assert [row["prompt"] for row in rows] == ["Question 0?", "Question 0?", "Question 1?"]
    assert [row["answer"] for row in rows] == ["alpha 0", "alpha 0", "alpha 1"]  # input column
    assert [row["source"]["candidate"] for row in rows] == [0, 1, 0]
    assert {row["labeler"] for row in rows} == {"alice"}
    assert not any("provenance" in row or "columns" in row for row in rows)
    log = read_log(tmp_path / "kto.jsonl.log.jsonl")
    assert [r.get("answer", r["event"]) for r in log] == ["good", "bad", "skip", "undo", "good"]

    # restart: the unanswered item first; undo reaches into the last session; Ctrl-C stops
    term = Terminal(args, tmp_path)
    assert response_on_screen(term, 4, 4) == "beta 1"
    term.press("u")  # the good of item 3
    assert response_on_screen(term, 3, 4) == "alpha 1"
    term.press("b")
    assert response_on_screen(term, 4, 4) == "beta 1"
    term.press(b"\x03")
    assert term.finish() == 128 + signal.SIGINT
    assert labels(out) == [("alpha 0", True), ("beta 0", False), ("alpha 1", False)]

    # and again: the last item, then the session ends by itself
    term = Terminal(args, tmp_path)
    assert response_on_screen(term, 4, 4) == "beta 1"
    term.press("g")
    assert term.finish() == 0
    assert "alice: all 4 items of" in term.text()
    assert labels(out) == [("alpha 0", True), ("beta 0", False), ("alpha 1", False),
                           ("beta 1", True)]  # fmt: skip


def test_a_sigkill_mid_session_loses_nothing_and_the_same_command_continues(tmp_path):
    source = write_jsonl(tmp_path / "pairs.jsonl", sample_rows(5))
    out = tmp_path / "kto.jsonl"
    args = ["mode=binary", f"in={source}", f"out={out}", "labeler=bob"]
    # killed after logging the 2nd answer, before out was rewritten: out lags one answer behind
    term = Terminal(args, tmp_path, {"RLHF_TEST_KILL_AT": "label-logged:2"})
    response_on_screen(term, 1, 10)
    term.press("g")
    response_on_screen(term, 2, 10)
    term.press("b")
    assert term.finish() == -signal.SIGKILL
    assert labels(out) == [("alpha 0", True)]
    # a restart catches up before the first key and continues with item 3
    term = Terminal(args, tmp_path)
    assert response_on_screen(term, 3, 10) == "alpha 1"
    assert labels(out) == [("alpha 0", True), ("beta 0", False)]
    term.press("q")
    assert term.finish() == 0
    # killed from outside at random moments while answers are being written
    rng = random.Random(0)
    for _ in range(4):
        term = Terminal(args, tmp_path)
        term.wait_for("to go")
        term.press(rng.choice("gbs"))
        time.sleep(rng.uniform(0, 0.02))
        term.kill()
        read_rows(out)  # a complete file at every moment: every line one JSON object
    term = Terminal(args, tmp_path)
    answered = int(re.search(r"item (\d+) of 10", term.wait_for("to go")).group(1)) - 1
    term.press("q")
    assert term.finish() == 0
    active = replay(read_log(tmp_path / "kto.jsonl.log.jsonl"))
    assert len(active) == answered >= 3
    kept = [r for r in active if r["answer"] != "skip"]
    assert [(r["item"], r["label"]) for r in read_rows(out)] == [
        (r["item"], r["answer"] == "good") for r in kept
    ]


# ---------------------------------------------------------------- a judge
JUDGED_ROWS = [
    {"id": 7, "prompt": "What is 2 + 2?", "candidates": ["Answer: 4", "4", "Answer: 5", "4"],
     "columns": {"answer": "4"}},
    {"prompt": [{"role": "user", "content": "What is 3 + 3?"}],
     "completion": [{"role": "assistant", "content": "Answer: 6"}], "answer": "6"},
    {"prompt": "What is 1 + 1?", "response": " Answer: 2", "answer": "2", "topic": "sums"},
    {"prompt": "What is 5 + 5?", "completion": "Answer: 11", "answer": "10"},
]  # fmt: skip
GOLD = [("Answer: 4", True), ("4", False), ("Answer: 5", False),  # candidates (a repeat left out)
        ([{"role": "assistant", "content": "Answer: 6"}], True), (" Answer: 2", True),
        ("Answer: 11", False)]  # fmt: skip


def test_a_judge_labels_each_response_good_when_its_score_reaches_the_threshold(
    tmp_path, capfd, tiny_model
):
    source = write_jsonl(tmp_path / "mixed.jsonl", JUDGED_ROWS)
    gold = tmp_path / "gold.jsonl"
    judge = "judge=rlhf_cli.judges:demo_gold"
    capfd.readouterr()
    assert run_in_process(["label", "mode=binary", f"in={source}", f"out={gold}", judge]) == 0
    assert "6 items from 4 rows; left out: 1 repeated responses" in capfd.readouterr().out
    rows = read_rows(gold)
    assert labels(gold) == GOLD  # demo_gold scores 1 or 0; threshold 0.5
    assert [row["score"] for row in rows] == [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]  # exact: 0 / 1
    assert [list(row)[:4] for row in rows] == [KTO_FIRST] * 6
    assert rows[3]["prompt"] == JUDGED_ROWS[1]["prompt"]  # messages stay messages
    assert [row["answer"] for row in rows] == ["4", "4", "4", "6", "2", "10"]
    assert rows[4]["topic"] == "sums" and "topic" not in rows[0]
    assert [row["source"]["id"] for row in rows] == [7, 7, 7, 2, 3, 4]
    assert [row["source"]["candidate"] for row in rows] == [0, 1, 2, None, None, None]
    assert {row["labeler"] for row in rows} == {"judge:rlhf_cli.judges:demo_gold"}
    assert {row["judge"] for row in rows} == {"rlhf_cli.judges:demo_gold"}
    assert_kto_file(gold, tiny_model)
    # the threshold decides, with score >= threshold good: 1.0 reaches 1.0, nothing reaches 1.5
    for threshold, expected in (("1.0", [g for _, g in GOLD]), ("1.5", [False] * 6),
                                ("0", [True] * 6)):  # fmt: skip
        out = tmp_path / f"t{threshold}.jsonl"
        args = [
            "label",
            "mode=binary",
            f"in={source}",
            f"out={out}",
            judge,
            f"threshold={threshold}",
        ]
        assert run_in_process(args) == 0
        assert [label for _, label in labels(out)] == expected, threshold
    # run again: everything is answered, nothing is added
    capfd.readouterr()
    assert run_in_process(["label", "mode=binary", f"in={source}", f"out={gold}", judge]) == 0
    assert "all 6 items of" in capfd.readouterr().out and labels(gold) == GOLD


def test_a_judge_that_raises_shows_its_traceback_and_exit_1(tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "binary_buggy_judge.py").write_text(
        "def judge(prompts, responses):\n    return [1 / 0 for _ in responses]\n"
    )
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p", "completion": "c"}])
    capfd.readouterr()
    args = ["label", "mode=binary", f"in={source}", "out=kto.jsonl",
            "judge=binary_buggy_judge:judge"]  # fmt: skip
    assert run_in_process(args) == 1
    err = capfd.readouterr().err
    assert "judge=binary_buggy_judge:judge raised ZeroDivisionError" in err
    assert "binary_buggy_judge.py" in err and "1 / 0" in err


# ---------------------------------------------------------------- --stats
def test_stats_count_good_bad_skip_agreement_and_kto_weights_of_two_labellers(tmp_path, capfd):
    source = write_jsonl(tmp_path / "pairs.jsonl", sample_rows(5))
    items, _ = load_responses(source)
    config = label_config(mode="binary")
    # alice answers all 10 (6 good, 4 bad); bob answers 9 (5 good, 3 bad, 1 skip)
    alice = "GGGGGGBBBB"
    bob = "GGGGBBBGS"
    # the 8 items both labelled: agree on 4 good + 1 bad, disagree on 3 -> p_o = 5/8
    # alice 6 good, 2 bad; bob 5 good, 3 bad -> p_e = (6 x 5 + 2 x 3) / 64 = 36/64
    # kappa = (5/8 - 36/64) / (1 - 36/64) = (4/64) / (28/64) = 1/7 = 0.143
    answer = {"G": "good", "B": "bad", "S": "skip"}
    for name, given in (("alice", alice), ("bob", bob)):
        with AnswerLog(tmp_path / f"{name}.jsonl", config) as log:
            for item, key in zip(items, given, strict=False):
                log.commit([response_record(item, name, answer[key], source)])
    files = f"out={tmp_path / 'alice.jsonl'},{tmp_path / 'bob.jsonl'}"
    capfd.readouterr()
    assert run_in_process(["label", "--stats", files]) == 0
    text = capfd.readouterr().out
    assert "19 answers by 2 labeller(s) on 10 items" in text
    assert re.search(r"alice\W+10\W+6\W+4\W+0\W+6 of 10", text)
    assert re.search(r"bob\W+9\W+5\W+3\W+1\W+5 of 8", text)
    assert re.search(r"alice ~ bob\W+8\W+", text) and "0.143" in text
    # 11 good, 7 bad: 11/7 = 1.57 is above 4/3; undesirable_weight = floor(157.1) / 100
    assert "balance: 11 good, 7 bad (good/bad 1.57)" in text
    assert "rlhf kto kto.desirable_weight=1 kto.undesirable_weight=1.57 (that ratio: 1.00)" in text

    # the same from the KTO rows alone (their logs not kept): skips are not in the rows
    rows_only = tmp_path / "rows-only"
    rows_only.mkdir()
    for name in ("alice", "bob"):
        shutil.copy(tmp_path / f"{name}.jsonl", rows_only)
    assert run_in_process(["label", "--stats", files.replace(str(tmp_path), str(rows_only))]) == 0
    text = capfd.readouterr().out
    assert "18 answers by 2 labeller(s) on 10 items" in text and "0.143" in text
    assert re.search(r"bob\W+8\W+5\W+3\W+0\W+", text)


def test_kto_weights_keep_the_good_to_bad_ratio_within_1_to_4_thirds():
    assert kto_weights(3, 3) is None and kto_weights(4, 3) is None  # ratios 1 and 4/3: as they are
    assert kto_weights(3, 9) == (3.0, 1.0)  # few good: weighed up to 3 x 3 / 9 = 1
    assert kto_weights(2, 3) == (1.5, 1.0)
    assert kto_weights(10, 5) == (1.0, 2.0)  # few bad: weighed up
    # 5 / (1.66 x 3) = 1.004, inside the band; exact: 166 / 100 is the double nearest 1.66
    assert kto_weights(5, 3) == (1.0, 1.66)
    for good in range(1, 40):
        for bad in range(1, 40):
            desirable, undesirable = kto_weights(good, bad) or (1.0, 1.0)
            ratio = desirable * good / (undesirable * bad)
            # 1 exactly: 1.16 x 25 / 29 in floats; k / 100, a product and a quotient: < 4e-16 off,
            # so 1e-12 is loose, and far below a weight rounded the wrong way (>= 0.01 / 39)
            assert 1 - 1e-12 <= ratio <= 4 / 3, (good, bad)


# ---------------------------------------------------------------- bad input
WRONG_COUNT = "def judge(prompts, responses):\n    return [1.0] * (len(responses) + 1)\n"
NOT_FINITE = "def judge(prompts, responses):\n    return [float('nan')] * len(responses)\n"


@pytest.mark.parametrize(
    ("rows", "extra", "message"),
    [
        ('{"prompt": "p", "completion": "c"}\n', ["mode=ranking"],
         "mode='ranking' is not valid: choose one of pairwise, binary."),
        ('{"prompt": "p", "completion": "c"}\n', ["mode=binary", "strength=true"],
         "strength=true applies to pairs of responses, and mode=binary labels single responses"),
        ('{"prompt": "p", "completion": "c"}\n', ["mode=binary", "ties=keep"],
         "ties=keep applies to pairs of responses"),
        ('{"prompt": "p", "completion": "c"}\n', ["mode=binary", "threshold=nan"],
         "threshold=nan is not valid: give a finite number."),
        ('{"prompt": "p", "completion": "c"}\n', ["mode=binary", "judge=binary_judges:wrong_count"],
         "judge=binary_judges:wrong_count returned 2 values for 1 responses"),
        ('{"prompt": "p", "completion": "c"}\n', ["mode=binary", "judge=binary_judges:not_finite"],
         "judge=binary_judges:not_finite returned nan for response 0"),
        ('{"prompt": "p", "chosen": "c", "rejected": "r"}\n', ["mode=binary"],
         "has no `candidates`, `completion` or `response`"),
        ('{"prompt": "p", "completion": "c", "response": "r"}\n', ["mode=binary"],
         "has both a `completion` and a `response`"),
        ('{"prompt": "p", "completion": 3}\n', ["mode=binary"],
         "`completion` must be text or a list of {role, content} messages"),
        ('{"prompt": "p", "candidates": []}\n', ["mode=binary"], "has an empty `candidates` list"),
        ('{"prompt": "p", "completion": "  "}\n', ["mode=binary"], "has no non-empty response"),
    ],
)  # fmt: skip
def test_bad_input_gets_one_sentence_and_exit_2(tmp_path, capfd, monkeypatch, rows, extra, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "binary_judges.py").write_text(
        WRONG_COUNT.replace("judge", "wrong_count") + NOT_FINITE.replace("judge", "not_finite")
    )
    (tmp_path / "in.jsonl").write_text(rows)
    capfd.readouterr()
    judge = (
        [] if any(e.startswith("judge=") for e in extra) else ["judge=rlhf_cli.judges:demo_format"]
    )
    code = run_in_process(["label", "in=in.jsonl", "out=kto.jsonl", *judge, *extra])
    err = capfd.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("rlhf label: error: ")
    assert not (tmp_path / "kto.jsonl").exists() or read_rows(tmp_path / "kto.jsonl") == []


def test_one_out_holds_one_mode_and_stats_take_files_of_one_mode(tmp_path, capfd):
    source = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "What is 2 + 2?", "answer": "4",
                                                     "candidates": ["Answer: 4", "4"]}])  # fmt: skip
    judge = "judge=rlhf_cli.judges:demo_gold"
    prefs, kto = tmp_path / "prefs.jsonl", tmp_path / "kto.jsonl"
    assert run_in_process(["label", f"in={source}", f"out={prefs}", judge]) == 0
    assert run_in_process(["label", "mode=binary", f"in={source}", f"out={kto}", judge]) == 0
    before = prefs.read_text()
    capfd.readouterr()
    assert run_in_process(["label", "mode=binary", f"in={source}", f"out={prefs}", judge]) == 2
    err = capfd.readouterr().err.strip()
    assert err == (
        "rlhf label: error: prefs.jsonl.log.jsonl holds pairwise answers and this is mode=binary; "
        "label into another out= (one file holds one kind of rows)."
    )
    assert prefs.read_text() == before
    assert run_in_process(["label", f"in={source}", f"out={kto}", judge]) == 2
    assert "kto.jsonl.log.jsonl holds binary answers and this is mode=pairwise" in (
        capfd.readouterr().err
    )
    assert run_in_process(["label", "--stats", f"out={prefs},{kto}"]) == 2
    assert capfd.readouterr().err.strip() == (
        f"rlhf label: error: {prefs} holds preference pairs and {kto} good/bad (binary) answers; "
        "give --stats files of one mode."
    )
    assert json.loads(kto.read_text().splitlines()[0])["label"] is True
