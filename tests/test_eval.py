"""`rlhf eval`: the statistics, the demo judge, dataset columns for judges and rewards, and the
command on tiny checkpoints (KL exactly 0 against itself, win rates exactly 1/2 against itself)."""

import csv
import json
import math
from pathlib import Path

import pytest

from rlhf_cli.judges import demo_format, demo_gold
from rlhf_cli.schema import UserError
from rlhf_cli.scoring import ProgrammaticReward
from rlhf_cli.stages.eval import bootstrap_interval, win_rate

from conftest import config_of, data_config, run_cli, run_in_process
from tiny import write_jsonl


# ---------------------------------------------------------------- pure functions
def test_bootstrap_interval_brackets_the_mean_and_narrows_with_more_data():
    small = [1.0, 0.0] * 10
    large = [1.0, 0.0] * 500
    low, high = bootstrap_interval(small, 2000, seed=0)
    assert low < 0.5 < high and high - low > 0.3  # 20 coin flips: roughly +-0.22
    low2, high2 = bootstrap_interval(large, 2000, seed=0)
    assert low2 < 0.5 < high2 and high2 - low2 < 0.08  # 1000: roughly +-0.03
    assert bootstrap_interval(small, 2000, seed=0) == (low, high)  # seeded
    # float64 means of nine 0.7s: a few ulps off 0.7 (~1e-16), far under approx's rel=1e-6
    assert bootstrap_interval([0.7] * 9, 500, seed=1) == pytest.approx((0.7, 0.7))


def test_win_rate_counts_ties_as_half():
    # exact: wins and ties are 1 and 0.5, their sum and its quarter dyadic
    assert win_rate([1, 0, 1, 0.5], [0, 0, 1, 1]) == (1 + 0.5 + 0.5 + 0) / 4
    assert win_rate([0.3, 0.2], [0.3, 0.2]) == 0.5


def test_demo_gold_needs_the_right_value_in_the_exact_form():
    responses = ["Answer: 42", " answer: 42 ", "Answer: paris", "Answer: 41", "Answer: 42.",
                 "The answer is 42.", "Answer: 42. Because 40 + 2 = 42."]  # fmt: skip
    answers = ["42", "42", "Paris", "42", "42", "42", "42"]
    # exact: the judges score 1.0 or 0.0
    assert demo_gold([None] * 7, responses, answers) == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert demo_format([None] * 7, responses) == [1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0]


def test_reward_functions_receive_the_dataset_columns_they_name():
    judge = ProgrammaticReward("rlhf_cli.judges:demo_gold", "judge")
    assert judge.columns == ["answer"]
    rows = [{"prompt": "q", "answer": "7"}, {"prompt": "q", "answer": "8"}]
    assert judge.score(["q", "q"], ["Answer: 7", "Answer: 7"], rows) == [1.0, 0.0]  # exact: 0 / 1
    with pytest.raises(UserError, match="needs the column\\(s\\) answer"):
        judge.check_columns({"prompt": "q"}, "prompts.jsonl")
    assert ProgrammaticReward("rlhf_cli.judges:demo_format").columns == []


# ---------------------------------------------------------------- the command on tiny checkpoints
@pytest.fixture(scope="module")
def judged_prompts(tmp_path_factory):
    """The tiny chat prompts with an `answer` column, so that judges.demo_gold applies."""
    rows = []
    for i, count in enumerate(["one", "two", "three", "four"] * 4):
        thing, colour = [("sky", "blue"), ("grass", "green"), ("cat", "red"), ("dog", "yellow")][
            i % 4
        ]
        rows.append({"prompt": [{"role": "user", "content": f"What is the colour of {count} {thing}?"}],
                     "answer": f"{count} {colour}"})  # fmt: skip
    return write_jsonl(tmp_path_factory.mktemp("eval-data") / "judged.jsonl", rows)


def eval_args(out, judged_prompts, prompts_file, *extra):
    return ["eval", f"output_dir={out}", f"data={judged_prompts}", "data.eval_size=12",
            f"perplexity_data={prompts_file}", "generation.max_new_tokens=8", "samples=2",
            "judge=rlhf_cli.judges:demo_gold",
            *extra]  # fmt: skip


def read_eval(out):
    return json.loads((out / "eval.json").read_text())


def test_eval_reports_every_number_and_zero_kl_against_itself(
    tmp_path, tiny_model, sft_final, rm_final, judged_prompts, prompts_file
):
    out = tmp_path / "sft"
    result = run_cli(*eval_args(out, judged_prompts, prompts_file, f"policy={sft_final}",
                                f"reward.from={rm_final}"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = read_eval(out)
    metrics = report["metrics"]
    assert len(report["responses"]) == 12 and "compare/prompts" not in metrics
    for key in ("gold/mean", "gold/ci_low", "gold/ci_high", "rm/mean", "kl", "response_length",
                "eos_rate", "perplexity"):  # fmt: skip
        assert math.isfinite(metrics[key]), key
    assert metrics["gold/ci_low"] <= metrics["gold/mean"] <= metrics["gold/ci_high"]
    gold = [r["gold"] for r in report["responses"]]
    # exact: the same sum(gold) / len(gold) of 0/1 scores, through JSON (repr round-trips)
    assert metrics["gold/mean"] == sum(gold) / len(gold)
    assert report["reference"] == "base"  # an SFT from the raw base: the KL is to the base
    assert metrics["kl_prompts"] == 12
    assert metrics["perplexity"] > 1.0
    assert "done: gold" in result.stdout

    # the policy against its own adapter: the same log-probs up to rounding, so a KL of ~0
    same = tmp_path / "same"
    result = run_cli(*eval_args(same, judged_prompts, prompts_file, f"policy={sft_final}",
                                f"reference={sft_final}", f"compare={out}", "kl_prompts=3"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_eval(same)["metrics"]
    # equal adapters in two tensors may differ in kernel blocking: <= 8 log-probs, each within
    # log_softmax_error(373, 16) = 1.5e-3 + 2x its logits' (~1e-4): < 0.02; the base's KL is ~28
    assert metrics["kl"] == pytest.approx(0, abs=0.02) and metrics["kl_prompts"] == 3
    # the same greedy responses as the first eval: every comparison is a tie (exact: 12 x 0.5 / 12)
    assert metrics["compare/prompts"] == 12 and metrics["win_rate/gold"] == 0.5
    assert metrics["compare/gold_diff"] == 0.0
    assert metrics["compare/gold_diff_ci_low"] == metrics["compare/gold_diff_ci_high"] == 0.0

    # an existing eval.json is a finished run
    again = run_cli(*eval_args(out, judged_prompts, prompts_file, f"policy={sft_final}"))
    assert again.returncode == 2 and "already holds a finished run (eval.json)" in again.stderr


def test_eval_of_the_raw_base_and_win_rates(
    tmp_path, tiny_model, sft_final, judged_prompts, prompts_file
):
    base = tmp_path / "base"
    args = eval_args(base, judged_prompts, prompts_file, "policy=null",
                     f"model.name_or_path={tiny_model}")  # fmt: skip
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    report = read_eval(base)
    assert (
        report["policy"] is None and report["reference"] is None and "kl" not in report["metrics"]
    )
    sft = tmp_path / "sft"
    result = run_cli(*eval_args(sft, judged_prompts, prompts_file, f"policy={sft_final}",
                                f"compare={base}"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    ours, theirs = read_eval(sft), report
    expected = win_rate(
        [r["gold"] for r in ours["responses"]], [r["gold"] for r in theirs["responses"]]
    )
    # exact: sums of 0, 0.5 and 1 (or -1, 0 and 1) in any order, divided by the same count
    assert ours["metrics"]["win_rate/gold"] == expected
    diffs = [
        a["gold"] - b["gold"] for a, b in zip(ours["responses"], theirs["responses"], strict=True)
    ]
    assert ours["metrics"]["compare/gold_diff"] == sum(diffs) / len(diffs)
    m = ours["metrics"]
    assert m["compare/gold_diff_ci_low"] <= m["compare/gold_diff"] <= m["compare/gold_diff_ci_high"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["judge=rlhf_cli.judges:no_such"], "has no function 'no_such'"),
        (["judge=not a judge"], "write it as package.module:function"),
        (["compare=/nonexistent"], "holds no eval.json"),
        (["data.eval_size=0"], "has no held-out prompts"),
        (["reference=/nonexistent"], "reference=/nonexistent does not exist"),
    ],
)
def test_eval_bad_input_is_one_sentence(
    tmp_path, sft_final, judged_prompts, prompts_file, extra, message, capfd
):
    code = run_in_process(
        eval_args(tmp_path / "e", judged_prompts, prompts_file, f"policy={sft_final}", *extra)
    )
    err = capfd.readouterr().err
    assert code == 2, err[-2000:]
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "e" / "eval.json").exists()


def test_a_judge_needing_a_missing_column_is_one_sentence(tmp_path, sft_final, prompts_file):
    result = run_cli("eval", f"output_dir={tmp_path / 'e'}", f"policy={sft_final}",
                     f"data={prompts_file}", "judge=rlhf_cli.judges:demo_gold")  # fmt: skip
    assert result.returncode == 2
    assert "judge=rlhf_cli.judges:demo_gold needs the column(s) answer" in result.stderr


def test_compare_evals_table_marks_gains_beyond_the_interval(tmp_path):
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location(
        "compare_evals", REPO / "scripts" / "compare_evals.py"
    )
    compare_evals = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare_evals)

    def result(gold, low, high):
        return {"metrics": {"gold/mean": gold, "gold/ci_low": low, "gold/ci_high": high,
                            "response_length": 5.0, "eos_rate": 1.0}}  # fmt: skip

    results = [("base", result(0.0, 0.0, 0.0)), ("sft", result(0.35, 0.2, 0.5)),
               ("dpo", result(0.6, 0.45, 0.75)), ("ppo", result(0.55, 0.4, 0.7))]  # fmt: skip
    table = compare_evals.rows(results, {"dpo": "sft", "ppo": "sft"})
    assert [r["over"] for r in table[1:]] == ["base", "sft", "sft"]
    # differences of decimals (0.6 - 0.35): one float64 rounding off the written values, ~1e-17
    assert [r["gain"] for r in table[1:]] == pytest.approx([0.35, 0.25, 0.2])
    # sft's interval is 0.3 wide: +0.25 and +0.2 over it are not clear gains; +0.35 over [0, 0] is
    assert [r["clear"] for r in table[1:]] == [True, False, False]
    # the row's own interval counts too: +0.2 over [0, 0] with [0.0, 0.45] is not clear
    wide = compare_evals.rows([results[0], ("sft", result(0.2, 0.0, 0.45))])
    assert wide[1]["gain"] == pytest.approx(0.2) and wide[1]["clear"] is False  # as above
    out = tmp_path / "sft"
    out.mkdir()
    (out / "eval.json").write_text(json.dumps(results[1][1]))
    assert compare_evals.load(f"sft={out}")[0] == "sft"


def test_raw_base_eval_takes_the_reward_models_base(
    tmp_path, rm_final, judged_prompts, prompts_file
):
    """policy=null with reward.from and no model named: the base (and its tokenizer) is the RM's."""
    out = tmp_path / "base"
    result = run_cli(
        *eval_args(out, judged_prompts, prompts_file, "policy=null", f"reward.from={rm_final}")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(the base of reward.from)" in result.stdout
    report = read_eval(out)
    assert (
        report["base_model"] == json.loads((rm_final / "rlhf_stage.json").read_text())["base_model"]
    )
    assert math.isfinite(report["metrics"]["rm/mean"])


def test_shipped_demo_data_agrees_with_the_gold_judge():
    """The demo's labels are the gold judge's: every preference pair has a chosen reply it scores
    1 and a rejected one it scores 0; ideal SFT demonstrations score 1, imperfect ones 0; and the
    held-out prompts share no question with the training files."""
    from rlhf_cli import data

    from conftest import REPO

    def rows(name, split):
        return data.load_rows(str(REPO / "rlhf_cli" / "datasets" / name / f"{split}.jsonl"))

    for split in ("train", "eval"):
        prefs = rows("demo-prefs", split)
        answers = [r["answer"] for r in prefs]
        prompts = [r["prompt"] for r in prefs]
        chosen = [r["chosen"][-1]["content"] for r in prefs]
        rejected = [r["rejected"][-1]["content"] for r in prefs]
        assert set(demo_gold(prompts, chosen, answers)) == {1.0}
        assert set(demo_gold(prompts, rejected, answers)) == {0.0}
        sft = rows("demo-sft", split)
        replies = [r["messages"][-1]["content"] for r in sft]
        gold = demo_gold([None] * len(sft), replies, [r["answer"] for r in sft])
        assert gold == [float(r["ideal"]) for r in sft]  # exact: 0 / 1 scores
    _, held_out = data.load_splits(data_config(path="demo-prompts"), seed=0)
    questions = {r["prompt"][0]["content"] for r in held_out}
    assert len(questions) == len(held_out) == 219
    for name in ("demo-sft", "demo-prompts", "demo-prefs"):
        train = rows(name, "train")
        asked = {(r.get("prompt") or r.get("messages"))[0]["content"] for r in train}
        assert not questions & asked, name


@pytest.mark.slow  # SIGKILL / signal / sweep: many processes (make test runs it)
def test_an_eval_sweep_summarises_each_job_as_done_with_its_metrics(
    tmp_path, sft_final, judged_prompts, prompts_file
):
    """eval writes eval.json, not a final/: the sweep summary must still see a finished job."""
    out = tmp_path / "sweep"
    args = eval_args(
        out, judged_prompts, prompts_file, f"policy={sft_final}", "perplexity_data=null"
    )
    result = run_cli(*args, "-m", "generation.max_new_tokens=2,6")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((out / "sweep_summary.csv").open()))
    assert [(r["generation.max_new_tokens"], r["status"]) for r in rows] == [
        ("2", "done"),
        ("6", "done"),
    ]
    for row, job in zip(rows, ("0", "1"), strict=True):
        # exact: the same float printed to the CSV and to JSON (repr round-trips)
        assert float(row["response_length"]) == read_eval(out / job)["metrics"]["response_length"]
    assert float(rows[0]["response_length"]) <= 2 and float(rows[1]["response_length"]) <= 6


def test_eval_defaults_fit_a_users_own_prompts(tmp_path, sft_final, prompts_file):
    """`rlhf eval policy=X data=my_prompts.jsonl`: the stage's defaults no longer carry the demo's
    gold judge (which needs an `answer` column) nor its perplexity data; the demo's settings live
    in configs/presets/demo-eval.yaml."""
    from rlhf_cli import data

    out = tmp_path / "e"
    result = run_cli("eval", f"output_dir={out}", f"policy={sft_final}", f"data={prompts_file}",
                     "data.eval_size=4", "generation.max_new_tokens=4")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "eval.json").read_text())["metrics"]
    assert "gold/mean" not in metrics and "perplexity" not in metrics
    assert math.isfinite(metrics["response_length"]) and "kl" in metrics
    assert "demo data" not in result.stdout  # a user's own data
    # the shipped sets are named as demo data when a stage runs on them
    assert "demo-prompts is the demo data shipped with rlhf" in data.demo_note("demo-prompts")
    from rlhf_cli.cli.args import build_overrides, group_options

    demo = config_of("eval", *build_overrides("demo-eval", [], group_options()))
    assert (demo.judge, demo.perplexity_data) == ("rlhf_cli.judges:demo_gold", "demo-sft")


def test_eval_in_an_environment_reports_success_turns_and_transcripts(tmp_path, sft_final):
    """env=: each held-out row plays an episode (toy_envs.Echo answers every reply, 0.1 a turn,
    never done); the success rate and the environment's reward with their intervals, turns and
    why episodes ended; eval.json keeps each transcript. The numbers are those of the episodes:
    exact means of the per-episode values written beside them."""
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"n": i} for i in range(12)])
    out = tmp_path / "env"
    result = run_cli(
        "eval", f"policy={sft_final}", f"data={rows}", "data.eval_size=6", f"output_dir={out}",
        "env=toy_envs:Echo", "env.max_turns=3", "generation.max_new_tokens=8", "reference=none",
        "bootstrap=100", "samples=2", env={"PYTHONPATH": str(Path(__file__).parent)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = read_eval(out)
    metrics, played = report["metrics"], report["responses"]
    assert len(played) == 6
    rewards = [r["env_reward"] for r in played]
    # exact: the same sums of the same floats (JSON round-trips them)
    assert metrics["env/reward"] == sum(rewards) / 6
    assert metrics["env/success"] == sum(r > 0 for r in rewards) / 6
    assert metrics["env/turns"] == sum(r["turns"] for r in played) / 6
    assert metrics["env/success_ci_low"] <= metrics["env/success"] <= metrics["env/success_ci_high"]
    for r in played:
        assert r["finish"] in ("max_turns", "truncated")  # Echo is never done
        if r["finish"] == "max_turns":
            assert r["turn_rewards"] == [0.1] * 3
        assert [m["role"] for m in r["transcript"]][:1] == ["assistant"]
        assert r["response"] == r["transcript"][-1]["content"]
    # two shares k/6, each rounded once (half an ulp of 1 each): their sum is 1 within 2e-16
    assert metrics["env/finish_max_turns"] + metrics["env/finish_truncated"] == pytest.approx(
        1, abs=2.3e-16
    )
    assert "success" in result.stdout and "turns" in result.stdout
