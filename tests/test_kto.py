"""`rlhf kto` on tiny models: the KL pairs, the data formats, step-0 invariants, learning, weight
advice, resume after SIGKILL, and ORPO (`rlhf dpo dpo.loss=orpo`) from the raw base."""

import json

import pytest
import torch
from safetensors.torch import load_file

from rlhf_cli import data, modeling
from rlhf_cli.data import IGNORE_INDEX, Example, UnpairedExample
from rlhf_cli.stages.kto import eval_batches, weight_advice
from rlhf_cli.tracking import read_metrics

from conftest import assert_same_tensors, config_of, kill_and_resume, run_cli, tiny_sft_args
from tiny import preference_rows, write_jsonl


def unpaired_rows(n: int, seed: int) -> list[dict]:
    """TRL's unpaired format from the tiny preference rows: each pair's chosen as a desirable row,
    its rejected as an undesirable one, alternately, so no prompt appears twice."""
    rows = []
    for i, pair in enumerate(preference_rows(n, seed)):
        good = i % 2 == 0
        rows.append(
            {
                "prompt": pair["prompt"],
                "completion": pair["chosen" if good else "rejected"],
                "label": good,
            }
        )
    return rows


@pytest.fixture(scope="module")
def feedback(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kto-data")
    return write_jsonl(folder / "train.jsonl", unpaired_rows(96, 0)), write_jsonl(
        folder / "eval.jsonl", unpaired_rows(32, 1)
    )


@pytest.fixture(scope="module")
def sft_final(tmp_path_factory, tiny_model, chat16):
    out = tmp_path_factory.mktemp("kto-sft") / "sft"
    result = run_cli(*tiny_sft_args(tiny_model, chat16, out, "train.max_steps=3", "optim.lr=1e-2"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "final"


def kto_args(init, feedback, out, *extra):
    train, held_out = feedback
    return ["kto", f"init_from={init}", f"data={train}", f"data.eval_path={held_out}", f"output_dir={out}",
            "optim.lr=5e-3", "optim.warmup_ratio=0", "train.log_every=4", "train.grad_accum=1", *extra]  # fmt: skip


# ---------------------------------------------------------------------------- data


def _row(prompt: list[int], completion: list[int], good: bool, index: int) -> UnpairedExample:
    ids = prompt + completion
    labels = [IGNORE_INDEX] * len(prompt) + completion
    return UnpairedExample(Example(ids, labels), len(prompt), good, index)


def test_kl_pairs_join_each_prompt_with_the_previous_rows_completion():
    rows = [_row([1, 10], [20, 21], True, 0), _row([1, 11, 12], [22], False, 1),
            _row([1, 13], [23, 24, 25], True, 2)]  # fmt: skip
    pairs = data.mismatched(rows, max_length=64, bos_id=1)
    assert [p.input_ids for p in pairs] == [[1, 10, 23, 24, 25], [1, 11, 12, 20, 21], [1, 13, 22]]
    assert [p.labels for p in pairs] == [
        [IGNORE_INDEX] * 2 + [23, 24, 25], [IGNORE_INDEX] * 3 + [20, 21], [IGNORE_INDEX] * 2 + [22]
    ]  # fmt: skip
    # too long: the prompt's start goes, after its BOS; the completion stays whole
    cut = data.mismatched(rows, max_length=4, bos_id=1)
    assert cut[0].input_ids == [1, 23, 24, 25] and cut[0].labels[1:] == [23, 24, 25]
    batch = data.collate_unpaired(rows, pairs, 0)
    assert batch["rows"]["input_ids"].shape == (3, 5) and batch["kl"]["input_ids"].shape == (3, 5)
    assert batch["desirable"].tolist() == [True, False, True]


def test_pairs_and_unpaired_rows_in_text_and_chat_form(tiny_model):
    tokenizer = modeling.load_tokenizer(config_of("kto", f"model.name_or_path={tiny_model}").model)
    config = config_of("kto", "data.columns.label=thumbs_up")
    text = [{"prompt": "red or cat ?", "completion": " red", "thumbs_up": True},
            {"prompt": "red or cat ?", "completion": " cat", "thumbs_up": False}]  # fmt: skip
    chat = [{"prompt": [{"role": "user", "content": "red or cat ?"}],
             "completion": [{"role": "assistant", "content": "red"}], "thumbs_up": True}]  # fmt: skip
    pairs = [{"prompt": "red or cat ?", "chosen": " red", "rejected": " cat"}]
    got = {}
    for name, rows in (("text", text), ("chat", chat), ("pairs", pairs)):
        got[name], stats = data.tokenize_unpaired(rows, tokenizer, config.data, name)
        assert stats.kept == len(got[name])
    assert [r.desirable for r in got["text"]] == [True, False]
    assert [r.desirable for r in got["pairs"]] == [True, False]
    # a pair gives exactly the two unpaired rows of its sides
    assert [r.input_ids for r in got["pairs"]] == [r.input_ids for r in got["text"]]
    for row in [*got["text"], *got["chat"]]:  # targets: the completion alone, from prompt_length on
        labels = row.example.labels
        assert all(t == IGNORE_INDEX for t in labels[: row.prompt_length])
        assert labels[row.prompt_length] == row.input_ids[row.prompt_length]
    rendered = tokenizer.decode(got["chat"][0].input_ids[got["chat"][0].prompt_length :])
    assert rendered.startswith("red")  # the assistant header is prompt, not target


def test_weight_advice_follows_the_papers_range():
    assert weight_advice(100, 100, 1.0, 1.0) is None
    assert weight_advice(100, 90, 1.0, 1.0) is None  # 100 / 90 = 1.11 is inside [1, 4/3]
    advice = weight_advice(100, 400, 1.0, 1.0)
    # desirable_weight in [400/100, 4/3 x 4] or undesirable_weight in [0.75 x 100/400, 100/400]
    assert "kto.desirable_weight in [4.00, 5.33]" in advice
    assert "kto.undesirable_weight in [0.19, 0.25]" in advice
    assert weight_advice(100, 400, 4.5, 1.0) is None  # 450 / 400 = 1.125
    assert weight_advice(0, 10, 1.0, 1.0) is None  # one kind only: no ratio to advise on


def test_a_lone_last_held_out_row_joins_the_batch_before():
    assert [len(b) for b in eval_batches(list(range(9)), 4)] == [4, 5]
    assert [len(b) for b in eval_batches(list(range(10)), 4)] == [4, 4, 2]


# ---------------------------------------------------------------------------- training


def test_step0_invariants_and_learning(tmp_path, sft_final, feedback):
    out = tmp_path / "kto"
    result = run_cli(
        *kto_args(sft_final, feedback, out, "train.max_steps=24", "train.eval_every=0"),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "48 desirable and 48 undesirable training rows" in result.stdout
    assert "advice" not in result.stdout
    steps = [m for m in read_metrics(out) if "loss" in m]
    first = steps[0]
    # policy == reference before the first update: r = 0 and z0 = 0, so every row costs
    # 1 - sigmoid(0) = 0.5. Exact: the reference (init_from's adapter loaded again) holds the
    # policy's values, both 64-byte aligned, and runs the same kernels on the same micro-batch (its
    # rows, then its KL pairs), so r and z0 are 0.0; 1 - sigmoid(0) = 0.5 is exact in float32, and
    # so is a mean of halves (weights 1)
    assert first["loss"] == 0.5
    assert first["kl"] == 0.0
    assert first["rewards/chosen"] == 0.0
    manifest = json.loads((out / "final" / "rlhf_stage.json").read_text())
    final = manifest["final_metrics"]
    assert manifest["stage"] == "kto" and manifest["parent"]["stage"] == "sft"
    # learned: desirable completions gained log-probability against the reference, undesirable
    # ones lost it, on held-out rows
    assert final["eval/rewards/chosen"] > 0 > final["eval/rewards/rejected"]
    assert final["eval/accuracy"] >= 0.8
    assert steps[-1]["loss"] < 0.45
    start, end = (
        load_file(sft_final / "adapter_model.safetensors"),
        load_file(out / "final" / "adapter_model.safetensors"),
    )
    assert all(not torch.equal(start[k], end[k]) for k in start)


def test_unbalanced_data_prints_the_weights_to_use(tmp_path, sft_final):
    rows = [r for i, r in enumerate(unpaired_rows(60, 2)) if r["label"] or i % 6 == 1]
    train = write_jsonl(tmp_path / "unbalanced.jsonl", rows)  # 30 desirable, 10 undesirable
    result = run_cli("kto", f"init_from={sft_final}", f"data={train}", "data.eval_size=0",
                     f"output_dir={tmp_path / 'kto'}", "train.max_steps=1", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "30 desirable and 10 undesirable training rows" in result.stdout
    # w_D n_D / (w_U n_U) = 3: desirable_weight in [1/3, 4/9], or undesirable_weight in [2.25, 3]
    text = " ".join(result.stdout.split())
    assert "kto.desirable_weight in [0.33, 0.44] or kto.undesirable_weight in [2.25, 3.00]" in text


def test_balance_raises_the_rarer_kinds_weight_and_records_it(tmp_path, sft_final):
    rows = [r for i, r in enumerate(unpaired_rows(60, 2)) if r["label"] or i % 6 == 1]
    train = write_jsonl(tmp_path / "unbalanced.jsonl", rows)  # 30 desirable, 10 undesirable
    out = tmp_path / "kto"
    result = run_cli("kto", f"init_from={sft_final}", f"data={train}", "data.eval_size=0",
                     f"output_dir={out}", "train.max_steps=1", "kto.balance=true", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "advice" not in result.stdout
    # the undesirable rows are rarer: their weight becomes 30 x 1.0 / 10 = 3
    assert "desirable_weight=1, undesirable_weight=3 " in result.stdout
    manifest = json.loads((out / "final" / "rlhf_stage.json").read_text())
    # exact: 1.0 x 30 / 10 in float64 is 3.0, and JSON gives a float back as it was written
    assert manifest["config"]["kto"]["undesirable_weight"] == 3.0


def test_apo_zero_unpaired_runs_without_kl_passes(tmp_path, sft_final, feedback):
    out = tmp_path / "apo"
    result = run_cli(*kto_args(sft_final, feedback, out, "train.max_steps=2", "kto.loss=apo_zero_unpaired",
                               "train.batch_size=1"), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(m["kl"] == 0 for m in read_metrics(out) if "kl" in m)


@pytest.mark.slow  # SIGKILL: many processes (make test runs it)
def test_kto_sigkill_then_resume_equals_the_uninterrupted_run(tmp_path, sft_final, feedback):
    args = kto_args(sft_final, feedback, "unused", "train.max_steps=6", "train.save_every=2",
                    "train.keep_last=1", "train.eval_every=0")  # fmt: skip
    common = [a for a in args if not a.startswith("output_dir=")]
    full = tmp_path / "full"
    result = run_cli(*common, f"output_dir={full}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    crashed = tmp_path / "crashed"
    kills = kill_and_resume([*common, f"output_dir={crashed}"], crashed, tmp_path, 3)
    full_loss = {m["step"]: m["loss"] for m in read_metrics(full) if "loss" in m}
    resumed = [m for m in read_metrics(crashed) if "loss" in m]
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6], kills
    for m in resumed:
        # exact: the same process setup (threads, kernels) replays the same batches from restored
        # weights, optimizer, schedule and random state
        assert m["loss"] == full_loss[m["step"]], kills
    assert_same_tensors(
        full / "final" / "adapter_model.safetensors",
        crashed / "final" / "adapter_model.safetensors",
    )


def test_a_kto_policy_feeds_eval_and_the_next_round(tmp_path, sft_final, feedback, prompts_file):
    out = tmp_path / "kto"
    result = run_cli(*kto_args(sft_final, feedback, out, "train.max_steps=2"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # a second round of feedback starts from the first round's policy, with either method
    for stage in ("kto", "dpo"):
        train, held_out = feedback
        data_arg = (
            f"data={train}"
            if stage == "kto"
            else f"data={write_jsonl(tmp_path / 'p.jsonl', preference_rows(16, 3))}"
        )
        result = run_cli(stage, f"init_from={out / 'final'}", data_arg, "data.eval_size=0",
                         f"output_dir={tmp_path / ('round2-' + stage)}", "train.max_steps=1", cwd=tmp_path)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        manifest = json.loads(
            (tmp_path / f"round2-{stage}" / "final" / "rlhf_stage.json").read_text()
        )
        assert manifest["parent"]["stage"] == "kto"
    result = run_cli("eval", f"policy={out / 'final'}", f"data={prompts_file}", "data.eval_size=4",
                     "generation.max_new_tokens=4", f"output_dir={tmp_path / 'eval'}", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow  # a sweep: two jobs
def test_a_kto_sweep_runs_each_beta_and_summarises_them(tmp_path, sft_final, feedback):
    out = tmp_path / "sweep"
    args = [
        a
        for a in kto_args(sft_final, feedback, out, "train.max_steps=2")
        if a != "train.log_every=4"
    ]
    result = run_cli(*args, "-m", "kto.beta=0.05,0.5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    betas = [json.loads((out / job / "final" / "rlhf_stage.json").read_text())["config"]["kto"]["beta"]
             for job in ("0", "1")]  # fmt: skip
    assert betas == [0.05, 0.5]
    summary = (out / "sweep_summary.csv").read_text()
    assert "kto.beta" in summary and "eval/accuracy" in summary


# ---------------------------------------------------------------------------- ORPO


def test_orpo_trains_from_the_raw_base_without_a_reference(tmp_path, tiny_model):
    train = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(64, 0))
    held_out = write_jsonl(tmp_path / "held.jsonl", preference_rows(32, 1))
    out = tmp_path / "orpo"
    result = run_cli("dpo", "dpo.loss=orpo", f"model.name_or_path={tiny_model}", f"data={train}",
                     f"data.eval_path={held_out}", f"output_dir={out}", "optim.lr=5e-3",
                     "optim.warmup_ratio=0", "train.max_steps=16", "train.eval_every=0", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reference: none (orpo is reference-free)" in result.stdout
    steps = [m for m in read_metrics(out) if "loss" in m]
    # the SFT term: the chosen completions' NLL falls; the odds ratio: chosen ahead of rejected
    assert steps[-1]["nll_loss"] < 0.7 * steps[0]["nll_loss"]
    assert steps[-1]["log_odds_ratio"] > steps[0]["log_odds_ratio"]
    manifest = json.loads((out / "final" / "rlhf_stage.json").read_text())
    assert manifest["parent"] is None
    # held-out pairs ranked right (chance: 0.5; an odds-ratio term with the wrong sign: below it)
    assert manifest["final_metrics"]["eval/rewards/accuracies"] >= 0.75
