"""`rlhf label`: preference pairs (or good/bad KTO rows) from a person at a terminal, or a judge.

    rlhf label in=pairs.jsonl out=prefs.jsonl labeler=alice            # keys: a b t s u q
    rlhf label in=pairs.jsonl out=prefs.jsonl strength=true notes=true  # + 1-7 strength, a note
    rlhf label in=pairs.jsonl out=prefs.jsonl judge=my_judges:shorter   # no terminal needed
    rlhf label mode=binary in=pairs.jsonl out=kto.jsonl                 # keys: g b s u q
    rlhf label --stats out=prefs.jsonl                                  # agreement, position bias

`in` is what `rlhf sample` writes: one row per prompt with two or more candidate responses. Pairwise
mode (the default) labels pairs of them into preference pairs; binary mode labels each response
good or bad into KTO rows (prompt, completion, label), and also reads prompt/completion rows. Every
answer is saved (fsync'ed) before the next item shows, `out` is at every moment a complete file
rebuilt from the answer log beside it, and the same command continues where a session stopped
(quit, Ctrl-C, SIGKILL).

This module is the command: the command line, the session (signals, the log held open, the
closing line) and the exit codes. Its parts, one concern each:
    items.py     the input file -> items (pairs, or single responses), the order a pair is shown in
    log.py       the answer log, its records, and `out` rebuilt from it (preference or KTO rows)
    terminal.py  a person at the terminal: keys, the screen, the session loop
    judge.py     a judge function instead of a person
    stats.py     --stats: agreement, Cohen's kappa, position bias, A/B wins, good/bad balance
"""

from __future__ import annotations

import getpass
import os
import shlex
import signal
import sys
from collections import Counter
from importlib import resources
from pathlib import Path

from rlhf_cli.files import WRITE_ERRNOS, WRITE_EXIT, check_out_file
from rlhf_cli.labeling.items import load_items, load_responses
from rlhf_cli.labeling.judge import judge_items, judge_responses, load_judge
from rlhf_cli.labeling.log import LOG_SUFFIX, AnswerLog
from rlhf_cli.labeling.stats import print_stats
from rlhf_cli.labeling.terminal import Keys, Session
from rlhf_cli.schema import USER_CODE_EXIT, LabelConfig, UserCodeError, UserError

USAGE = """usage: rlhf label in=PAIRS.jsonl out=PREFS.jsonl [labeler=NAME] [strength=true] [notes=true] [key=value ...]
       rlhf label in=PAIRS.jsonl out=PREFS.jsonl judge=package.module:function
       rlhf label mode=binary in=FILE out=KTO.jsonl [labeler=NAME] [notes=true]
       rlhf label mode=binary in=FILE out=KTO.jsonl judge=package.module:function [threshold=0.5]
       rlhf label --stats out=PREFS.jsonl[,MORE.jsonl ...]   # or KTO.jsonl files
       rlhf label --cfg job [key=value ...]   # print the settings and exit

keys: a (A is better), b (B is better), t (tie), s (skip), u (undo), q (quit); Ctrl-C quits too.
mode=binary (each response good or bad, KTO rows for rlhf kto; FILE: rlhf sample's, or prompt +
completion rows): g (good), b (bad), s (skip), u (undo), q (quit).
Every answer is saved as it is given; the same command continues where you stopped."""


class WriteFailed(Exception):
    """A write failed (disk full, permissions): exit code 4, as for the training stages."""


def main(argv: list[str]) -> None:
    """`rlhf label ...`: exit 0 when done or quit, 2 on bad input, 4 when a write failed, 128 + the
    signal after Ctrl-C / SIGTERM (every answer given is saved in all of these cases)."""
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=False)
    try:
        flags, config, stats_files = parse_command_line(argv)
        if flags & {"--help", "-h"}:
            print(USAGE + "\n\nsettings (defaults):\n" + _defaults_file().read_text())
            return
        if "--cfg" in flags:
            from omegaconf import OmegaConf

            from rlhf_cli.schema import to_container

            print(OmegaConf.to_yaml(to_container(config)), end="")
            return
        if "--stats" in flags:
            if not stats_files:
                raise UserError(
                    "--stats reads out=<a preference or KTO file rlhf label wrote> (or "
                    "several, comma-separated)."
                )
            print_stats(stats_files, Console(highlight=False, soft_wrap=True))
            return
        code = label(config, console, argv)
    except UserCodeError as err:
        print(f"rlhf label: error: {err}.\n{err.report()}", file=sys.stderr, flush=True)
        sys.exit(USER_CODE_EXIT)
    except UserError as err:
        print(f"rlhf label: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except WriteFailed as err:
        print(f"rlhf label: error: {err}", file=sys.stderr, flush=True)
        sys.exit(WRITE_EXIT)
    if code:
        sys.exit(code)


def parse_command_line(argv: list[str]) -> tuple[set[str], LabelConfig, list[Path]]:
    """-> (flags, typed config, the files --stats reads). key=value and config=FILE work as for the
    stages (the same override syntax and typed checks), without Hydra running anything."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from rlhf_cli.cli.args import build_overrides
    from rlhf_cli.schema import build_config

    flags, words, config_file = set(), [], None
    for index, arg in enumerate(argv):
        if arg.startswith("-"):
            if arg not in ("--stats", "--help", "-h", "--cfg"):
                raise UserError(
                    f"rlhf label has no flag {arg}; it takes --stats, --cfg job and --help."
                )
            flags.add(arg)
        elif arg.startswith("config="):
            config_file = arg.split("=", 1)[1]
        elif "=" in arg:
            words.append(arg)
        elif not (arg == "job" and argv[index - 1 : index] == ["--cfg"]):
            raise UserError(
                f"{arg!r} is not key=value; e.g. rlhf label in=pairs.jsonl out=prefs.jsonl."
            )
    cfg = OmegaConf.load(_defaults_file())
    stats_files: list[str] = []
    try:
        parsed = OverridesParser.create().parse_overrides(build_overrides(config_file, words, {}))
    except UserError:
        raise
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"could not parse the command line: {first}.") from None
    for override in parsed:
        key = override.key_or_group
        if override.is_sweep_override():
            if key == "out" and "--stats" in flags:  # several labellers' files
                stats_files = list(override.sweep_string_iterator())
                OmegaConf.update(cfg, key, stats_files[0], force_add=True)
                continue
            raise UserError(
                f"{override.input_line.lstrip('+')} lists several values; rlhf label takes one per "
                "key (quote a value that contains commas)."
            )
        if override.is_delete():
            raise UserError(
                f"{override.input_line}: rlhf label cannot delete keys; set them instead."
            )
        OmegaConf.update(cfg, key, override.value(), merge=True, force_add=True)
    config: LabelConfig = build_config("label", cfg)  # type: ignore[assignment]
    return flags, config, [Path(f) for f in stats_files or ([config.out] if config.out else [])]


def _defaults_file() -> Path:
    return Path(str(resources.files("rlhf_cli.configs"))) / "label.yaml"


def label(config: LabelConfig, console, argv: list[str]) -> int:
    """Label the items of `in` into `out` (at the terminal, or with the judge). -> exit code.
    `argv`: the command line, for the command that continues."""
    if config.judge is None and not os.isatty(0):
        raise UserError(
            "stdin is not a terminal, so nobody can press keys: run rlhf label in a terminal, or give "
            "judge=package.module:function to label without one."
        )
    binary = config.mode == "binary"
    if not config.in_ or not config.out:
        raise UserError(
            "give in=<rlhf sample's file, or prompt/completion rows> and out=<the KTO file to "
            "write>, e.g. rlhf label mode=binary in=pairs.jsonl out=kto.jsonl."
            if binary
            else "give in=<the pairs file from rlhf sample> and out=<the preference file to "
            "write>, e.g. rlhf label in=pairs.jsonl out=prefs.jsonl."
        )
    source, out = Path(config.in_), Path(config.out)
    if source.absolute() == out.absolute():
        raise UserError(f"in and out are the same file ({source}); give another out=.")
    items, counts = load_responses(source) if binary else load_items(source, config.pairs)
    judge = load_judge(config.judge, items, source) if config.judge else None
    check_out_file(out, "out", None)
    labeler = default_labeler(config)
    answered: Counter = Counter()
    interrupted = None
    # Ctrl-C and SIGTERM end a session with every answer saved, whatever the parent process left
    # behind (an ignored SIGINT survives exec; a blocked one too): our handler, neither blocked
    stops = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.getsignal(signum) for signum in stops}
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])  # read only
    try:
        for signum in stops:
            signal.signal(signum, _raise_interrupt)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)  # a pending Ctrl-C is raised here
        with AnswerLog(out, config) as log:
            try:
                if config.judge:
                    console.print(
                        f"{source}: {counts.summary()}; judge: {config.judge}", soft_wrap=True
                    )
                    judge_all = judge_responses if binary else judge_items
                    answered = judge_all(config, judge, items, log, labeler, source, console)
                else:
                    with Keys() as keys:
                        session = Session(config, items, log, labeler, source, console, keys)
                        try:
                            session.run()
                        finally:
                            answered = session.answered
            except KeyboardInterrupt as stop:
                interrupted = stop.args[0] if stop.args else signal.SIGINT
            left = sum(item.id not in {r["item"] for r in log.mine(labeler)} for item in items)
            console.print(
                summary(answered, log, labeler, left, len(items), source, out, argv), soft_wrap=True
            )
    except OSError as err:
        if err.errno not in WRITE_ERRNOS:
            raise
        raise WriteFailed(
            f"could not write {err.filename or out} ({err.strerror}); every answer "
            f"before it is in {out.name}{LOG_SUFFIX}: free space or fix the "
            "permissions, then run the same command to continue."
        ) from None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
    return 128 + int(interrupted) if interrupted is not None else 0


def default_labeler(config: LabelConfig) -> str:
    if config.labeler:
        return config.labeler
    if config.judge:
        return f"judge:{config.judge}"
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "anonymous"


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(signum)


def summary(
    answered: Counter,
    log: AnswerLog,
    labeler: str,
    left: int,
    total: int,
    source: Path,
    out: Path,
    argv: list[str],
) -> str:
    """The line a session ends with: what was answered, what is left and how to go on."""
    if log.config.mode == "binary":
        names, rows = ("good", "bad", "skip", "undo"), "KTO rows"
    else:
        names, rows = ("A", "B", "tie", "skip", "undo"), "preference pairs"
    given = ", ".join(f"{answered[name]} {name}" for name in names if answered[name]) or "none"
    where = f"{out} holds {log.rows_in_out()} {rows} (answers and undos: {log.path.name})"
    if not left:
        return f"{labeler}: all {total} items of {source} answered (this session: {given}); {where}"
    again = shlex.join(["rlhf", "label", *argv])
    return (
        f"{labeler}: {total - left} of {total} items answered, {left} to go (this session: "
        f"{given}); {where}; continue with: {again}"
    )
