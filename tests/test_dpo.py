"""`rlhf dpo` on tiny models: step-0 invariants, learning, frozen base and reference, precomputed
reference, resume, init_from checks."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from rlhf_cli import data, modeling
from rlhf_cli.stages import dpo
from rlhf_cli.tracking import read_metrics

from conftest import assert_same_tensors, config_of, kill_and_resume, run_cli, tiny_sft_args
from numerics import EPS32, EPS64, log_softmax_error, reordered_sum
from tiny import TINY_HIDDEN, preference_rows, write_jsonl


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dpo-prefs")
    return write_jsonl(folder / "train.jsonl", preference_rows(64, 0)), write_jsonl(
        folder / "eval.jsonl", preference_rows(32, 1)
    )


@pytest.fixture(scope="module")
def sft_final(tmp_path_factory, tiny_model, chat16):
    out = tmp_path_factory.mktemp("dpo-sft") / "sft"
    result = run_cli(*tiny_sft_args(tiny_model, chat16, out, "train.max_steps=3", "optim.lr=1e-2"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "final"


def dpo_args(init, prefs, out, *extra):
    train, held_out = prefs
    return ["dpo", f"init_from={init}", f"data={train}", f"data.eval_path={held_out}", f"output_dir={out}",
            "optim.lr=5e-3", "optim.warmup_ratio=0", "train.log_every=4", *extra]  # fmt: skip


def test_step0_invariants_and_learning(tmp_path, sft_final, prefs):
    out = tmp_path / "dpo"
    result = run_cli(
        *dpo_args(sft_final, prefs, out, "train.max_steps=16", "train.eval_every=0"), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [m for m in read_metrics(out) if "loss" in m]
    # policy == reference before the first update: ln 2, zero implicit rewards, no pair won
    first = steps[0]
    # exact: the reference (init_from's adapter loaded again, computed on the fly) holds the
    # policy's values, both 64-byte aligned, and runs the same kernels on the same batch of pairs:
    # the log-ratios are 0.0 exactly, so are the rewards and their means
    assert first["rewards/chosen"] == first["rewards/rejected"] == 0.0
    assert first["rewards/accuracies"] == 0.0  # exact: ties are not wins
    # each pair costs float32 -logsigmoid(0), within an ulp of ln 2; the logged loss is their
    # float32 mean over the step's 8 pairs (TEST_SIZES), within reordered_sum(8, ln 2): 7e-7
    assert first["loss"] == pytest.approx(
        math.log(2), abs=EPS32 * math.log(2) + reordered_sum(8, math.log(2))
    )
    manifest = json.loads((out / "final" / "rlhf_stage.json").read_text())
    final = manifest["final_metrics"]
    assert final["eval/rewards/accuracies"] >= 0.9 and final["eval/rewards/margins"] > 0.5
    assert steps[-1]["loss"] < 0.5 * math.log(2)
    assert manifest["stage"] == "dpo" and manifest["parent"]["stage"] == "sft"
    # every LoRA tensor of the policy moved away from the SFT adapter it started from
    start, end = (
        load_file(sft_final / "adapter_model.safetensors"),
        load_file(out / "final" / "adapter_model.safetensors"),
    )
    assert start.keys() == end.keys()
    assert all(not torch.equal(start[k], end[k]) for k in start)


def test_base_and_reference_stay_bit_identical_and_policy_gets_gradients(
    tmp_path, sft_final, prefs, tiny_model
):
    config = config_of("dpo", f"init_from={sft_final}", f"output_dir={tmp_path}")
    config.model.name_or_path = str(tiny_model)
    tokenizer = modeling.load_tokenizer(config.model)
    parent = json.loads((sft_final / "rlhf_stage.json").read_text())
    device = torch.device("cpu")
    model, _, reference, dtype = dpo.build_policy_and_reference(config, tokenizer, device, parent)
    frozen_before = {
        n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad
    }
    assert any(".reference." in n for n in frozen_before) and any(
        "lora" not in n for n in frozen_before
    )
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    rows = preference_rows(8, 3)
    pairs, _ = data.tokenize_preferences(rows, tokenizer, config.data, "src")
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    model.train()
    for _ in range(3):
        batch = data.collate_pairs(pairs, tokenizer.pad_token_id)
        pair_losses, _ = dpo.dpo_step_loss(model, reference, batch, config, device, dtype)
        pair_losses.mean().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
        optimizer.step()
        optimizer.zero_grad()
        # switching to the reference role and back leaves exactly the policy trainable
        assert {n for n, p in model.named_parameters() if p.requires_grad} == set(trainable)
    for name, before in frozen_before.items():
        assert torch.equal(dict(model.named_parameters())[name], before), name


def test_precomputed_and_on_the_fly_reference_give_the_same_losses(tmp_path, sft_final, prefs):
    runs = {}
    for precompute in ("false", "true"):
        out = tmp_path / f"pre-{precompute}"
        args = dpo_args(sft_final, prefs, out, "train.max_steps=3", "train.eval_every=0",
                        f"dpo.precompute_reference={precompute}")  # fmt: skip
        result = run_cli(*args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[precompute] = [m for m in read_metrics(out) if "loss" in m]
    assert (tmp_path / "pre-true" / "reference_logps.safetensors").is_file()
    assert [m["step"] for m in runs["true"]] == [m["step"] for m in runs["false"]] == [1, 2, 3]
    for cached, fresh in zip(runs["true"], runs["false"], strict=True):
        # another order: the cache scores the pairs in file order, training in the stream's
        # shuffled batches, padded to other widths. The loss is a difference of summed log-probs
        # of tens of nats (logps/*): their error, as in test_distributed's step_tolerances, is
        # reordered_sum(TINY_HIDDEN, 4 x max|logps|) (policy and reference, chosen and rejected;
        # the loss's slope in each is <= beta = 0.1, which leaves 10x for rows above the mean)
        size = 4 * max(abs(fresh["logps/chosen"]), abs(fresh["logps/rejected"]))
        assert cached["loss"] == pytest.approx(
            fresh["loss"], rel=0, abs=reordered_sum(TINY_HIDDEN, size)
        ), cached["step"]


@pytest.mark.slow  # SIGKILL / signal / sweep: many processes (make test runs it)
def test_dpo_sigint_and_sigkill_then_resume_nf4_raw_base(tmp_path, prefs, tiny_model):
    train, held_out = prefs
    common = ["dpo", f"model.name_or_path={tiny_model}", f"data={train}", f"data.eval_path={held_out}", "quant=nf4",
              "train.max_steps=6", "train.save_every=2", "train.keep_last=1", "train.eval_every=0",
              "dpo.precompute_reference=true", "optim.lr=5e-3"]  # fmt: skip
    full = tmp_path / "full"
    result = run_cli(*common, f"output_dir={full}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the base with adapters disabled" in result.stdout
    # Ctrl-C after step 3: that step's checkpoint is saved, exit code 130, then resume from it
    stopped = tmp_path / "stopped"
    result = run_cli(
        *common, f"output_dir={stopped}", cwd=tmp_path, env={"RLHF_TEST_SIGNAL_AT_STEP": "3:INT"}
    )
    assert result.returncode == 130 and "stopped by SIGINT after step 3" in result.stderr
    result = run_cli(*common, f"output_dir={stopped}", cwd=tmp_path)
    assert result.returncode == 0 and "step-000003" in result.stdout
    # SIGKILL at random points, each time resumed
    crashed = tmp_path / "crashed"
    kills = kill_and_resume([*common, f"output_dir={crashed}"], crashed, tmp_path, 2)
    full_loss = {m["step"]: m["loss"] for m in read_metrics(full) if "loss" in m}
    for run in (stopped, crashed):
        resumed = [m for m in read_metrics(run) if "loss" in m]
        assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6], kills
        for m in resumed:
            # exact: the same process setup (threads, kernels) replays the same batches from
            # restored weights, optimizer, schedule, random state and reference cache
            assert m["loss"] == full_loss[m["step"]], kills
        assert_same_tensors(
            full / "final" / "adapter_model.safetensors",
            run / "final" / "adapter_model.safetensors",
        )


def test_dpo_refuses_a_reward_checkpoint(tmp_path, prefs, tiny_model):
    rm = tmp_path / "rm"
    train, held_out = prefs
    result = run_cli("reward", f"model.name_or_path={tiny_model}", f"data={train}", f"output_dir={rm}",
                     "train.max_steps=1", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    result = run_cli(
        *dpo_args(rm / "final", prefs, tmp_path / "dpo", "train.max_steps=1"), cwd=tmp_path
    )
    assert (
        result.returncode == 2
        and "is a reward checkpoint, but rlhf dpo starts from sft" in result.stderr
    )


def test_pair_logps_from_completion_logits_only_equal_those_of_full_logits(tiny_model, monkeypatch):
    """The LM head run only on the completion tokens, fused with its log-softmax a few rows at a
    time (modeling.target_logprobs), gives every row's summed log-probs, counts and gradients of the
    full-vocabulary log-softmax at every position; in float64, where the two agree to rounding."""
    from rlhf_cli import head as fused
    from rlhf_cli import losses
    from rlhf_cli.modeling import completion_logps

    from conftest import tiny_lora_model
    from tiny import preference_rows

    config = config_of("dpo")
    tokenizer, model, params = tiny_lora_model(config, tiny_model)
    model.double()
    monkeypatch.setattr(fused, "HEAD_CHUNK_ELEMENTS", 5 * len(tokenizer))  # 5 rows a chunk
    device = torch.device("cpu")
    pairs, _ = data.tokenize_preferences(preference_rows(6, 0), tokenizer, config.data, "pairs")
    batch = data.collate_pairs(pairs, tokenizer.pad_token_id)

    def run(compute):
        model.zero_grad(set_to_none=True)
        sums, counts = compute()
        weights = torch.linspace(1, 2, len(sums), dtype=sums.dtype)  # every row's own weight
        (sums * weights).sum().backward()
        return sums.detach(), counts, [p.grad.clone() for p in params]

    def full():
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        return losses.completion_logps(model(**inputs, use_cache=False).logits, batch["labels"])

    ours, reference = run(lambda: completion_logps(model, batch, device, torch.float64)), run(full)
    assert ours[1].tolist() == reference[1].tolist() and min(ours[1].tolist()) > 0
    # float64, the same backbone; the head on 5-row chunks against one GEMM: each logit (a dot
    # product of TINY_HIDDEN terms, sum|h_k w_k| <= S) within reordered_sum(TINY_HIDDEN, S), a
    # log-prob 2x that + log_softmax_error(V, max|z|); a row's sum of counts[b] of them (all of
    # one sign) within reordered_sum(T, |sum|) more: ~1e-11; a wrong target or row is ~1 off
    with torch.no_grad():
        hidden = modeling.hidden_states(model, batch["input_ids"], batch["attention_mask"])
        weight = model.get_output_embeddings().weight
        largest = (hidden.abs() @ weight.abs().T).max().item()
        logits_max = (hidden @ weight.T).abs().max().item()
    per_logprob = 2 * reordered_sum(TINY_HIDDEN, largest, EPS64) + log_softmax_error(
        len(weight), logits_max, EPS64
    )
    positions = batch["input_ids"].size(1)
    bound = (
        ours[1].double() * per_logprob + reordered_sum(positions, 1.0, EPS64) * reference[0].abs()
    )
    assert ((ours[0] - reference[0]).abs() <= bound).all(), (ours[0] - reference[0]).abs().max()
    for mine, theirs in zip(ours[2], reference[2], strict=True):
        # float64: the two paths differ only in d logp / d hidden (the fused (onehot - softmax) @ W
        # against autograd's), a 373-term sum's rounding, ~1e-13 at |W| <= 1; the same backward
        # carries it linearly to gradients of |g| <= 40, so ~1e-13 x |g|: rtol 1e-10 and atol 1e-12
        # leave 1e3 and ~10x, and a wrong row's or target's gradient is off by > 1e-3 relative
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)
