"""A catalogue of bad input, across every stage: each case must end with exit code 2 and one readable
sentence on stderr naming the problem, and must leave every finished run it was pointed at (as
init_from, reward.from, policy, resume or output_dir) exactly as it was.

The CLI runs in this process (`conftest.run_in_process`), which is much faster than a subprocess
per case and undoes what a run changes in the process (sys.argv, Hydra's global state, the SIGPIPE
handler, the list of failed sweep jobs).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import run_in_process, tiny_sft_args
from tiny import chat_rows, make_model, make_tokenizer, preference_rows, write_jsonl

STAGES = ("sft", "reward", "dpo", "kto", "ppo", "grpo", "eval", "export", "label")
# the one line that must be left on stderr: `rlhf: error: ...` (refused before Hydra runs) or
# `rlhf <stage>: error: ...` (refused by the stage), one line ending like a sentence
ERROR_LINE = re.compile(rf"^rlhf(?: (?:{'|'.join(STAGES)}))?: error: \S.*[.?]$")
# a full stop followed by a capitalised word starts a second sentence ("did you mean 'x'? Valid
# keys ..." is the documented form of an unknown key and is allowed)
SECOND_SENTENCE = re.compile(r"\.\s+[A-Z]")
# rich / tqdm progress output (bars, spinners) is not part of the message
PROGRESS_NOISE = re.compile(r"[━─█▏▎▍▌▋▊▉⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏]|\d+%\|")
SIGPIPE_AT_IMPORT = signal.getsignal(signal.SIGPIPE) if hasattr(signal, "SIGPIPE") else None


# ---------------------------------------------------------------- finished runs the cases point at
@dataclass
class Runs:
    root: Path  # every finished run below; snapshotted around each case
    pristine: Path  # a copy of root, to put it back if a case changed it
    sft: Path  # a finished tiny SFT run (its final/ is sft_final)
    sft_final: Path
    rm: Path  # a finished tiny reward run, started from sft_final
    rm_final: Path
    eval: Path  # a finished tiny eval of sft_final (eval.json)
    sweep: Path  # a finished tiny SFT sweep (-m lora.r=4,8): jobs 0/ and 1/
    chat: Path  # the chat rows the runs trained on (also PPO / eval prompts)
    prefs: Path  # the preference pairs the reward run trained on


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model) -> Runs:
    """Finished tiny runs, built once: an SFT run (2 steps), a reward run from it, an eval of it
    and an SFT sweep of two jobs."""
    data = tmp_path_factory.mktemp("bad-input-data")
    chat = write_jsonl(data / "chat.jsonl", chat_rows(16))
    prefs = write_jsonl(data / "prefs.jsonl", preference_rows(16))
    root = tmp_path_factory.mktemp("existing-runs")
    sft, rm, ev, sweep = root / "sft", root / "reward", root / "eval", root / "sweep"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "disabled")
        assert run_in_process(tiny_sft_args(tiny_model, chat, sft, "train.max_steps=2")) == 0
        assert run_in_process(["reward", f"init_from={sft / 'final'}", f"data={prefs}",
                               f"output_dir={rm}", "data.eval_size=4", "train.batch_size=4",
                               "train.max_steps=2"]) == 0  # fmt: skip
        assert run_in_process(["eval", f"policy={sft / 'final'}", f"reward.from={rm / 'final'}",
                               f"data={chat}", "data.eval_size=4", f"output_dir={ev}", "judge=null",
                               "perplexity_data=null", "generation.max_new_tokens=4", "samples=0",
                               "bootstrap=100"]) == 0  # fmt: skip
        assert run_in_process(sweep_args(tiny_model, chat, sweep)) == 0
    for done in (
        sft / "final" / "COMPLETE",
        rm / "final" / "COMPLETE",
        ev / "eval.json",
        sweep / "0" / "final" / "COMPLETE",
        sweep / "1" / "final" / "COMPLETE",
    ):
        assert done.is_file(), done
    pristine = tmp_path_factory.mktemp("existing-runs-pristine") / "copy"
    shutil.copytree(root, pristine)
    return Runs(root, pristine, sft, sft / "final", rm, rm / "final", ev, sweep, chat, prefs)


def sweep_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return tiny_sft_args(model, data, out, "train.max_steps=1", *extra, "-m", "lora.r=4,8")


@pytest.fixture(scope="module")
def other_arch(tmp_path_factory) -> Path:
    """A tiny Llama of another shape (hidden 32), with the same tokenizer."""
    return make_model(tmp_path_factory.mktemp("other-arch"), hidden_size=32)


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory) -> Path:
    """The same tiny Llama architecture with a smaller vocabulary (another tokenizer)."""
    folder = make_model(tmp_path_factory.mktemp("other-tokenizer"))
    make_tokenizer(folder, vocab_size=320)
    return folder


def snapshot(root: Path) -> dict[str, tuple]:
    """relative path -> (size, sha256) for every file, and "dir" for every folder, under root."""
    found: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_dir():
            found[rel] = ("dir",)
        else:
            found[rel] = (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    return found


# ---------------------------------------------------------------- what a case builds its argv from
@dataclass
class Ctx:
    tmp: Path  # this case's own folder (also the working directory)
    out: Path  # this case's output_dir
    model: Path  # the tiny model every run above was trained on
    other_arch: Path
    other_tokenizer: Path
    runs: Runs
    monkeypatch: pytest.MonkeyPatch

    def write(self, name: str, content: str | bytes | list) -> Path:
        """A file in this case's folder: text, bytes, or rows written as JSON lines."""
        path = self.tmp / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, list):
            write_jsonl(path, content)
        else:
            path.write_text(content, encoding="utf-8")
        return path

    def config_file(self, name: str, content: str | bytes) -> str:
        """`config=<a file with this content>` for the command line."""
        return f"config={self.write(name, content)}"

    def half_written(self, final: Path) -> Path:
        """A copy of a finished final/ folder without its COMPLETE marker."""
        copy = self.tmp / "half-written" / "final"
        shutil.copytree(final, copy)
        (copy / "COMPLETE").unlink()
        return copy

    def format(self, text: str) -> str:
        names = {k: str(v) for k, v in vars(self).items()} | {
            k: str(v) for k, v in vars(self.runs).items()
        }
        return text.format_map(names)


# command lines for each stage on the tiny model, output into the case's folder; one step at most
def sft(c: Ctx, data: Path | str, *extra: str) -> list[str]:
    return tiny_sft_args(c.model, data, c.out, "train.max_steps=1", *extra)


def reward(c: Ctx, data: Path | str, *extra: str, init: Path | str | None = None) -> list[str]:
    return ["reward", f"init_from={init or c.runs.sft_final}", f"data={data}", f"output_dir={c.out}",
            "data.eval_size=4", "train.batch_size=4", "train.max_steps=1", *extra]  # fmt: skip


def dpo(c: Ctx, data: Path | str, *extra: str, init: Path | str | None = None) -> list[str]:
    return ["dpo", f"init_from={init or c.runs.sft_final}", f"data={data}", f"output_dir={c.out}",
            "data.eval_size=4", "train.batch_size=4", "train.max_steps=1", *extra]  # fmt: skip


def ppo(c: Ctx, *extra: str) -> list[str]:
    return ["ppo", f"policy.init_from={c.runs.sft_final}", f"data={c.runs.chat}", "data.eval_size=4",
            f"output_dir={c.out}", "train.batch_size=4", "rollout.max_new_tokens=4",
            "train.max_steps=1", "ppo.epochs=1", "samples.every=0", "train.eval_every=0",
            *extra]  # fmt: skip


def kto(c: Ctx, data: Path | str, *extra: str, init: Path | str | None = None) -> list[str]:
    return ["kto", f"init_from={init or c.runs.sft_final}", f"data={data}", f"output_dir={c.out}",
            "data.eval_size=4", "train.batch_size=4", "train.max_steps=1", *extra]  # fmt: skip


def label(c: Ctx, *extra: str) -> list[str]:
    """`rlhf label` in binary mode on a two-candidate sample file, writing into the case's folder."""
    samples = c.write("samples.jsonl", [{"prompt": "What is 2 + 2?", "candidates": ["Answer: 4", "5"],
                                         "answer": "4"}])  # fmt: skip
    return ["label", "mode=binary", f"in={samples}", f"out={c.out / 'kto.jsonl'}", *extra]


def grpo(c: Ctx, *extra: str) -> list[str]:
    return ["grpo", f"policy.init_from={c.runs.sft_final}", f"data={c.runs.chat}", "data.eval_size=4",
            f"output_dir={c.out}", "train.batch_size=4", "train.grad_accum=1", "grpo.group_size=2",
            "rollout.max_new_tokens=4", "train.max_steps=1", "samples.every=0",
            "train.eval_every=0", *extra]  # fmt: skip


def evaluate(c: Ctx, *extra: str) -> list[str]:
    return ["eval", f"data={c.runs.chat}", "data.eval_size=4", f"output_dir={c.out}", "judge=null",
            "perplexity_data=null", "generation.max_new_tokens=4", "samples=0", "bootstrap=100",
            *extra]  # fmt: skip


def prefs_rows(n: int = 8) -> list[dict]:
    return preference_rows(n, 3)


@pytest.fixture(autouse=True)
def _forget_bitsandbytes_check():
    """transformers caches whether bitsandbytes is importable: after a case that hid it (and after
    monkeypatch put it back), forget the cached answer so later tests see the real package."""
    yield
    from transformers.utils import import_utils

    import_utils.is_bitsandbytes_available.cache_clear()


def _no_bitsandbytes(c: Ctx) -> None:
    """bitsandbytes unusable: `import bitsandbytes` fails (as without the package)."""
    from transformers.utils import import_utils

    import_utils.is_bitsandbytes_available.cache_clear()
    for name in [m for m in sys.modules if m == "bitsandbytes" or m.startswith("bitsandbytes.")]:
        c.monkeypatch.delitem(sys.modules, name)
    c.monkeypatch.setitem(sys.modules, "bitsandbytes", None)


def _no_cuda(c: Ctx) -> None:
    import torch

    c.monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def nf4_without_bitsandbytes(c: Ctx) -> list[str]:
    _no_bitsandbytes(c)
    return sft(c, c.runs.chat, "quant=nf4")


def unwritable_output_dir(c: Ctx) -> list[str]:
    """A read-only folder (as root, chmod does not stop writes: os.access answers as for a user)."""
    locked = c.tmp / "locked"
    locked.mkdir()
    real_access = os.access
    c.monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked and real_access(p, mode))
    return reward(c, c.runs.prefs, f"output_dir={locked / 'out'}")


def cuda_without_cuda(c: Ctx) -> list[str]:
    _no_cuda(c)
    return sft(c, c.runs.chat, "device=cuda")


def slurm_without_its_plugin(c: Ctx) -> list[str]:
    """hydra-submitit-launcher not installed (the `cluster` extra left out)."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    hidden = "hydra_plugins.hydra_submitit_launcher"
    c.monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == hidden else real_find_spec(name, *a),
    )
    return sft(c, c.runs.chat, "-m", "launcher=slurm", "lora.r=4,8")


def int8_without_cuda(c: Ctx) -> list[str]:
    _no_cuda(c)
    return dpo(c, c.runs.prefs, "quant=int8")


ONE_PAIR = {"prompt": "say hello ? ", "chosen": "blue", "rejected": "cat"}
ONE_KTO_ROW = {"prompt": "say hello ? ", "completion": "blue", "label": True}
LONG_PAIR = {"prompt": "what is the colour of the sky ? " * 4, "chosen": "blue", "rejected": "cat"}


@dataclass
class Case:
    id: str
    argv: Callable[[Ctx], list[str]]
    expected: str | tuple[str, ...]  # substrings of the error line; {names}: Ctx / Runs fields


CASES = [
    # ------------------------------------------------------------ the command line and config keys
    Case("unknown-stage", lambda c: ["sfft", "train.max_steps=1"], "unknown stage 'sfft'"),
    Case("unknown-top-level-key", lambda c: sft(c, c.runs.chat, "learning_rate=1e-4"),
         "Unknown config key 'learning_rate'"),
    Case("misspelt-nested-key", lambda c: dpo(c, c.runs.prefs, "dpo.betta=0.2"),
         "Unknown config key 'dpo.betta': did you mean 'dpo.beta'?"),
    Case("trl-name-for-a-key", lambda c: reward(c, c.runs.prefs, "lora.lora_alpha=16"),
         "did you mean 'lora.alpha'?"),
    Case("wrong-type-max-steps",
         lambda c: tiny_sft_args(c.model, c.runs.chat, c.out, "train.max_steps=abc"),
         "train.max_steps='abc' has the wrong type"),
    Case("negative-lr", lambda c: reward(c, c.runs.prefs, "optim.lr=-1"),
         "optim.lr=-1.0 is not valid"),
    Case("zero-lora-rank", lambda c: dpo(c, c.runs.prefs, "lora.r=0"), "lora.r=0 is not valid"),
    Case("negative-eval-size", lambda c: sft(c, c.runs.chat, "data.eval_size=-2"),
         "data.eval_size=-2.0 is not valid"),
    Case("dropout-above-1", lambda c: sft(c, c.runs.chat, "lora.dropout=1.5"),
         "lora.dropout=1.5 is not valid"),
    Case("label-smoothing-above-1", lambda c: dpo(c, c.runs.prefs, "dpo.label_smoothing=1.2"),
         "dpo.label_smoothing=1.2 is not valid"),
    Case("ppo-lambda-above-1", lambda c: ppo(c, "reward.fn=ppo_rewards:colour_share", "ppo.lam=1.5"),
         "ppo.lam=1.5 is not valid"),
    Case("float16-training", lambda c: dpo(c, c.runs.prefs, "quant.compute_dtype=float16"),
         ("quant.compute_dtype='float16' is not valid", "training in float16 needs loss scaling")),
    Case("unknown-group-option", lambda c: sft(c, c.runs.chat, "quant=fp3"),
         "Could not find 'quant/fp3'"),
    Case("sweep-without-m", lambda c: sft(c, c.runs.chat, "lora.r=8,16"),
         "lora.r=8,16 is a sweep; add -m"),
    Case("sweep-with-a-bad-value-into-a-finished-run",
         lambda c: tiny_sft_args(c.model, c.runs.chat, c.runs.sft, "-m", "lora.r=4,0"),
         "lora.r=0 is not valid"),
    # ------------------------------------------------------------ launchers and sweepers
    Case("optuna-without-m", lambda c: sft(c, c.runs.chat, "sweeper=optuna"),
         "sweeper=optuna applies to a sweep; add -m"),
    Case("slurm-without-m", lambda c: sft(c, c.runs.chat, "launcher=slurm"),
         "launcher=slurm applies to a sweep; add -m"),
    Case("slurm-plugin-missing", slurm_without_its_plugin,
         "launcher=slurm needs the hydra-submitit-launcher plugin, which is not installed"),
    Case("optuna-on-eval", lambda c: evaluate(c, f"policy={c.runs.sft_final}", "-m", "sweeper=optuna"),
         "the eval stage has none"),
    Case("optuna-eval-metric-without-held-out",
         lambda c: sft(c, c.runs.chat, "data.eval_size=0", "-m", "sweeper=optuna",
                       "optim.lr=interval(1e-4,1e-2)"),
         "objective.metric=eval/loss is measured on held-out data"),
    Case("range-without-optuna", lambda c: sft(c, c.runs.chat, "-m", "optim.lr=interval(1e-4,1e-2)"),
         "ranges need sweeper=optuna"),
    Case("optuna-range-with-a-bad-end",
         lambda c: sft(c, c.runs.chat, "-m", "sweeper=optuna", "lora.r=int(interval(0,8))"),
         "lora.r=0 is not valid"),
    Case("bad-objective-direction", lambda c: dpo(c, c.runs.prefs, "objective.direction=up"),
         "objective.direction='up' is not valid: choose one of minimize, maximize"),
    # ------------------------------------------------------------ config files
    Case("config-file-missing", lambda c: sft(c, c.runs.chat, f"config={c.tmp / 'nope.yaml'}"),
         "config={tmp}/nope.yaml: no such file"),
    Case("config-file-not-yaml",
         lambda c: sft(c, c.runs.chat, c.config_file('bad.yaml', 'optim: {lr: [1e-4\n')),
         "config={tmp}/bad.yaml is not valid YAML"),
    Case("config-file-not-a-mapping",
         lambda c: sft(c, c.runs.chat, c.config_file('list.yaml', '- lr\n- 1e-4\n')),
         "config={tmp}/list.yaml holds a list, not a mapping"),
    Case("config-file-not-utf8",
         lambda c: sft(c, c.runs.chat, c.config_file('latin1.yaml', b'optim: {lr: 1e-4} # caf\xe9')),
         "config={tmp}/latin1.yaml: the file is not UTF-8"),
    Case("config-file-unknown-nested-key",
         lambda c: sft(c, c.runs.chat, c.config_file('keys.yaml', 'optim:\n  learning_rate: 1.0e-4\n')),
         "did you mean 'optim.lr'?"),
    Case("config-file-wrong-type",
         lambda c: reward(c, c.runs.prefs, c.config_file('type.yaml', 'optim:\n  lr: fast\n')),
         "optim.lr='fast' has the wrong type"),
    # ------------------------------------------------------------ datasets
    Case("dataset-missing", lambda c: sft(c, c.tmp / "missing.jsonl"),
         "dataset file {tmp}/missing.jsonl does not exist"),
    Case("dataset-empty", lambda c: dpo(c, c.write("empty.jsonl", "")), "has no rows"),
    Case("dataset-only-blank-lines", lambda c: reward(c, c.write("blank.jsonl", "\n\n  \n")),
         "has no rows"),
    Case("sft-columns-missing", lambda c: sft(c, c.write("text.jsonl", [{"text": "hello"}] * 8)),
         "has columns ['text']"),
    Case("sft-column-misnamed",
         lambda c: sft(c, c.runs.chat, "data.columns.messages=conversation"),
         "but SFT needs `conversation`"),
    Case("sft-completion-column-missing",
         lambda c: sft(c, c.write("prompt-only.jsonl", [{"prompt": "say hello"}] * 8)),
         "is missing column(s) ['completion']"),
    Case("dpo-rejected-column-missing",
         lambda c: dpo(c, c.write("no-rejected.jsonl", [{"prompt": "a ?", "chosen": "blue"}] * 8)),
         "is missing column(s) ['rejected']"),
    Case("reward-column-misnamed",
         lambda c: reward(c, c.runs.prefs, "data.columns.chosen=good"),
         "is missing column(s) ['good']"),
    Case("ppo-prompt-column-missing",
         lambda c: ppo(c, "reward.fn=ppo_rewards:colour_share",
                       f"data={c.write('questions.jsonl', [{'question': 'what is red ?'}] * 16)}"),
         "has columns ['question'], but prompts need `prompt`"),
    Case("sft-non-string-content",
         lambda c: sft(c, c.write("number.jsonl", [{"prompt": "say hello", "completion": 5}] * 8)),
         "`completion`"),
    Case("sft-message-content-not-a-string",
         lambda c: sft(c, c.write("message.jsonl", [{"messages": [{"role": "user", "content": 7}]}] * 8)),
         "must be an object with string `role` and `content`"),
    Case("dpo-empty-chosen",
         lambda c: dpo(c, c.write("empty-chosen.jsonl", [{**ONE_PAIR, "chosen": "  "}] * 8)),
         "`chosen` is empty"),
    Case("reward-chosen-without-rejected-in-one-row",
         lambda c: reward(c, c.write("shape.jsonl", prefs_rows(5) + [{"prompt": "a ?", "chosen": "red"}]
                                     + prefs_rows(4)), "data.eval_size=0"),
         "line 6 `rejected`"),
    Case("reward-bad-row-is-reported-by-its-line-in-the-file",
         lambda c: reward(c, c.write("shape2.jsonl", prefs_rows(5) + [{"prompt": "a ?", "chosen": "red"}]
                                     + prefs_rows(10))),
         "line 6 `rejected`"),
    Case("invalid-json-line",
         lambda c: dpo(c, c.write("broken.jsonl", json.dumps(ONE_PAIR) + "\n" + json.dumps(ONE_PAIR)
                                  + '\n{"prompt": "a", "chosen": \n' + json.dumps(ONE_PAIR) + "\n")),
         "broken.jsonl line 3 is not valid JSON"),
    Case("invalid-json-array",
         lambda c: sft(c, c.write("broken.json", '[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": }\n]\n')),
         "broken.json is not valid JSON (line 3"),
    Case("row-not-an-object",
         lambda c: reward(c, c.write("list-row.jsonl", json.dumps(ONE_PAIR) + "\n[1, 2]\n")),
         "line 2 is a list, not a JSON object"),
    Case("non-utf8-bytes",
         lambda c: reward(c, c.write("latin1.jsonl", b'{"prompt": "caf\xe9 ?", "chosen": "blue", "rejected": "cat"}\n' * 8)),
         "latin1.jsonl is not UTF-8 text"),
    Case("sft-all-examples-too-long",
         lambda c: sft(c, c.runs.chat, "data.max_length=8", "data.truncation=drop"),
         "no usable example in {chat}"),
    Case("dpo-all-pairs-too-long",
         lambda c: dpo(c, c.write("long.jsonl", [LONG_PAIR] * 8), "data.max_length=16",
                       "data.truncation=drop"),
         "no usable example in {tmp}/long.jsonl: 0/4 examples kept"),
    Case("eval-size-holds-out-everything", lambda c: sft(c, c.runs.chat, "data.eval_size=16"),
         "would hold out all 16 rows"),
    Case("data-path-is-a-folder", lambda c: sft(c, c.tmp), "is a folder"),
    # ------------------------------------------------------------ checkpoints to start from
    Case("init-from-nothing", lambda c: reward(c, c.runs.prefs, init=c.tmp / "nothing" / "final"),
         "init_from={tmp}/nothing/final does not exist"),
    Case("init-from-half-written",
         lambda c: dpo(c, c.runs.prefs, init=c.half_written(c.runs.sft_final)),
         "is not a complete rlhf checkpoint"),
    Case("init-from-a-run-folder", lambda c: reward(c, c.runs.prefs, init=c.runs.sft),
         "is a run folder; use its final/ folder"),
    Case("dpo-init-from-reward", lambda c: dpo(c, c.runs.prefs, init=c.runs.rm_final),
         "is a reward checkpoint, but rlhf dpo starts from sft"),
    Case("ppo-policy-from-reward",
         lambda c: ppo(c, "reward.fn=ppo_rewards:colour_share", f"policy.init_from={c.runs.rm_final}"),
         "policy.init_from={rm_final} is a reward checkpoint"),
    Case("ppo-reward-from-sft", lambda c: ppo(c, f"reward.from={c.runs.sft_final}"),
         "reward.from={sft_final} is a sft checkpoint"),
    Case("ppo-reward-from-half-written",
         lambda c: ppo(c, f"reward.from={c.half_written(c.runs.rm_final)}"),
         "is not a complete rlhf checkpoint"),
    Case("grpo-policy-from-reward",
         lambda c: grpo(c, "reward.fns=[ppo_rewards:colour_share]", f"policy.init_from={c.runs.rm_final}"),
         "policy.init_from={rm_final} is a reward checkpoint"),
    Case("grpo-reward-from-sft", lambda c: grpo(c, f"reward.from={c.runs.sft_final}"),
         "reward.from={sft_final} is a sft checkpoint"),
    Case("grpo-reward-fn-column-missing", lambda c: grpo(c, "reward.fns=[rlhf_cli.judges:demo_gold]"),
         "reward.fns=rlhf_cli.judges:demo_gold needs the column(s) answer"),
    Case("grpo-group-does-not-divide",
         lambda c: grpo(c, "reward.fns=[ppo_rewards:colour_share]", "grpo.group_size=3"),
         "grpo.group_size=3 does not divide the 4 episodes of a step"),
    Case("grpo-gspo-with-token-mean",
         lambda c: grpo(c, "reward.fns=[ppo_rewards:colour_share]", "grpo.importance=sequence"),
         "use grpo.loss_agg=seq_mean_token_mean with it"),
    Case("grpo-weights-count",
         lambda c: grpo(c, "reward.fns=[ppo_rewards:colour_share]", f"reward.from={c.runs.rm_final}",
                        "reward.weights=[1.0]"),
         "give one weight per reward (2: each of reward.fns in order, then reward.from)"),
    Case("grpo-no-reward", lambda c: grpo(c), "neither is set; give reward functions"),
    Case("grpo-env-does-not-import", lambda c: grpo(c, "env=no_such_envs:Game"),
         "env.name=no_such_envs:Game: could not import no_such_envs"),
    Case("grpo-env-reset-wrong-shape", lambda c: grpo(c, "env=toy_envs:WrongReset"),
         "toy_envs:WrongReset.reset returned int '42'; it must return a string (one user message) or a list"),
    Case("grpo-env-tool-without-schema", lambda c: grpo(c, "env=toy_envs:BadTool"),
         "no JSON schema could be built for `undocumented`"),
    Case("grpo-verifiers-env-not-installed",
         lambda c: grpo(c, "env=verifiers", "env.kwargs={id: no_such_vf_env}"),
         "env.kwargs.id=no_such_vf_env: no module no_such_vf_env is installed or in the current folder"),
    Case("grpo-verifiers-group-rubric",
         lambda c: grpo(c, "env=verifiers", "env.kwargs={id: vf_envs, args: {kind: group}}"),
         "has a rubric with group reward functions; env=verifiers scores each episode by itself"),
    Case("grpo-verifiers-row-without-prompt",
         lambda c: grpo(c, "env=verifiers", "env.kwargs={id: vf_envs}",
                        f"data={c.write('secrets.jsonl', [{'secret': 3}] * 8)}"),
         "has neither `prompt` nor `question`"),
    # ------------------------------------------------------------ kto, orpo, binary labels
    Case("kto-given-sft-data", lambda c: kto(c, c.runs.chat),
         "holds SFT demonstrations, but rlhf kto needs unpaired feedback"),
    Case("dpo-given-kto-data", lambda c: dpo(c, c.write("kto.jsonl", [ONE_KTO_ROW] * 8)),
         "holds unpaired feedback (prompt/completion with a good/bad `label`, KTO's format), but rlhf "
         "dpo needs preference pairs"),
    Case("reward-given-kto-data", lambda c: reward(c, c.write("kto.jsonl", [ONE_KTO_ROW] * 8)),
         "train it with rlhf kto"),
    Case("kto-label-not-a-boolean",
         lambda c: kto(c, c.write("numbers.jsonl", [{**ONE_KTO_ROW, "label": 1}] * 8)),
         "`label` must be true (desirable) or false (undesirable), got 1."),
    Case("kto-label-column-renamed-wrongly",
         lambda c: kto(c, c.write("thumbs.jsonl", [ONE_KTO_ROW] * 8), "data.columns.label=thumbs_up"),
         "rlhf kto needs unpaired feedback: `prompt` + `completion` (text or messages) + a true/false `thumbs_up`"),
    Case("kto-batch-of-one", lambda c: kto(c, c.runs.prefs, "train.batch_size=1"),
         "train.batch_size=1: kto.loss=kto estimates its KL reference point"),
    Case("kto-negative-weight", lambda c: kto(c, c.runs.prefs, "kto.desirable_weight=-1"),
         "kto.desirable_weight=-1.0 is not valid: it must be greater than 0."),
    Case("kto-init-from-reward", lambda c: kto(c, c.runs.prefs, init=c.runs.rm_final),
         "is a reward checkpoint, but rlhf kto starts from sft"),
    Case("dpo-unknown-loss", lambda c: dpo(c, c.runs.prefs, "dpo.loss=orp"), "dpo.loss='orp' is not valid"),
    Case("label-unknown-mode", lambda c: label(c, "mode=ranking", "judge=rlhf_cli.judges:demo_format"),
         "mode='ranking' is not valid: choose one of pairwise, binary."),
    Case("label-strength-with-binary", lambda c: label(c, "strength=true"),
         "strength=true applies to pairs of responses, and mode=binary labels single responses"),
    Case("label-binary-pairs-file",
         lambda c: ["label", "mode=binary", f"in={c.write('prefs.jsonl', [ONE_PAIR])}",
                    f"out={c.out / 'kto.jsonl'}", "judge=rlhf_cli.judges:demo_format"],
         "has no `candidates`, `completion` or `response`"),
    # ------------------------------------------------------------ export
    Case("export-no-from", lambda c: ["export", f"output_dir={c.out}"], "from is not set"),
    Case("export-from-run-folder",
         lambda c: ["export", f"from={Path(c.runs.sft_final).parent}", f"output_dir={c.out}"],
         "is a run folder; use its final/ folder"),
    Case("export-from-half-written",
         lambda c: ["export", f"from={c.half_written(c.runs.sft_final)}", f"output_dir={c.out}"],
         "is not a complete rlhf checkpoint"),
    Case("export-into-a-training-run",
         lambda c: ["export", f"from={c.runs.sft_final}", f"output_dir={Path(c.runs.sft_final).parent}",
                    "overwrite=true"],
         "already holds files that are not an rlhf export"),
    Case("export-format", lambda c: ["export", f"from={c.runs.sft_final}", f"output_dir={c.out}",
                                     "format=onnx"], "format='onnx' is not valid"),
    Case("eval-policy-is-reward", lambda c: evaluate(c, f"policy={c.runs.rm_final}"),
         "policy={rm_final} is a reward checkpoint"),
    Case("eval-reward-from-sft",
         lambda c: evaluate(c, f"policy={c.runs.sft_final}", f"reward.from={c.runs.sft_final}"),
         "reward.from={sft_final} is a sft checkpoint"),
    Case("init-from-another-architecture",
         lambda c: reward(c, c.runs.prefs, f"model.name_or_path={c.other_arch}"),
         "a different architecture or tokenizer"),
    Case("init-from-another-tokenizer",
         lambda c: dpo(c, c.runs.prefs, f"model.name_or_path={c.other_tokenizer}"),
         "a different architecture or tokenizer"),
    Case("model-folder-missing",
         lambda c: sft(c, c.runs.chat, f"model.name_or_path={c.tmp / 'no-model'}"),
         "model.name_or_path={tmp}/no-model does not exist"),
    # ------------------------------------------------------------ output folders and resuming
    Case("sft-output-dir-holds-a-finished-run",
         lambda c: tiny_sft_args(c.model, c.runs.chat, c.runs.sft, "train.max_steps=1"),
         "output_dir={sft} already holds a finished run (final/)"),
    Case("reward-output-dir-holds-a-finished-run",
         lambda c: ["reward", f"init_from={c.runs.sft_final}", f"data={c.runs.prefs}",
                    f"output_dir={c.runs.rm}", "data.eval_size=4", "train.max_steps=1"],
         "output_dir={rm} already holds a finished run (final/)"),
    Case("eval-output-dir-holds-an-eval",
         lambda c: evaluate(c, f"policy={c.runs.sft_final}", f"output_dir={c.runs.eval}"),
         "output_dir={eval} already holds a finished run (eval.json)"),
    Case("sweep-into-a-finished-run", lambda c: sweep_args(c.model, c.runs.chat, c.runs.sft),
         "output_dir={sft} already holds a finished run"),
    Case("sweep-again-into-a-finished-sweep",
         lambda c: sweep_args(c.model, c.runs.chat, c.runs.sweep, "optim.lr=1e-3"),
         ("output_dir={sweep} already holds this sweep's 2 finished jobs")),
    Case("output-dir-not-writable", unwritable_output_dir,
         "output_dir={tmp}/locked/out is not writable"),
    Case("output-dir-under-a-file",
         lambda c: sft(c, c.runs.chat, f"output_dir={c.write('afile', 'x') / 'out'}"),
         "output_dir={tmp}/afile/out cannot be created"),
    Case("resume-from-a-final-folder", lambda c: sft(c, c.runs.chat, f"resume={c.runs.sft_final}"),
         "resume={sft_final} is not a complete resume checkpoint"),
    Case("resume-from-nothing", lambda c: dpo(c, c.runs.prefs, f"resume={c.tmp / 'step-000001'}"),
         "resume={tmp}/step-000001 is not a complete resume checkpoint"),
    # ------------------------------------------------------------ the machine
    Case("nf4-without-bitsandbytes", nf4_without_bitsandbytes,
         "quant=nf4 needs a working bitsandbytes"),
    Case("device-cuda-without-cuda", cuda_without_cuda,
         "device=cuda was requested but CUDA is not available"),
    Case("int8-without-cuda", int8_without_cuda, "quant=int8 needs CUDA"),
    # ------------------------------------------------------------ PPO reward functions, eval options
    Case("reward-fn-module-missing", lambda c: ppo(c, "reward.fn=no_such_rewards_module:score"),
         "reward.fn=no_such_rewards_module:score: could not import no_such_rewards_module"),
    Case("reward-fn-function-missing", lambda c: ppo(c, "reward.fn=ppo_rewards:no_such_function"),
         "has no function 'no_such_function'"),
    Case("reward-fn-wrong-count", lambda c: ppo(c, "reward.fn=ppo_rewards:one_too_few"),
         "returned 7 values for 8 responses"),
    Case("reward-fn-not-finite", lambda c: ppo(c, "reward.fn=ppo_rewards:not_finite"),
         "returned nan for response 0; rewards must be finite numbers"),
    Case("reward-fn-not-numbers", lambda c: ppo(c, "reward.fn=ppo_rewards:text_not_numbers"),
         "not a sequence of numbers"),
    Case("reward-fn-and-reward-from",
         lambda c: ppo(c, "reward.fn=ppo_rewards:colour_share", f"reward.from={c.runs.rm_final}"),
         "give exactly one"),
    Case("eval-compare-nothing",
         lambda c: evaluate(c, f"policy={c.runs.sft_final}", f"compare={c.tmp / 'no-eval'}"),
         "compare={tmp}/no-eval holds no eval.json"),
    Case("eval-compare-not-an-eval-result",
         lambda c: evaluate(c, f"policy={c.runs.sft_final}",
                            f"compare={c.runs.sft_final / 'rlhf_stage.json'}"),
         "rlhf_stage.json is not an rlhf eval result"),
    Case("eval-compare-a-training-run",
         lambda c: evaluate(c, f"policy={c.runs.sft_final}", f"compare={c.runs.sft}"),
         "compare={sft} holds no eval.json"),
    Case("eval-judge-missing", lambda c: evaluate(c, f"policy={c.runs.sft_final}",
                                                  "judge=rlhf_cli.judges:no_such_judge"),
         "has no function 'no_such_judge'"),
]  # fmt: skip


def message_lines(stderr: str) -> list[str]:
    """stderr without blank lines and progress-bar redraws."""
    return [
        line.strip()
        for line in stderr.splitlines()
        if line.strip() and not PROGRESS_NOISE.search(line)
    ]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_one_sentence_and_exit_2(
    case: Case, runs, tiny_model, other_arch, other_tokenizer, tmp_path, monkeypatch, capfd
):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # as the CLI sets it: internal errors would show
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))  # reward.fn puts the cwd on sys.path
    monkeypatch.chdir(tmp_path)
    ctx = Ctx(
        tmp_path, tmp_path / "out", tiny_model, other_arch, other_tokenizer, runs, monkeypatch
    )
    argv = case.argv(ctx)
    wanted = (case.expected,) if isinstance(case.expected, str) else case.expected
    expected = [ctx.format(text) for text in wanted]
    before = snapshot(runs.root)
    capfd.readouterr()

    try:
        code = run_in_process(argv)
    finally:
        err = capfd.readouterr().err
        after = snapshot(runs.root)
        if after != before:  # put the shared runs back for the next cases, then fail below
            shutil.rmtree(runs.root)
            shutil.copytree(runs.pristine, runs.root)

    detail = f"argv={argv}\nstderr:\n{err[-3000:]}"
    assert code == 2, detail
    assert "Traceback" not in err and 'File "' not in err, detail
    lines = message_lines(err)
    assert len(lines) == 1, detail
    assert ERROR_LINE.match(lines[0]), detail
    assert not SECOND_SENTENCE.search(lines[0].split(": error: ", 1)[1]), detail
    for text in expected:
        assert text in lines[0], f"expected {text!r}\n{detail}"
    added = sorted(set(after) - set(before))
    changed = sorted(k for k in before if after.get(k) != before[k])
    assert not added and not changed, f"added {added}, changed or removed {changed}\n{detail}"
    # the case's own new output_dir: nothing, or (bad input found after the model loaded) no result
    leftovers = sorted(p.name for p in ctx.out.iterdir()) if ctx.out.exists() else []
    assert not {"final", "eval.json", "checkpoints"} & set(leftovers), leftovers
    assert leftovers != [".hydra"], "a folder with nothing but Hydra's record is left"


def test_the_catalogue_has_at_least_34_distinct_cases():
    assert len(CASES) >= 34 and len({c.id for c in CASES}) == len(CASES)


def test_the_in_process_runs_left_no_state_behind():
    """After every case above: Hydra is not initialised, the command recorded for resuming is gone,
    and the SIGPIPE handler (which `main` sets to the default) is pytest's again."""
    from hydra.core.global_hydra import GlobalHydra

    from rlhf_cli.cli.run import COMMAND_ENV

    assert not GlobalHydra.instance().is_initialized()
    assert COMMAND_ENV not in os.environ
    if hasattr(signal, "SIGPIPE"):
        assert signal.getsignal(signal.SIGPIPE) == SIGPIPE_AT_IMPORT
