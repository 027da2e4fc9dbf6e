"""`rlhf reward` on tiny models: learning, the ln 2 start, TRL's loss, init_from checks, resume, scoring."""

import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from rlhf_cli.losses import bradley_terry
from rlhf_cli.scoring import RewardScorer
from rlhf_cli.tracking import read_metrics

from conftest import assert_same_tensors, config_of, kill_and_resume, run_cli, tiny_sft_args
from numerics import EPS32, reordered_sum
from tiny import TINY_HIDDEN, make_model, preference_rows, write_jsonl


def score_terms(head_weight: torch.Tensor, norm_weight: torch.Tensor) -> float:
    """A bound on sum_k |w_k h_k| for a score w . h + b: h is the backbone's final RMSNorm output
    g * x / rms(x), whose 2-norm is at most max|g| sqrt(H), so Cauchy-Schwarz gives |w| max|g| sqrt(H)."""
    return head_weight.norm().item() * norm_weight.abs().max().item() * len(norm_weight) ** 0.5


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prefs")
    return write_jsonl(folder / "train.jsonl", preference_rows(64, 0)), write_jsonl(
        folder / "eval.jsonl", preference_rows(32, 1)
    )


def reward_args(model, prefs, out, *extra):
    train, held_out = prefs
    return ["reward", f"model.name_or_path={model}", f"data={train}", f"data.eval_path={held_out}",
            f"output_dir={out}", "optim.lr=5e-3", "train.log_every=4", *extra]  # fmt: skip


def test_trl_reward_loss_is_ours_on_random_scores():
    """TRL's RewardTrainer.compute_loss (the real method, on a stand-in trainer and model that return
    given scores) equals the mean of our per-pair losses, with and without margin and centring."""
    from trl import RewardTrainer

    torch.manual_seed(0)
    for center in (None, 0.01):
        for with_margin in (False, True):
            chosen, rejected, margin = torch.randn(16), torch.randn(16), torch.rand(16)
            trainer = SimpleNamespace(
                model=SimpleNamespace(training=False),
                args=SimpleNamespace(center_rewards_coefficient=center),
                accelerator=SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x),
                _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                _total_train_tokens=0,
            )
            scores = torch.cat([chosen, rejected]).unsqueeze(
                -1
            )  # (2B, 1) as a sequence classifier returns
            inputs = {
                "input_ids": torch.zeros(32, 3, dtype=torch.long),
                "attention_mask": torch.ones(32, 3),
            }
            if with_margin:
                inputs["margin"] = margin
            trl_loss = RewardTrainer.compute_loss(
                trainer, lambda scores=scores, **_: SimpleNamespace(logits=scores), inputs
            )
            ours = bradley_terry(
                chosen, rejected, margin if with_margin else None, center or 0.0
            ).mean()
            # float32, another grouping: our mean of 16 per-pair terms l + c s^2 (all >= 0) against
            # TRL's mean of each, added; each within reordered_sum(16, mean) of the exact value.
            # A missing margin (~0.5 a pair) or centring term moves the loss by > 1e-3
            bound = 2 * reordered_sum(16, ours.item())
            torch.testing.assert_close(ours, trl_loss, rtol=0, atol=bound)


def test_equal_scores_give_ln2():
    scores = torch.full((5,), 0.3)
    # 0.3 - 0.3 is exactly 0; float32 -logsigmoid(0) is within an ulp of ln 2 and the expected
    # tensor within half an ulp (2^-24 in [0.5, 1)): 1.5 ulp < EPS32 = 2 ulps
    expected = torch.full((5,), math.log(2))
    torch.testing.assert_close(bradley_terry(scores, scores), expected, rtol=0, atol=EPS32)


@pytest.mark.parametrize("attention", ["sdpa", "eager", "fallback"])
def test_shared_prefix_scores_and_gradients_equal_scoring_each_sequence(
    tiny_model, attention, monkeypatch
):
    """pair_scores runs a pair's shared prompt once (one row, a mask that keeps the rejected
    continuation from seeing the chosen one); its scores and LoRA/head gradients equal scoring the
    2B whole sequences, with sdpa and eager attention and in the fallback used by other kernels."""
    from rlhf_cli import data, modeling
    from rlhf_cli.stages.reward import pair_scores

    from conftest import tiny_lora_model
    from tiny import preference_rows

    config = config_of("reward")
    config.model.attn_implementation = "eager" if attention == "eager" else "sdpa"
    tokenizer, model, params = tiny_lora_model(config, tiny_model)
    torch.manual_seed(0)
    head = modeling.ScalarHead(modeling.hidden_size(model), "normal")
    params = params + list(head.parameters())
    if attention == "fallback":
        monkeypatch.setattr(modeling, "takes_custom_mask", lambda model, length: False)
    pairs, _ = data.tokenize_preferences(preference_rows(6, 3), tokenizer, config.data, "pairs")
    cpu = torch.device("cpu")

    def run(compute):
        model.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)
        chosen, rejected = compute()
        (chosen * torch.linspace(1, 2, 6) - rejected * torch.linspace(2, 3, 6)).sum().backward()
        return torch.stack([chosen, rejected]).detach(), [p.grad.clone() for p in params]

    def whole():
        batch = data.collate([p.chosen for p in pairs] + [p.rejected for p in pairs], 0, False)
        scores = modeling.sequence_scores(model, head, batch["input_ids"], batch["attention_mask"])
        return scores.chunk(2)

    shared, reference = (
        run(lambda: pair_scores(model, head, pairs, tokenizer.pad_token_id, cpu, torch.float32)),
        run(whole),
    )
    assert reference[0].std() > 0.1  # the scores differ, so equal scores mean the right positions
    # another order: the shared prompt's attention runs over other lengths and masks; a score is
    # a dot product of TINY_HIDDEN terms, sum|w_k h_k| <= score_terms (~8): 6e-5 (measured 1e-6);
    # a score read at another position is ~0.1-1 off
    norm = modeling.unwrapped(model).model.norm.weight
    bound = reordered_sum(TINY_HIDDEN, score_terms(head.linear.weight.detach(), norm.detach()))
    torch.testing.assert_close(shared[0], reference[0], rtol=0, atol=bound)
    positions = sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in pairs)
    for mine, theirs in zip(shared[1], reference[1], strict=True):
        # a prompt's gradient is one sum here and two added there: each entry a sum over the
        # batch's positions of TINY_HIDDEN-term products, terms at most the largest entry's size
        # (measured 2e-6 x max|g|); a missing continuation or row moves entries by O(1) x max|g|
        bound = reordered_sum(positions + TINY_HIDDEN, theirs.abs().max().item())
        torch.testing.assert_close(mine, theirs, rtol=0, atol=bound)


def test_reward_learns_the_feature_from_ln2(tmp_path, tiny_model, prefs):
    out = tmp_path / "rm"
    result = run_cli(
        *reward_args(tiny_model, prefs, out, "train.max_steps=24", "train.eval_every=8"),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [m for m in read_metrics(out) if "loss" in m]
    # zero head: every score is 0 at initialisation, so the first step's loss is ln 2 and no pair is won
    # exact: a zero weight and bias give 0.0 for any finite hidden state; ties are not wins
    assert steps[0]["accuracy"] == 0.0 and steps[0]["rewards/chosen"] == 0.0
    # each pair costs float32 -logsigmoid(0), within an ulp of ln 2; the logged loss is their
    # float32 mean over the step's 8 pairs (TEST_SIZES), within reordered_sum(8, ln 2): 7e-7
    assert steps[0]["loss"] == pytest.approx(
        math.log(2), abs=EPS32 * math.log(2) + reordered_sum(8, math.log(2))
    )
    manifest = json.loads((out / "final" / "rlhf_stage.json").read_text())
    assert manifest["stage"] == "reward"
    assert manifest["final_metrics"]["eval/accuracy"] >= 0.9  # held-out prompts, 32 pairs
    stats = manifest["reward_stats"]
    assert stats["count"] == 128 and stats["std"] > 0 and math.isfinite(stats["mean"])
    assert (out / "final" / "reward_head.safetensors").is_file()
    assert set(load_file(out / "final" / "reward_head.safetensors")) == {
        "linear.weight",
        "linear.bias",
    }

    # the scoring entry point reproduces the stage's own scores and normalises with its statistics
    scorer = RewardScorer.load(out / "final")
    rows = [json.loads(line) for line in prefs[1].read_text().splitlines()]
    chosen = scorer.score([r["prompt"] for r in rows], [r["chosen"] for r in rows], batch_size=5)
    rejected = scorer.score([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    accuracy = sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(rows)
    # another code path than the stage's (one sequence per row, not shared-prefix pairs): a pair
    # whose two scores tie to float32 rounding may fall either way, one pair in len(rows)
    assert accuracy == pytest.approx(manifest["final_metrics"]["eval/accuracy"], abs=1 / len(rows))
    normalized = scorer.score([rows[0]["prompt"]], [rows[0]["chosen"]], normalize=True)[0]
    # another order: the row alone against in a batch of 5 padded wider, a score of TINY_HIDDEN
    # terms (sum|w_k h_k| <= score_terms); then float32 (s - mean) / std against float64: a few
    # EPS32 of |s| + |mean| and of the result. Another row's or unnormalised score is > 0.1 off
    head = load_file(out / "final" / "reward_head.safetensors")
    norm = load_file(tiny_model / "model.safetensors")["model.norm.weight"]
    terms = score_terms(head["linear.weight"], norm) + head["linear.bias"].abs().item()
    raw = reordered_sum(TINY_HIDDEN, terms)
    expected = (chosen[0] - stats["mean"]) / stats["std"]
    rounding = 2 * EPS32 * ((abs(chosen[0]) + abs(stats["mean"])) / stats["std"] + abs(expected))
    assert normalized == pytest.approx(expected, rel=0, abs=raw / stats["std"] + rounding)


def test_reward_from_sft_inherits_base_and_adapter_and_runs_nf4(
    tmp_path, tiny_model, chat16, prefs
):
    sft = tmp_path / "sft"
    result = run_cli(
        *tiny_sft_args(tiny_model, chat16, sft, "train.max_steps=2", "lora.r=4"), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "rm"
    train, held_out = prefs
    result = run_cli("reward", f"init_from={sft / 'final'}", f"data={train}", f"data.eval_path={held_out}",
                     f"output_dir={out}", "train.max_steps=2", "quant=nf4", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"model: {tiny_model} (the base of init_from)" in result.stdout.replace("\n", "")
    manifest = json.loads((out / "final" / "rlhf_stage.json").read_text())
    assert manifest["parent"]["stage"] == "sft" and manifest["config"]["quant"]["mode"] == "nf4"
    adapter = json.loads((out / "final" / "adapter_config.json").read_text())
    assert adapter["r"] == 4  # the SFT adapter (r=4) was the starting point, not a new r=16 one
    assert (
        manifest["base_fingerprint"]
        == json.loads((sft / "final" / "rlhf_stage.json").read_text())["base_fingerprint"]
    )


def test_init_from_wrong_kind_or_other_base_exits_2(tmp_path, tiny_model, chat16, prefs, rlhf):
    rm = tmp_path / "rm"
    assert (
        rlhf(*reward_args(tiny_model, prefs, rm, "train.max_steps=1"), cwd=tmp_path).returncode == 0
    )
    sft = tmp_path / "sft"
    assert (
        rlhf(*tiny_sft_args(tiny_model, chat16, sft, "train.max_steps=1"), cwd=tmp_path).returncode
        == 0
    )
    other = make_model(tmp_path / "other-base", hidden_size=32)
    half = tmp_path / "half"
    half.mkdir()
    (half / "adapter_config.json").write_text("{}")
    cases = [
        ([f"init_from={rm / 'final'}"], "is a reward checkpoint, but rlhf reward starts from sft"),
        ([f"init_from={tmp_path / 'nothing'}"], "does not exist"),
        ([f"init_from={half}"], "is not a complete rlhf checkpoint"),
        ([f"init_from={sft}"], "is a run folder; use its final/ folder"),
        (
            [f"init_from={sft / 'final'}", f"model.name_or_path={other}"],
            "a different architecture or tokenizer",
        ),
    ]
    train, _ = prefs
    for extra, message in cases:
        out = tmp_path / "refused"
        result = rlhf(
            "reward",
            f"data={train}",
            f"output_dir={out}",
            "train.max_steps=1",
            *extra,
            cwd=tmp_path,
        )
        assert result.returncode == 2, (extra, result.stderr[-2000:])
        assert message in result.stderr, (extra, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
        assert not (out / "final").exists()


@pytest.mark.slow  # SIGKILL / signal / sweep: many processes (make test runs it)
def test_reward_sigkill_at_random_points_then_resume_reproduces_the_uninterrupted_run(
    tmp_path, tiny_model, prefs
):
    common = [
        "train.max_steps=6",
        "train.save_every=2",
        "train.keep_last=1",
        "train.eval_every=0",
        "lora.dropout=0.1",
    ]
    full = tmp_path / "full"
    assert run_cli(*reward_args(tiny_model, prefs, full, *common), cwd=tmp_path).returncode == 0
    crashed = tmp_path / "crashed"
    kills = kill_and_resume(reward_args(tiny_model, prefs, crashed, *common), crashed, tmp_path, 3)
    full_loss = {m["step"]: m["loss"] for m in read_metrics(full) if "loss" in m}
    resumed = [m for m in read_metrics(crashed) if "loss" in m]
    assert [m["step"] for m in resumed] == list(range(1, 7)), kills
    for m in resumed:
        # exact: the same process setup (threads, kernels) replays the same batches and dropout
        # masks from restored weights, optimizer, schedule and random state
        assert m["loss"] == full_loss[m["step"]], kills
    for name in ("adapter_model.safetensors", "reward_head.safetensors"):
        assert_same_tensors(full / "final" / name, crashed / "final" / name)
