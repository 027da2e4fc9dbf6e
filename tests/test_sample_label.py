"""`rlhf sample` and `rlhf label`: candidates from a tiny checkpoint, the labeller driven through a
pseudo-terminal with scripted keys (labels, strength, notes, undo, quit, Ctrl-C, restart, SIGKILL),
judges, agreement statistics, bad input, and sample -> label judge= -> reward -> dpo end to end."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import random
import re
import select
import signal
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest

from rlhf_cli.labeling import log as answer_log
from rlhf_cli.labeling.items import Item, load_items, shown_order
from rlhf_cli.labeling.log import AnswerLog, label_record, read_log, replay
from rlhf_cli.labeling.stats import agreement, cohen_kappa, position_bias, wilson_interval
from rlhf_cli.schema import UserError

from conftest import (
    RLHF,
    config_of,
    data_config,
    label_config,
    model_config,
    run_cli,
    run_in_process,
)
from numerics import EPS64
from tiny import chat_rows, write_jsonl

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[()][0-9A-Za-z]")
CLEAR = b"\x1b[2J"  # rich's console.clear(): every item starts a new screen


# ---------------------------------------------------------------- helpers
def pairs_rows(n: int, sources: tuple[str, str] = ("a", "a")) -> list[dict]:
    """n rows of two distinct, recognisable candidates ("alpha i" / "beta i") to "Question i?"."""
    return [
        {"id": i, "prompt": f"Question {i}?",
         "candidates": [{"text": f"alpha {i}", "source": sources[0]},
                        {"text": f"beta {i}", "source": sources[1]}],
         "columns": {"answer": f"alpha {i}"}}
        for i in range(n)
    ]  # fmt: skip


def read_rows(path: Path) -> list[dict]:
    """Every line of a JSONL file as an object (fails on any line that is not one)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _take_terminal() -> None:  # in the child: the pty becomes its controlling terminal (Ctrl-C)
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _take_terminal_sigint_blocked() -> None:  # as a parent that blocked SIGINT leaves its children
    _take_terminal()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


class Terminal:
    """`rlhf label ARGS` on a pseudo-terminal: scripted keys in, screens out."""

    def __init__(self, args: list[str], cwd: Path, env: dict | None = None, setup=_take_terminal):
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 120, 0, 0))
        self.process = subprocess.Popen(
            [*RLHF, "label", *args], stdin=slave, stdout=slave, stderr=slave, cwd=cwd,
            env={**os.environ, "NO_COLOR": "1", "TERM": "xterm", **(env or {})},
            preexec_fn=setup,
        )  # fmt: skip
        os.close(slave)
        self.master, self.output, self.closed = master, b"", False

    def _pump(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.closed and time.monotonic() < end:
            if select.select([self.master], [], [], 0.05)[0]:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # EIO: the child has closed the terminal
                    chunk = b""
                self.closed = not chunk
                self.output += chunk

    def text(self, raw: bytes | None = None) -> str:
        return ANSI.sub("", (self.output if raw is None else raw).decode("utf-8", "replace"))

    def screen(self) -> str:
        """The latest screen: what was printed since the last clear."""
        return self.text(self.output.rpartition(CLEAR)[2])

    def wait_for(self, *texts: str, timeout: float = 30) -> str:
        end = time.monotonic() + timeout
        while not all(t in self.screen() for t in texts):
            assert time.monotonic() < end and not self.closed, (texts, self.text()[-3000:])
            self._pump(0.05)
        return self.screen()

    def item(self, number: int, total: int) -> tuple[str, str]:
        """Wait for item `number` to be on screen; -> (left response, right response)."""
        screen = self.wait_for(f"item {number} of {total}", "to go")
        line = next(line for line in screen.splitlines() if "alpha" in line and "beta" in line)
        words = re.findall(r"(?:alpha|beta) \d+", line)
        return words[0], words[1]

    def press(self, keys: str | bytes) -> None:
        os.write(self.master, keys.encode() if isinstance(keys, str) else keys)

    def finish(self, timeout: float = 30) -> int:
        end = time.monotonic() + timeout
        while not self.closed and time.monotonic() < end:
            self._pump(0.1)
        code = self.process.wait(timeout=max(1, end - time.monotonic()))
        os.close(self.master)
        return code

    def kill(self) -> int:
        self.process.kill()
        code = self.process.wait(timeout=10)
        os.close(self.master)
        return code


def assert_preference_file(path: Path, tokenizer_model: Path) -> list[dict]:
    """`path` is a preference file that rlhf reward / dpo read as it is: every line is one JSON
    object, and the loader and tokenizer those stages use accept every row."""
    from rlhf_cli import data, modeling

    rows = read_rows(path)
    if rows:
        tokenizer = modeling.load_tokenizer(model_config(str(tokenizer_model)))
        pairs, stats = data.tokenize_preferences(
            data.read_json_rows(path), tokenizer, data_config(path=str(path)), str(path)
        )
        assert stats.kept == len(rows) == len(pairs)
    return rows


# ---------------------------------------------------------------- pure functions
def test_cohen_kappa_wilson_interval_and_position_bias_on_known_values():
    # 50 items: both yes 20, yes/no 5, no/yes 10, both no 15 -> p_o = 0.7, p_e = 0.5, kappa = 0.4
    first = ["yes"] * 25 + ["no"] * 25
    second = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    # float64: p_o and p_e are correctly rounded shares (half an ulp each, 0.7 is not a binary
    # fraction), p_o - p_e adds at most one and / (1 - p_e) = / 0.5 doubles it: < 4 EPS64 of the
    # exact values (0.4 comes out as 0.3999999999999999); a wrong p_e moves kappa by > 0.01
    exact = {"rel": 0, "abs": 4 * EPS64}
    assert cohen_kappa(first, second) == pytest.approx(0.4, **exact)
    assert cohen_kappa(first, first) == pytest.approx(1.0, **exact)
    assert cohen_kappa(["x", "y"], ["y", "x"]) == pytest.approx(-1.0, **exact)
    assert cohen_kappa(["x"] * 4, ["x"] * 4) is None  # p_e = 1: undefined
    low, high = wilson_interval(7, 10)
    # the reference values are given to 4 decimals: within half a unit of the last, 5e-5
    assert low == pytest.approx(0.3968, abs=5e-5) and high == pytest.approx(0.8922, abs=5e-5)
    records = [{"answer": a, "judge": j} for a, j in
               [("A", None), ("A", None), ("B", None), ("tie", None), ("skip", None), ("A", "j:f")]]  # fmt: skip
    assert position_bias(records) == (2, 3)  # ties, skips and the judge's answers left out


def record(labeler, item, winner, shown=(0, 1), answer=None):
    answer = answer or ("tie" if winner is None else "A" if winner == shown[0] else "B")
    return {"event": "label", "labeler": labeler, "item": item, "winner": winner,
            "shown": list(shown), "answer": answer}  # fmt: skip


def test_agreement_compares_the_winning_candidate_not_the_side_each_saw():
    # alice and bob saw items 1 and 2 in opposite orders: different letters, same winners
    records = [record("alice", "1", 0), record("bob", "1", 0, shown=(1, 0)),
               record("alice", "2", 1), record("bob", "2", 1, shown=(1, 0)),
               record("alice", "3", None), record("bob", "3", 0),
               record("alice", "4", 0), record("bob", "4", None, answer="skip"),
               record("carol", "9", 1)]  # fmt: skip
    assert [r["answer"] for r in records[:4]] == ["A", "B", "B", "A"]
    [(first, second, shared, equal, kappa)] = agreement(records)
    assert (first, second, shared) == ("alice", "bob", 3)  # the skip and carol's item left out
    # exact: 2 equal of 3 shared is the float64 division 2 / 3, and kappa is cohen_kappa of the
    # same two lists (items in sorted order: 1, 2, 3)
    assert equal == 2 / 3
    assert kappa == cohen_kappa([0, 1, None], [0, 1, 0])


def test_undo_takes_back_the_labellers_own_latest_answer_and_a_torn_line_is_dropped(tmp_path):
    records = [record("alice", "1", 0), record("bob", "1", 1), record("alice", "2", 0),
               {"event": "undo", "labeler": "alice", "item": "1"}]  # fmt: skip
    active = replay(records)
    assert [(r["labeler"], r["item"]) for r in active] == [("bob", "1"), ("alice", "2")]
    log = tmp_path / "prefs.jsonl.log.jsonl"
    complete = "".join(json.dumps(r) + "\n" for r in records)
    log.write_text(complete + '{"event": "label", "labeler": "ali')  # a crash mid-write
    fd = os.open(log, os.O_RDWR)
    try:
        assert read_log(log, fd) == records
    finally:
        os.close(fd)
    assert log.read_text() == complete  # the torn tail was cut off the file
    log.write_text(complete.replace('"undo"', '"und'))
    with pytest.raises(UserError, match="line 4 is damaged"):
        read_log(log)


def test_items_pair_candidates_across_policies_and_leave_out_identical_or_empty_ones(tmp_path):
    rows = [{"prompt": "p", "candidates": [{"text": "x", "source": "a"}, {"text": "y", "source": "a"},
                                          {"text": "z", "source": "b"}, {"text": "w", "source": "b"}]},
            {"prompt": "q", "candidates": ["same", "same", ""]},
            {"prompt": [{"role": "user", "content": "hi"}], "candidates": ["u", "v", "w"]}]  # fmt: skip
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    items, counts = load_items(path, "all")
    # row 1 (A/B): only the 4 pairs across a and b; row 2: none; row 3: all 3 pairs
    assert [(i.candidates, i.sources) for i in items[:4]] == [
        ((0, 2), ("a", "b")), ((0, 3), ("a", "b")), ((1, 2), ("a", "b")), ((1, 3), ("a", "b"))
    ]  # fmt: skip
    assert [i.candidates for i in items[4:]] == [(0, 1), (0, 2), (1, 2)]
    assert (counts.items, counts.same, counts.empty) == (7, 1, 2)
    assert len({i.id for i in items}) == 7
    first, _ = load_items(path, "first")
    assert [i.candidates for i in first] == [(0, 2), (0, 1)]


def test_the_shown_order_is_random_across_items_and_labellers_and_fixed_for_each():
    rows = pairs_rows(200)
    items = [Item(str(i), r["prompt"], ("alpha", "beta"), (0, 1), (None, None), {}, i)
             for i, r in enumerate(rows)]  # fmt: skip
    alice = [shown_order(item, "alice", 0) for item in items]
    assert alice == [shown_order(item, "alice", 0) for item in items]  # a restart
    assert set(alice) == {(0, 1), (1, 0)} and 70 < alice.count((1, 0)) < 130
    bob = [shown_order(item, "bob", 0) for item in items]
    other_seed = [shown_order(item, "alice", 1) for item in items]
    assert 70 < sum(a != b for a, b in zip(alice, bob, strict=True)) < 130  # independent draws
    assert 70 < sum(a != b for a, b in zip(alice, other_seed, strict=True)) < 130


def test_the_shipped_settings_and_the_command_line():
    from rlhf_cli.labeling import parse_command_line

    flags, config, files = parse_command_line([])
    assert (flags, files) == (set(), [])
    assert (config.in_, config.out, config.judge, config.ties, config.pairs) == (
        None, None, None, "drop", "all")  # fmt: skip
    sample = config_of("sample")
    assert (sample.n, sample.temperature, sample.policy, sample.policy_b, sample.out) == (
        2, 1.0, None, None, None)  # fmt: skip
    assert sample.data.eval_size == 0
    _, config, files = parse_command_line(["in=p.jsonl", "out=a.jsonl,b.jsonl", "--stats",
                                           "labeler=007", "strength=true"])  # fmt: skip
    assert (config.in_, config.labeler, config.strength) == ("p.jsonl", "007", True)
    assert files == [Path("a.jsonl"), Path("b.jsonl")]


# ---------------------------------------------------------------- the labeller on a terminal
def test_labels_strength_notes_undo_quit_and_a_restart_continues(tmp_path, tiny_model):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pairs_rows(4))
    out = tmp_path / "prefs.jsonl"
    args = [f"in={pairs}", f"out={out}", "labeler=alice", "strength=true", "notes=true"]
    term = Terminal(args, tmp_path)
    left1, right1 = term.item(1, 4)
    term.press("a")
    term.wait_for("How much better is A?")
    term.press("5")
    term.wait_for("note (Enter: done")
    term.press("clear winxx\x7f\x7fner\r")  # backspace edits the note
    left2, right2 = term.item(2, 4)
    term.press("b")
    term.wait_for("How much better is B?")
    term.press("\r")  # no strength
    term.wait_for("note (Enter: done")
    term.press("\r")  # no note
    left3, _ = term.item(3, 4)
    term.press("t")
    term.wait_for("note (Enter: done")
    term.press("\r")
    left4 = term.item(4, 4)[0]
    term.press("u")  # takes back the tie: item 3 again
    assert term.item(3, 4)[0] == left3 and "undid your answer to this item (tie)" in term.screen()
    term.press("s")  # skip: no strength, no note
    term.item(4, 4)
    term.press("q")
    assert term.finish() == 0
    assert "alice: 3 of 4 items answered, 1 to go" in term.text()

    rows = assert_preference_file(out, tiny_model)
    assert [(r["chosen"], r["rejected"]) for r in rows] == [(left1, right1), (right2, left2)]
    assert (rows[0]["margin"], rows[0]["strength"], rows[0]["note"]) == (2.0, 5, "clear winner")
    assert "margin" not in rows[1] and "note" not in rows[1]
    assert [r["answer"] for r in rows] == ["A", "B"] and {r["labeler"] for r in rows} == {"alice"}
    for row in rows:  # the recorded order is the one shown: shown[0] is the left candidate
        left_text = ["alpha", "beta"][row["shown"][0]]
        assert (row["chosen"] if row["answer"] == "A" else row["rejected"]).startswith(left_text)
    log = [
        json.loads(line) for line in (tmp_path / "prefs.jsonl.log.jsonl").read_text().splitlines()
    ]
    assert [r.get("answer", r["event"]) for r in log] == ["A", "B", "tie", "undo", "skip"]

    # restart: the first unanswered item, in the same order; undo reaches into the last session
    term = Terminal(args, tmp_path)
    assert term.item(4, 4)[0] == left4
    term.press("u")  # the skip of item 3
    assert term.item(3, 4)[0] == left3
    term.press("a")
    term.wait_for("How much better is A?")
    term.press("7")
    term.wait_for("note (Enter: done")
    term.press("\r")
    term.item(4, 4)
    term.press(b"\x03")  # Ctrl-C: stops, every answer kept
    assert term.finish() == 128 + signal.SIGINT
    rows = assert_preference_file(out, tiny_model)
    # exact: margin = (7 - 1) x margin_scale 0.5, a product of small binary numbers
    assert [r["chosen"] for r in rows] == [left1, right2, left3] and rows[2]["margin"] == 3.0


def test_ctrl_c_ends_a_session_even_when_the_parent_left_sigint_blocked(tmp_path):
    """A blocked signal mask survives exec (seen once in the full suite: the labeller then waited
    for a key forever); rlhf label unblocks SIGINT/SIGTERM for the session."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pairs_rows(2))
    args = [f"in={pairs}", f"out={tmp_path / 'prefs.jsonl'}", "labeler=alice"]
    term = Terminal(args, tmp_path, setup=_take_terminal_sigint_blocked)
    term.item(1, 2)
    term.press("a")
    term.item(2, 2)
    term.press(b"\x03")
    assert term.finish() == 128 + signal.SIGINT
    assert "1 of 2 items answered" in term.text()


def test_the_preference_file_is_valid_after_a_sigkill_at_any_moment(tmp_path, tiny_model):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pairs_rows(12))
    out = tmp_path / "prefs.jsonl"
    args = [f"in={pairs}", f"out={out}", "labeler=bob"]
    # killed after logging the 2nd answer, before out was rewritten: out lags one answer behind
    term = Terminal(args, tmp_path, {"RLHF_TEST_KILL_AT": "label-logged:2"})
    term.item(1, 12)
    term.press("a")
    term.item(2, 12)
    term.press("b")
    assert term.finish() == -signal.SIGKILL
    assert len(assert_preference_file(out, tiny_model)) == 1
    # a restart catches up before the first key, and continues with item 3
    term = Terminal(args, tmp_path, {"RLHF_TEST_KILL_AT": "file-written:2"})
    term.item(3, 12)
    assert [r["answer"] for r in read_rows(out)] == ["A", "B"]
    term.press("a")  # killed with the new out written under its temporary name, not yet renamed
    assert term.finish() == -signal.SIGKILL
    assert len(assert_preference_file(out, tiny_model)) == 2
    assert list(tmp_path.glob(".prefs.jsonl.tmp-*"))  # the half-done replacement, never `out`
    # killed from outside at random moments while answers are being written
    rng = random.Random(0)
    for _ in range(5):
        term = Terminal(args, tmp_path)
        term.wait_for("to go")
        term.press(rng.choice("abt"))
        time.sleep(rng.uniform(0, 0.02))
        term.kill()
        assert_preference_file(out, tiny_model)
    term = Terminal(args, tmp_path)
    screen = term.wait_for("to go")
    answered = int(re.search(r"item (\d+) of 12", screen).group(1)) - 1
    term.press("q")
    assert term.finish() == 0
    assert not list(tmp_path.glob(".prefs.jsonl.tmp-*"))  # a restart clears the leftovers
    log = read_log(tmp_path / "prefs.jsonl.log.jsonl")
    assert len(replay(log)) == answered >= 3
    kept = [r for r in replay(log) if r["answer"] != "tie"]
    assert [r["item"] for r in assert_preference_file(out, tiny_model)] == [r["item"] for r in kept]


def test_without_a_terminal_and_without_a_judge_it_stops_with_one_sentence(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pairs_rows(2))
    result = subprocess.run([*RLHF, "label", f"in={pairs}", "out=prefs.jsonl"], cwd=tmp_path,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "rlhf label: error: stdin is not a terminal, so nobody can press keys: run rlhf label in a "
        "terminal, or give judge=package.module:function to label without one."
    ]
    assert not (tmp_path / "prefs.jsonl").exists()


# ---------------------------------------------------------------- judges, stats, bad input
def test_a_judge_labels_with_the_columns_it_names_and_ties_are_dropped_or_kept(tmp_path, capfd):
    rows = [{"prompt": "What is 2 + 2?", "candidates": ["Answer: 4", "4"], "answer": "4"},
            {"prompt": "What is 3 + 3?", "candidates": ["The answer is 6", "Answer: 6"],
             "columns": {"answer": "6"}},
            {"prompt": "What is 1 + 1?", "candidates": ["Answer: 3", "Answer: 5"], "answer": "2"}]  # fmt: skip
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    judge = "judge=rlhf_cli.judges:demo_gold"
    assert run_in_process(["label", f"in={pairs}", f"out={tmp_path / 'drop.jsonl'}", judge]) == 0
    dropped = read_rows(tmp_path / "drop.jsonl")
    assert [(r["chosen"], r["rejected"], r["scores"]) for r in dropped] == [
        ("Answer: 4", "4", [1.0, 0.0]), ("Answer: 6", "The answer is 6", [0.0, 1.0])
    ]  # fmt: skip
    assert {r["labeler"] for r in dropped} == {"judge:rlhf_cli.judges:demo_gold"}
    assert run_in_process(["label", f"in={pairs}", f"out={tmp_path / 'keep.jsonl'}", judge,
                           "ties=keep", "labeler=gold"]) == 0  # fmt: skip
    kept = read_rows(tmp_path / "keep.jsonl")
    assert len(kept) == 3 and kept[2]["tie"] is True and "tie" not in kept[0]
    # run again: everything is answered, nothing is added
    capfd.readouterr()
    assert run_in_process(["label", f"in={pairs}", f"out={tmp_path / 'keep.jsonl'}", judge,
                           "ties=keep", "labeler=gold"]) == 0  # fmt: skip
    assert "gold: all 3 items of" in capfd.readouterr().out
    assert len(read_rows(tmp_path / "keep.jsonl")) == 3


def test_stats_report_kappa_between_labellers_position_bias_and_ab_wins(tmp_path, capfd):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pairs_rows(6, sources=("a", "b")))
    items, _ = load_items(pairs, "all")
    config = label_config(out=str(tmp_path / "alice.jsonl"))
    # alice: always the left one; bob (own file): always candidate 0 ("alpha", policy a)
    with AnswerLog(tmp_path / "alice.jsonl", config) as log:
        for item in items:
            shown = shown_order(item, "alice", 0)
            log.commit([label_record(item, "alice", shown, "A", pairs)])
    with AnswerLog(tmp_path / "bob.jsonl", config) as log:
        for item in items[:4]:
            shown = shown_order(item, "bob", 0)
            answer = "A" if shown[0] == 0 else "B"
            log.commit([label_record(item, "bob", shown, answer, pairs)])
    alice = [shown_order(i, "alice", 0)[0] for i in items]
    expected = cohen_kappa(alice[:4], [0] * 4)
    capfd.readouterr()
    code = run_in_process(
        ["label", "--stats", f"out={tmp_path / 'alice.jsonl'},{tmp_path / 'bob.jsonl'}"]
    )
    text = capfd.readouterr().out
    assert code == 0
    assert "10 answers by 2 labeller(s) on 6 items" in text
    left_picks = 6 + sum(shown_order(i, "bob", 0)[0] == 0 for i in items[:4])
    assert f"picked in {left_picks} of 10 (" in text
    same = sum(a == 0 for a in alice[:4])
    assert re.search(rf"alice ~ bob\W+4\W+{same / 4:.0%}", text)
    shown_kappa = "undefined" if expected is None else f"{expected:.3f}"
    assert shown_kappa in text
    a_wins = sum(a == 0 for a in alice) + 4
    assert f"A/B: a preferred {a_wins} of 10" in text and f"b preferred {10 - a_wins} of 10" in text


@pytest.mark.parametrize(
    ("rows", "extra", "message"),
    [
        (None, [], "in=MISSING does not exist"),
        ('{"prompt": "p", "candidates": ["x", "y"]}\n{"prompt": ', [], "line 2 is not valid JSON"),
        ('{"prompt": "p", "candidates": ["only one"]}\n', [], "has 1 candidate(s); rlhf label compares two"),
        ('{"prompt": "p", "responses": ["x", "y"]}\n', [], "has no `candidates` list"),
        ('{"prompt": "", "candidates": ["x", "y"]}\n', [], "`prompt` must be non-empty text"),
        ('{"prompt": "p", "candidates": ["x", "x"]}\n', [], "has no pair of two different"),
        ('{"prompt": "p", "candidates": ["x", "y"]}\n', ["judge=no_such_module:f"], "could not import no_such_module"),
        ('{"prompt": "p", "candidates": ["x", "y"]}\n', ["judge=rlhf_cli.judges:nope"], "has no function 'nope'"),
        ('{"prompt": "p", "candidates": ["x", "y"]}\n', ["judge=rlhf_cli.judges:demo_gold"], "needs the column(s) answer"),
        ('{"prompt": "p", "candidates": ["x", "y"]}\n', ["judge=not a spec"], "write it as package.module:function"),
        ('{"prompt": "p", "candidates": ["x", "y"]}\n', ["lablr=x"], "did you mean 'labeler'?"),
        ('{"prompt": "p", "candidates": ["x", "y"]}\n', ["ties=maybe"], "ties='maybe' is not valid"),
        ('{"prompt": "p", "candidates": ["x", "y"]}\n', ["labeler=a,b"], "lists several values"),
    ],
)  # fmt: skip
def test_bad_input_gets_one_sentence_and_exit_2(tmp_path, capfd, monkeypatch, rows, extra, message):
    monkeypatch.chdir(tmp_path)
    source = tmp_path / "pairs.jsonl"
    if rows is not None:
        source.write_text(rows)
    capfd.readouterr()
    args = ["label", f"in={source if rows is not None else 'MISSING'}", "out=x.jsonl"]
    code = run_in_process([*args, *(extra or ["judge=rlhf_cli.judges:demo_format"])])
    err = capfd.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("rlhf label: error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == (["pairs.jsonl"] if rows else [])


def test_out_without_its_log_and_a_locked_log_are_refused(tmp_path, capfd):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pairs_rows(2))
    mine = write_jsonl(tmp_path / "mine.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}])
    before = mine.read_text()
    args = ["label", f"in={pairs}", "judge=rlhf_cli.judges:demo_format"]
    capfd.readouterr()
    assert run_in_process([*args, f"out={mine}"]) == 2
    assert "exists but has no answer log" in capfd.readouterr().err
    assert mine.read_text() == before  # a file rlhf label did not write is never replaced
    with AnswerLog(tmp_path / "busy.jsonl", label_config()):
        assert run_in_process([*args, f"out={tmp_path / 'busy.jsonl'}"]) == 2
        assert "another rlhf label session is writing" in capfd.readouterr().err
    assert run_in_process([*args, f"out={tmp_path / 'busy.jsonl'}"]) == 0  # free again


def test_a_full_disk_stops_with_exit_4_and_keeps_the_logged_answers(tmp_path, capfd, monkeypatch):
    import errno

    pairs = write_jsonl(tmp_path / "pairs.jsonl", pairs_rows(3))
    out = tmp_path / "prefs.jsonl"
    real_write, writes = answer_log.write_jsonl_atomic, []

    def full_after_the_first(path, rows):  # the start's catch-up works, the first answer's not
        writes.append(path)
        if len(writes) > 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(path, rows)

    monkeypatch.setattr(answer_log, "write_jsonl_atomic", full_after_the_first)
    capfd.readouterr()
    args = ["label", f"in={pairs}", f"out={out}", "judge=rlhf_cli.judges:demo_format", "ties=keep"]
    assert run_in_process(args) == 4
    err = capfd.readouterr().err.strip()
    assert err.startswith(f"rlhf label: error: could not write {out} (No space left on device)")
    assert "run the same command to continue" in err and len(err.splitlines()) == 1
    assert read_rows(out) == [] and len(read_log(tmp_path / "prefs.jsonl.log.jsonl")) == 3
    monkeypatch.setattr(answer_log, "write_jsonl_atomic", real_write)
    assert run_in_process(args) == 0 and len(read_rows(out)) == 3  # space again: caught up


# ---------------------------------------------------------------- rlhf sample
@pytest.fixture(scope="module")
def judged_prompts(tmp_path_factory) -> Path:
    """12 chat prompts with an `answer` column."""
    rows = chat_rows(12, 5)
    for row in rows:
        row["answer"] = row["messages"][-1]["content"]
    return write_jsonl(tmp_path_factory.mktemp("sample-data") / "prompts.jsonl", rows)


def sample_args(out: Path, prompts: Path, *extra: str) -> list[str]:
    return ["sample", f"data={prompts}", f"out={out}", "generation.max_new_tokens=6",
            "generation.batch_size=5", *extra]  # fmt: skip


def test_sample_writes_n_candidates_per_prompt_with_provenance_reproducibly(
    tmp_path, tiny_model, judged_prompts, capfd, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "pairs.jsonl"
    base = f"model.name_or_path={tiny_model}"
    assert run_in_process(sample_args(out, judged_prompts, base, "n=3", "temperature=1.5")) == 0
    rows = read_rows(out)
    assert [r["id"] for r in rows] == list(range(12))
    assert rows[0]["prompt"] == [
        json.loads(judged_prompts.read_text().splitlines()[0])["messages"][0]
    ]
    assert all(len(r["candidates"]) == 3 and r["columns"]["answer"] for r in rows)
    assert all(c["source"] == "a" and 1 <= c["tokens"] <= 6 for r in rows for c in r["candidates"])
    provenance = rows[0]["provenance"]
    assert provenance["sources"] == {"a": {"checkpoint": None, "stage": "base",
                                           "base_model": str(tiny_model), "parent": None}}  # fmt: skip
    assert provenance["sampling"] == {"n": 3, "temperature": 1.5, "top_k": 0, "top_p": 1.0,
                                      "seed": 42, "max_new_tokens": 6}  # fmt: skip
    texts = [[c["text"] for c in r["candidates"]] for r in rows]
    assert len({t for row in texts for t in row}) > 24  # sampled, not 3 copies of one response
    assert not (tmp_path / "runs").exists()  # out= elsewhere: no empty run folder left behind
    # an existing file is kept unless overwrite=true; the same seed gives the same candidates
    capfd.readouterr()
    assert run_in_process(sample_args(out, judged_prompts, base, "n=3", "temperature=1.5")) == 2
    assert "out=" in capfd.readouterr().err and read_rows(out) == rows
    args = sample_args(out, judged_prompts, base, "n=3", "temperature=1.5", "overwrite=true")
    assert run_in_process(args) == 0
    assert [[c["text"] for c in r["candidates"]] for r in read_rows(out)] == texts
    assert run_in_process([*args, "seed=7"]) == 0
    assert [[c["text"] for c in r["candidates"]] for r in read_rows(out)] != texts


def test_a_sample_sweep_writes_a_pairs_file_per_job_and_summarises_them_as_done(
    tmp_path, tiny_model, judged_prompts, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "sweep"
    args = [*sample_args(tmp_path / "unused", judged_prompts, f"model.name_or_path={tiny_model}"),
            "out=null", f"output_dir={sweep}", "-m", "n=2,3"]  # fmt: skip
    assert run_in_process(args) == 0
    assert [len(read_rows(sweep / job / "pairs.jsonl")[0]["candidates"]) for job in "01"] == [2, 3]
    rows = list(csv.DictReader((sweep / "sweep_summary.csv").open()))
    assert [(r["n"], r["status"], float(r["candidates"])) for r in rows] == [
        ("2", "done", 24.0),
        ("3", "done", 36.0),
    ]


def test_sample_stopped_by_a_signal_writes_nothing(
    tmp_path, tiny_model, judged_prompts, capfd, monkeypatch
):
    from rlhf_cli.stages import sample

    monkeypatch.chdir(tmp_path)
    real_play, calls = sample.play, []

    def play_then_sigterm(*args):  # the second candidate pass is interrupted
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_play(*args)

    monkeypatch.setattr(sample, "play", play_then_sigterm)
    capfd.readouterr()
    handler = signal.getsignal(signal.SIGTERM)
    args = sample_args(tmp_path / "p.jsonl", judged_prompts, f"model.name_or_path={tiny_model}")
    assert run_in_process(args) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM before every candidate was sampled" in capfd.readouterr().err
    assert not any(tmp_path.iterdir())  # no pairs file, no run folder
    assert signal.getsignal(signal.SIGTERM) is handler  # the handlers are put back


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["n=1"], "rlhf label compares two candidates"),
        (["temperature=0"], "greedy decoding would give the same response 2 times"),
        (["policy_b=nowhere"], "policy_b=nowhere does not exist"),
        (["policy=nowhere"], "policy=nowhere does not exist"),
        (["data=missing.jsonl"], "missing.jsonl does not exist"),
        (["nn=2"], "did you mean 'n'?"),
    ],
)
def test_sample_bad_input_gets_one_sentence_and_exit_2(
    tmp_path, tiny_model, judged_prompts, capfd, monkeypatch, extra, message
):
    monkeypatch.chdir(tmp_path)
    capfd.readouterr()
    code = run_in_process(sample_args(tmp_path / "p.jsonl", judged_prompts,
                                      f"model.name_or_path={tiny_model}", *extra))  # fmt: skip
    err = capfd.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not any(tmp_path.iterdir())  # nothing written, no run folder


@pytest.mark.slow
def test_sample_label_reward_dpo_end_to_end_through_the_cli(tmp_path, sft_final, judged_prompts):
    """The loop from a model to preference data and back: A/B candidates from the SFT checkpoint
    and the raw base, labelled by a judge, train a reward model and a DPO policy."""
    (tmp_path / "my_judge.py").write_text(
        "def colour_words(prompts, responses):\n"
        "    colours = {'blue', 'green', 'red', 'yellow'}\n"
        "    return [sum(w in colours for w in r.split()) - 0.01 * len(r) for r in responses]\n"
    )
    pairs, prefs = tmp_path / "pairs.jsonl", tmp_path / "prefs.jsonl"
    result = run_cli(*sample_args(pairs, judged_prompts, f"policy={sft_final}", "policy_b=base",
                                  "n=2"), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_rows(pairs)
    assert [c["source"] for c in rows[0]["candidates"]] == ["a", "a", "b", "b"]
    sources = rows[0]["provenance"]["sources"]
    assert sources["a"]["checkpoint"] == str(sft_final.resolve()) and sources["a"]["stage"] == "sft"
    assert sources["b"]["stage"] == "base" and sources["b"]["checkpoint"] is None

    result = run_cli(
        "label", f"in={pairs}", f"out={prefs}", "judge=my_judge:colour_words", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    labelled = read_rows(prefs)
    assert len(labelled) >= 20  # 12 prompts x 4 pairs across the policies, less ties and repeats
    assert {r["chosen_policy"] for r in labelled} <= {"a", "b"}
    result = run_cli("label", "--stats", f"out={prefs}", cwd=tmp_path)
    assert result.returncode == 0 and "A/B: a preferred" in result.stdout, result.stderr

    common = [f"data={prefs}", "data.eval_size=4", "train.batch_size=4", "train.max_steps=2",
              "lora.dropout=0"]  # fmt: skip
    result = run_cli("reward", f"init_from={sft_final}", f"output_dir={tmp_path / 'rm'}", *common)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "rm" / "final" / "rlhf_stage.json").read_text())
    assert manifest["data"]["train"]["kept"] + manifest["data"]["eval"]["kept"] == len(labelled)
    result = run_cli("dpo", f"init_from={sft_final}", f"output_dir={tmp_path / 'dpo'}", *common)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "dpo" / "final" / "rlhf_stage.json").read_text())
    assert manifest["data"]["train"]["kept"] + manifest["data"]["eval"]["kept"] == len(labelled)


def test_sample_in_an_environment_writes_transcripts_that_label_ranks(tmp_path, sft_final):
    """env=: each candidate is an episode of the row (toy_envs.Echo: "again" after every reply);
    its text is the whole transcript, which a judge ranks; the row's prompt is what the
    environment's reset gave."""
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"n": i} for i in range(4)])
    out = tmp_path / "pairs.jsonl"
    env = {"PYTHONPATH": str(Path(__file__).parent)}
    result = run_cli(*sample_args(out, rows, f"policy={sft_final}", "env=toy_envs:Echo",
                                  "env.max_turns=2", "generation.max_new_tokens=8"),
                     cwd=tmp_path, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in written] == [[{"role": "user", "content": f"say something {i}"}] for i in range(4)]  # fmt: skip
    for row in written:
        for c in row["candidates"]:
            assert c["turns"] in (1, 2) and c["finish"] in ("max_turns", "truncated")
            assert c["messages"][0]["role"] == "assistant"
            assert c["text"] == "\n\n".join(f"{m['role']}: {m['content']}" for m in c["messages"])
            assert c["response"] == c["messages"][-1]["content"]
            assert c["tokens"] >= c["turns"]
    (tmp_path / "longer.py").write_text(
        "def judge(prompts, responses):\n    return [float(len(r)) for r in responses]\n"
    )
    prefs = tmp_path / "prefs.jsonl"
    labelled = run_cli("label", f"in={out}", f"out={prefs}", "judge=longer:judge", cwd=tmp_path)
    assert labelled.returncode == 0, labelled.stderr[-3000:]
    for pref in (json.loads(line) for line in prefs.read_text().splitlines()):
        assert len(pref["chosen"]) >= len(pref["rejected"])  # whole transcripts were ranked
        assert pref["chosen"].startswith("assistant: ")
