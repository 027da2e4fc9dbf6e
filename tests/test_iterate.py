"""examples/iterate.mk: rounds of sample -> label with a judge -> train -> eval, chained, on the
tiny model; KTO (binary labels) and DPO (pairwise labels)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).parent  # the working directory: ppo_rewards is importable from it


@pytest.mark.slow  # two rounds of four stages each
@pytest.mark.parametrize("method", ["kto", "dpo"])
def test_rounds_chain_each_policy_to_the_next_and_end_in_one_table(
    method, tmp_path, sft_final, prompts_file
):
    out = tmp_path / "iterate"
    python = sys.executable
    train = "train.max_steps=2 train.batch_size=4 train.grad_accum=1 data.max_length=256"
    evaluate = (f"data={prompts_file} data.eval_size=8 judge=ppo_rewards:colour_share "
                "generation.max_new_tokens=8 perplexity_data=null kl_prompts=4")  # fmt: skip
    command = ["make", "-f", str(REPO / "examples" / "iterate.mk"), f"RLHF={python} -m rlhf_cli",
               f"METHOD={method}", "ROUNDS=2", "N=2", f"START={sft_final}", f"OUT={out}",
               f"PROMPTS={prompts_file}", "JUDGE=ppo_rewards:colour_share",
               "SAMPLE_ARGS=generation.max_new_tokens=8 data.max_length=256",
               f"TRAIN_ARGS={train}" + (" kto.balance=true" if method == "kto" else ""),
               f"EVAL_ARGS={evaluate}", f"COMPARE={python} {REPO / 'scripts' / 'compare_evals.py'}"]  # fmt: skip
    result = subprocess.run(command, cwd=TESTS, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads((out / "rounds.json").read_text())
    assert [r["name"] for r in rows] == ["round-0", "round-1", "round-2"]
    # each round trained from the one before, on the labels of its own samples
    for n, parent in ((1, sft_final), (2, out / "round-1" / "policy" / "final")):
        manifest = json.loads(
            (out / f"round-{n}" / "policy" / "final" / "rlhf_stage.json").read_text()
        )
        assert manifest["stage"] == method
        assert manifest["parent"]["path"] == str(parent.resolve())
        assert manifest["config"]["data"]["path"] == str(out / f"round-{n}" / "feedback.jsonl")
        feedback = [json.loads(line) for line in (out / f"round-{n}" / "feedback.jsonl").open()]
        assert feedback and all(("label" if method == "kto" else "chosen") in r for r in feedback)
    # every file is a make target: the same command again has nothing left to do
    again = subprocess.run(command, cwd=TESTS, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "rlhf_cli" not in again.stdout, again.stdout[-2000:]
