"""`rlhf grpo` on tiny models: the roles on one base, the first pass's ratio, groups without
signal, learning a verifiable reward, reward functions with a reward model, the chain into eval,
resume after SIGKILL, and clear errors."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

from rlhf_cli import data, losses, modeling, rollout
from rlhf_cli.loop import NonFiniteGuard
from rlhf_cli.schema import GRPOConfig
from rlhf_cli.stages import grpo
from rlhf_cli.tracking import Stopwatch, make_console, read_metrics

from conftest import (
    assert_same_tensors,
    config_of,
    kill_and_resume,
    run_cli,
    run_in_process,
    tiny_lora_model,
)
from numerics import EPS32, reordered_sum
from tiny import TINY_HIDDEN

TESTS = Path(__file__).parent
REWARD_ENV = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def grpo_args(prompts_file, out, *extra):
    """8 episodes per step: 2 prompts x 4 samples, one update."""
    return ["grpo", f"data={prompts_file}", "data.eval_size=8", f"output_dir={out}",
            "train.batch_size=8", "grpo.group_size=4", "rollout.max_new_tokens=8",
            "optim.lr=1e-3", "train.log_every=5", "samples.every=0", "train.eval_every=0",
            *extra]  # fmt: skip


def _config(tiny_model, sft_final, out, *overrides) -> GRPOConfig:
    config = config_of(
        "grpo", f"output_dir={out}", "reward.fns=[ppo_rewards:colour_share]",
        "grpo.group_size=4", *overrides,
    )  # fmt: skip
    config.model.name_or_path = str(tiny_model)
    config.policy.init_from = str(sft_final)
    config.rollout.max_new_tokens = 8
    config.optim.lr = 1e-2
    return config


def _prompts(config, tokenizer, prompts_file, n):
    rows = data.read_json_rows(prompts_file)[:n]
    return data.tokenize_prompts(rows, tokenizer, config.data, "prompts")[0]


# ---------------------------------------------------------------- one step, in process


def test_repeated_prompts_share_one_prefill_and_sample_the_same(tiny_model):
    """A group's G samples share a prompt: rollout.sample prefills each distinct prompt once and
    copies its KV cache to the repeats, and generate() samples exactly what it samples after
    prefilling every row itself. The cached keys and values come from a forward pass over 3 rows
    instead of 6, which may round differently in the last float32 bit; a sampled token changes
    only if a uniform draw lands within that much of a boundary of the cumulative distribution
    (about 1e-7 a token), so the 72 tokens below agree."""
    tokenizer, model, _ = tiny_lora_model(config_of("sft"), tiny_model)
    prompts = [[11, 12, 13]] * 3 + [[14, 15]] * 2 + [[16, 17, 18, 19]]  # 3 distinct, 3 lengths
    shapes = []
    embed = modeling.unwrapped(model).get_input_embeddings()
    hook = embed.register_forward_hook(lambda _m, args, _o: shapes.append(tuple(args[0].shape)))

    def draw(shared: bool, temperature: float) -> list[list[int]]:
        original = rollout.shared_prefill
        if not shared:
            rollout.shared_prefill = lambda *_: {}
        try:
            torch.manual_seed(0)
            return rollout.sample(model, tokenizer, prompts, 12, temperature).response.tolist()
        finally:
            rollout.shared_prefill = original

    try:
        for temperature in (1.0, 0.0):
            shapes.clear()
            together = draw(True, temperature)
            # the prompts' forward pass: 3 distinct rows of all but the last of 4 columns, then
            # one token a row at a time for all 6 rows
            assert shapes[0] == (3, 3) and all(s == (6, 1) for s in shapes[1:])
            shapes.clear()
            assert draw(False, temperature) == together
            assert shapes[0] == (6, 4)  # without it, every row is prefilled
    finally:
        hook.remove()
    # distinct prompts need no shared prefill: generate() fills its own cache
    query, mask = rollout.left_pad([[11, 12], [13, 14]], tokenizer.pad_token_id)
    assert rollout.shared_prefill(model, query, mask) == {}


def test_roles_first_pass_ratio_and_frozen_reference(
    tmp_path, tiny_model, sft_final, prompts_file, monkeypatch
):
    monkeypatch.syspath_prepend(str(TESTS))  # ppo_rewards
    config = _config(tiny_model, sft_final, tmp_path, "kl.beta=0.1", "grpo.iterations=2",
                     "train.batch_size=4", "train.grad_accum=1", "grpo.minibatches=2")  # fmt: skip
    tokenizer = modeling.load_tokenizer(config.model)
    fns = [grpo.ProgrammaticReward(s, "reward.fns") for s in config.reward.fns]
    torch.manual_seed(0)
    roles = grpo.build_roles(config, tokenizer, torch.device("cpu"), None, fns, make_console())
    model = roles.model
    assert set(model.peft_config) == {"policy", "reference"} and roles.reference == "reference"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".policy." in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    prompts = _prompts(config, tokenizer, prompts_file, config.prompts_per_step)
    batch, stats = grpo.collect(roles, prompts, config, tokenizer)
    assert len(batch.responses) == 8 and stats["grpo/episodes"] == 8
    # each prompt's samples are consecutive: a group shares its prompt
    assert batch.prompts[:4] == [prompts[0].prompt] * 4 and batch.prompts[4:] == [prompts[1].prompt] * 4  # fmt: skip
    # the advantages are the group's: they sum to 0 in each group (grpo: mean baseline). Float32:
    # r - fl(mean) sums to 4 (mean - fl(mean)), within reordered_sum(4, sum|r|), then / (std +
    # STD_EPS); each advantage rounded (eps |a|) and their float32 sum (reordered_sum(4, sum|a|))
    groups, advantages = batch.rewards.view(2, 4), batch.advantages.view(2, 4)
    spread = groups.std(dim=1) + losses.STD_EPS
    bound = torch.tensor([reordered_sum(4, r) for r in groups.abs().sum(dim=1).tolist()]) / spread
    bound += torch.tensor([reordered_sum(4, a) for a in advantages.abs().sum(dim=1).tolist()])
    sums = advantages.sum(dim=1)
    assert (sums.abs() <= bound).all(), (sums, bound)  # an uncentred group is off by ~1
    # policy == reference before any update. Exact: the reference adapter holds the policy's
    # values (both init_from's), both 64-byte aligned, and scores the same chunks with the same
    # kernels (see test_ppo)
    mask = batch.rollout.response_mask
    assert torch.equal(batch.old_logprobs * mask, batch.ref_logprobs * mask)

    params = [p for n, p in model.named_parameters() if ".policy." in n]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    guard = NonFiniteGuard(3, str(tmp_path))
    updates = grpo.update(roles, batch, optimizer, config, params, guard, 1, Stopwatch())
    assert len(updates) == 4  # 2 iterations x 2 minibatches
    # the first minibatch sees the policy that sampled: ratio 1 and a KL of 0 to the reference, up
    # to the recomputed log-probs' rounding: a shuffled minibatch with gradients, another GEMM
    # blocking, so log-ratios within delta = reordered_sum(TINY_HIDDEN, L) for log-probs of
    # magnitude <= L (as in test_ppo); a ratio to another policy is > 1e-2 off
    largest = batch.old_logprobs[mask.bool()].abs().max().item()
    delta = reordered_sum(TINY_HIDDEN, largest)
    tokens = int(batch.loss_mask.sum())
    ratio_bound = math.expm1(delta) + reordered_sum(tokens, 1 + delta)  # a float32 token mean
    assert updates[0]["policy/ratio"] == pytest.approx(1.0, abs=ratio_bound)
    assert updates[0]["policy/approxkl"] <= 0.5 * delta**2  # half the mean square of log-ratios
    # k3 = expm1(x) - x <= x^2 / 2 e^|x|, + float32 cancellation of ~EPS32 |x| a token
    kl_bound = 0.5 * delta**2 * math.exp(delta) + 2 * EPS32 * delta
    assert updates[0]["objective/kl"] == pytest.approx(0.0, abs=kl_bound)
    # behavioural: the later minibatches see an updated policy
    assert updates[-1]["policy/approxkl"] > 0 and updates[-1]["objective/kl"] > 0
    after = dict(model.named_parameters())
    for name, before in frozen.items():
        assert torch.equal(after[name], before), f"{name} changed"


def test_without_kl_there_is_no_reference_and_the_ratio_needs_no_extra_pass(
    tmp_path, tiny_model, sft_final, prompts_file, monkeypatch
):
    monkeypatch.syspath_prepend(str(TESTS))
    config = _config(tiny_model, sft_final, tmp_path, "train.batch_size=8", "train.grad_accum=1")
    tokenizer = modeling.load_tokenizer(config.model)
    fns = [grpo.ProgrammaticReward(s, "reward.fns") for s in config.reward.fns]
    roles = grpo.build_roles(config, tokenizer, torch.device("cpu"), None, fns, make_console())
    assert set(roles.model.peft_config) == {"policy"} and roles.reference is None
    batch, stats = grpo.collect(roles, _prompts(config, tokenizer, prompts_file, 2), config, tokenizer)  # fmt: skip
    assert batch.old_logprobs is None and batch.ref_logprobs is None
    assert "perf/policy_forward_s" not in stats and "perf/reference_forward_s" not in stats
    params = [p for n, p in roles.model.named_parameters() if ".policy." in n]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    (only,) = grpo.update(roles, batch, optimizer, config, params, NonFiniteGuard(3, str(tmp_path)), 1, Stopwatch())  # fmt: skip
    # exact: the ratio is pi / sg(pi), exp(0) = 1.0 on every token
    assert only["policy/ratio"] == 1.0 and only["policy/approxkl"] == 0.0


def test_groups_without_signal_leave_the_loss_and_no_update_is_made(
    tmp_path, tiny_model, sft_final, prompts_file, monkeypatch
):
    """A reward that is the same for every sample: every group is flat; with filter_groups no token
    counts, so the optimizer does not step (Adam would move the adapter even with zero gradients)."""
    monkeypatch.syspath_prepend(str(TESTS))
    config = _config(tiny_model, sft_final, tmp_path, "reward.fns=[ppo_rewards:constant]",
                     "grpo.filter_groups=true", "train.batch_size=8", "train.grad_accum=1")  # fmt: skip
    tokenizer = modeling.load_tokenizer(config.model)
    fns = [grpo.ProgrammaticReward(s, "reward.fns") for s in config.reward.fns]
    roles = grpo.build_roles(config, tokenizer, torch.device("cpu"), None, fns, make_console())
    batch, stats = grpo.collect(roles, _prompts(config, tokenizer, prompts_file, 2), config, tokenizer)  # fmt: skip
    # exact: shares of groups, 2 of 2 and 0 of 2
    assert stats["groups/zero_std_fraction"] == 1.0 and stats["groups/kept_fraction"] == 0.0
    assert batch.loss_mask.sum() == 0 and torch.equal(batch.advantages, torch.zeros(8))
    params = [p for n, p in roles.model.named_parameters() if ".policy." in n]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    (only,) = grpo.update(roles, batch, optimizer, config, params, NonFiniteGuard(3, str(tmp_path)), 1, Stopwatch())  # fmt: skip
    assert only["applied"] == 0.0  # exact: a flag, 0.0 or 1.0
    assert all(torch.equal(a, b) for a, b in zip(params, before, strict=True))


def test_mask_truncated_takes_cut_responses_out_of_the_loss(
    tmp_path, tiny_model, sft_final, prompts_file, monkeypatch
):
    monkeypatch.syspath_prepend(str(TESTS))
    config = _config(tiny_model, sft_final, tmp_path, "grpo.mask_truncated=true",
                     "rollout.max_new_tokens=2", "train.batch_size=8", "train.grad_accum=1")  # fmt: skip
    config.rollout.max_new_tokens = 2  # every answer ("Answer: two blue") is longer: all are cut
    tokenizer = modeling.load_tokenizer(config.model)
    fns = [grpo.ProgrammaticReward(s, "reward.fns") for s in config.reward.fns]
    roles = grpo.build_roles(config, tokenizer, torch.device("cpu"), None, fns, make_console())
    batch, stats = grpo.collect(roles, _prompts(config, tokenizer, prompts_file, 2), config, tokenizer)  # fmt: skip
    cut = ~batch.rollout.ended
    assert cut.any() and stats["rollout/truncated_fraction"] == cut.float().mean().item()
    assert (batch.loss_mask[cut] == 0).all()
    assert torch.equal(batch.loss_mask[~cut], batch.rollout.response_mask[~cut])


# ---------------------------------------------------------------- whole runs
def test_grpo_learns_a_verifiable_reward(tmp_path, sft_final, prompts_file):
    out = tmp_path / "grpo"
    args = grpo_args(prompts_file, out, f"policy.init_from={sft_final}",
                     "reward.fns=[ppo_rewards:colour_share]", "train.max_steps=30",
                     "train.eval_every=15", "optim.lr=2e-3")  # fmt: skip
    result = run_cli(*args, cwd=tmp_path, env=REWARD_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [m for m in read_metrics(out) if "reward/mean" in m]
    assert [m["step"] for m in steps] == list(range(1, 31))
    first = sum(m["reward/mean"] for m in steps[:5]) / 5
    last = sum(m["reward/mean"] for m in steps[-5:]) / 5
    assert last > first + 0.15, (first, last)
    for key in ("rewards/colour_share/mean", "rewards/colour_share/std",
                "groups/zero_std_fraction", "policy/clip_low", "policy/clip_high",
                "policy/entropy", "rollout/response_length", "rollout/truncated_fraction",
                "perf/generate_s", "perf/sampling_share", "policy/grad_norm"):  # fmt: skip
        assert key in steps[-1], key
    assert [m for m in read_metrics(out) if "eval/reward" in m], "held-out rewards were logged"
    manifest = json.loads((out / "final" / "rlhf_stage.json").read_text())
    assert manifest["stage"] == "grpo" and manifest["reward"]["fns"] == ["ppo_rewards:colour_share"]


def test_functions_and_a_reward_model_together_then_eval_reads_the_final(
    tmp_path, sft_final, rm_final, prompts_file
):
    out = tmp_path / "grpo"
    args = grpo_args(prompts_file, out, f"policy.init_from={sft_final}",
                     "reward.fns=[ppo_rewards:colour_share]", f"reward.from={rm_final}",
                     "reward.weights=[1.0,0.5]", "kl.beta=0.05", "train.max_steps=2",
                     "samples.every=2")  # fmt: skip
    result = run_cli(*args, cwd=tmp_path, env=REWARD_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1.0x ppo_rewards:colour_share + 0.5x the reward model" in result.stdout
    assert "an adapter on this base" in result.stdout
    assert "reference: that adapter, frozen" in result.stdout
    assert "two samples of each of" in result.stdout
    last = [m for m in read_metrics(out) if "reward/mean" in m][-1]
    assert {"rewards/colour_share/mean", "rewards/model/mean", "objective/kl"} <= set(last)
    evaluated = run_cli("eval", f"policy={out / 'final'}", f"data={prompts_file}",
                        f"output_dir={tmp_path / 'eval'}", "data.eval_size=8")  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert (tmp_path / "eval" / "eval.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("episodes", ["one-turn", "environment"])
def test_grpo_sigkill_at_random_points_then_resume_equals_an_uninterrupted_run(
    tmp_path, sft_final, prompts_file, monkeypatch, episodes
):
    """Also in a two-turn environment, killed between the turns of a rollout as well: its
    episodes replay exactly (the sampling state is restored, each environment's rng is seeded
    from the step and its place)."""
    rewards = ["reward.fns=[ppo_rewards:colour_share]"]
    if episodes == "environment":
        rewards = ["env=toy_envs:ColoursOnSecondTurn", "env.max_turns=2"]
    common = grpo_args(prompts_file, None, f"policy.init_from={sft_final}", *rewards,
                       "grpo.iterations=2", "kl.beta=0.05", "train.max_steps=6",
                       "train.save_every=2", "train.keep_last=1")  # fmt: skip
    common = [a for a in common if not a.startswith("output_dir=")]
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    monkeypatch.setenv("PYTHONPATH", REWARD_ENV["PYTHONPATH"])  # every run imports ppo_rewards
    result = run_cli(*common, f"output_dir={full}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # the environment variant kills inside a step and between the turns of a rollout (after step
    # 4); its checkpoint writes are the one-turn variant's code, which that variant kills in
    env = episodes == "environment"
    more = ("episode-turn:2",) if env else ()
    kills = kill_and_resume([*common, f"output_dir={crashed}"], crashed, tmp_path, 5, more, not env)
    full_steps = {m["step"]: m for m in read_metrics(full) if "reward/mean" in m}
    resumed = [m for m in read_metrics(crashed) if "reward/mean" in m]
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6], kills
    for m in resumed:
        for key in ("reward/mean", "objective/kl", "policy/loss", "rollout/response_length"):
            # exact: the same process setup (threads, kernels) replays the same rollouts (random
            # state restored) and updates from restored weights and optimizer
            assert m[key] == full_steps[m["step"]][key], key
    assert_same_tensors(
        full / "final" / "adapter_model.safetensors",
        crashed / "final" / "adapter_model.safetensors",
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["grpo.group_size=3"], "grpo.group_size=3 does not divide the 8 episodes of a step"),
        (["grpo.group_size=1"], "a group needs at least 2 samples per prompt"),
        (["grpo.advantage=reinforce_pp", "grpo.scale_rewards=group"],
         "which divides by the advantages' std over the batch by definition"),
        (["grpo.importance=sequence"], "use grpo.loss_agg=seq_mean_token_mean with it"),
        (["grpo.advantage=ppo"], "choose one of grpo, dr_grpo, rloo, reinforce_pp"),
        (["reward.weights=[1.0,2.0]"], "give one weight per reward (1: each of reward.fns in order)"),
        (["reward.fns=[not a spec]"], "write each function as package.module:function"),
        (["reward.fns=[ppo_rewards:one_too_few]"], "returned 7 values for 8 responses"),
        (["reward.fns=[ppo_rewards:colour_share,ppo_rewards:missing]"], "has no function 'missing'"),
        (["reward.fns=[]"], "neither is set; give reward functions"),
        (["rollout.temperature=0"], "the rollouts are sampled, so it must be > 0"),
        (["train.batch_size=128", "grpo.group_size=2"],
         "fewer than the 64 prompts of one GRPO step"),
    ],
)  # fmt: skip
def test_grpo_bad_input_is_one_sentence(
    tmp_path, sft_final, prompts_file, extra, message, monkeypatch, capfd
):
    out = tmp_path / "grpo"
    args = grpo_args(prompts_file, out, f"policy.init_from={sft_final}", "train.max_steps=1")
    if not any(e.startswith("reward.fns=") for e in extra):
        args.append("reward.fns=[ppo_rewards:colour_share]")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(TESTS))
    code = run_in_process([*args, *extra])
    err = capfd.readouterr().err
    assert code == 2, err[-3000:]
    assert message in err and "Traceback" not in err
    assert not (out / "final").exists()


def test_a_bug_in_one_reward_function_shows_its_traceback(tmp_path, sft_final, prompts_file):
    (tmp_path / "my_rewards.py").write_text(
        "def fine(prompts, responses):\n    return [0.0] * len(responses)\n\n"
        "def broken(prompts, responses):\n    return [1 / 0 for _ in responses]\n"
    )
    args = grpo_args(prompts_file, tmp_path / "grpo", f"policy.init_from={sft_final}",
                     "reward.fns=[my_rewards:fine,my_rewards:broken]", "train.max_steps=1")  # fmt: skip
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith(
        "rlhf grpo: error: reward.fns=my_rewards:broken raised ZeroDivisionError"
    )
    assert lines[1] == "Traceback of your code (most recent call last):"
    assert 'my_rewards.py", line 5' in result.stderr


# ---------------------------------------------------------------- multi-turn environments
def test_grpo_in_a_two_turn_environment_learns_the_second_turns_reward(
    tmp_path, sft_final, prompts_file
):
    """The environment answers the first reply with "Now name colours." and rewards the second
    reply's colour share: only the policy's two turns carry loss, the advantage covers the whole
    episode, and the reward rises as in one turn."""
    out = tmp_path / "grpo"
    args = grpo_args(prompts_file, out, f"policy.init_from={sft_final}",
                     "env=toy_envs:ColoursOnSecondTurn", "env.max_turns=2", "train.max_steps=30",
                     "train.eval_every=15", "optim.lr=2e-3", "samples.every=30")  # fmt: skip
    result = run_cli(*args, cwd=tmp_path, env=REWARD_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "episodes: toy_envs:ColoursOnSecondTurn, at most 2 turns" in result.stdout
    steps = [m for m in read_metrics(out) if "reward/mean" in m]
    first = sum(m["reward/mean"] for m in steps[:5]) / 5
    last = sum(m["reward/mean"] for m in steps[-5:]) / 5
    assert last > first + 0.15, (first, last)
    assert steps[-1]["rewards/env/mean"] == steps[-1]["reward/mean"]  # the only reward
    turns = [m["episode/turns"] for m in steps]
    assert sum(turns) / len(turns) > 1.5, turns  # most first replies ended and were answered
    assert all(m["episode/finish_done"] + m["episode/finish_truncated"] == 1 for m in steps)
    held_out = [m for m in read_metrics(out) if "eval/turns" in m]
    assert held_out and "eval/finish_done" in held_out[-1]
    assert "user: Now name colours." in result.stdout  # the sample table shows the transcript


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["env=toy_envs:WrongReset"], "toy_envs:WrongReset.reset returned int '42'"),
        (["env=toy_envs:Nowhere"], "has no environment 'Nowhere'"),
        (["env=no_such_module:Env"], "could not import no_such_module"),
        (["env=toy_envs:BadTool"], "no JSON schema could be built for `undocumented`"),
        (["env=toy_envs:Echo", "env.kwargs={size: 3}"], "env.kwargs={'size': 3} do not fit"),
        (["env=toy_envs:Echo", "env.max_turns=0"], "env.max_turns=0"),
        (["env=not a spec"], "write it as package.module:Class, or one of calculator, guess_number"),
    ],
)  # fmt: skip
def test_grpo_environment_bad_input_is_one_sentence(
    tmp_path, sft_final, prompts_file, extra, message, monkeypatch, capfd
):
    out = tmp_path / "grpo"
    args = grpo_args(prompts_file, out, f"policy.init_from={sft_final}", "train.max_steps=1")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(TESTS))
    code = run_in_process([*args, *extra])
    err = capfd.readouterr().err
    assert code == 2, err[-3000:]
    assert message in err and "Traceback" not in err, err[-2000:]
    assert not (out / "final").exists()


def test_a_bug_in_the_environment_shows_its_traceback(tmp_path, sft_final, prompts_file):
    args = grpo_args(prompts_file, tmp_path / "grpo", f"policy.init_from={sft_final}",
                     "env=toy_envs:Buggy", "train.max_steps=1")  # fmt: skip
    result = run_cli(*args, cwd=tmp_path, env=REWARD_ENV)
    assert result.returncode == 1, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("rlhf grpo: error: toy_envs:Buggy.reset raised KeyError")
    assert "toy_envs.py" in result.stderr and "episodes.py" not in result.stderr
