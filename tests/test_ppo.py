"""`rlhf ppo` on tiny models: rollouts and EOS handling, the four roles on one base, first-minibatch
invariants, learning with a programmatic reward, the sft -> reward -> ppo chain, resume, nf4, and
clear errors."""

import gc
import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf_cli import data, losses, modeling
from rlhf_cli.loop import NonFiniteGuard
from rlhf_cli.rollout import Rollout, decode_responses, left_pad, sample, truncate_after_stop
from rlhf_cli.schema import PPOConfig
from rlhf_cli.stages import ppo
from rlhf_cli.tracking import make_console, read_metrics

from conftest import (
    assert_same_tensors,
    config_of,
    kill_and_resume,
    model_config,
    run_cli,
    run_in_process,
)
from numerics import EPS32, EPS64, log_softmax_error, reordered_sum
from tiny import TINY_HIDDEN, make_model, preference_rows, write_jsonl

TESTS = Path(__file__).parent


def head_sizes(model, query, query_mask, positions) -> tuple[float, float]:
    """(S, max|z|): the largest sum_k |h_k w_k| of a logit (what its rounding in another order
    scales with) and the largest |logit|, over every position of these rows."""
    with torch.no_grad():
        hidden = modeling.hidden_states(model, query, query_mask, positions)
        weight = model.get_output_embeddings().weight
        return (hidden.abs() @ weight.abs().T).max().item(), (hidden @ weight.T).abs().max().item()


def first_pass_bounds(batch) -> tuple[float, float]:
    """How far the first minibatch's recomputed log-probs may be from the rollout's: another
    batch composition (a shuffled subset of the rows, with gradients), so another GEMM blocking.
    As in test_distributed's step_tolerances: reordered_sum(TINY_HIDDEN, L) for log-probs of
    magnitude <= L (the rollout's largest). Returns (that delta, the bound on a float32 token mean
    of exp(delta) - 1: the ratio's distance from 1)."""
    mask = batch.rollout.response_mask.bool()
    largest = batch.logprobs[mask].abs().max().item()
    delta = reordered_sum(TINY_HIDDEN, largest)
    return delta, math.expm1(delta) + reordered_sum(int(mask.sum()), 1 + delta)


REWARD_ENV = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


# ---------------------------------------------------------------- rollouts on hand-made sequences
def test_truncation_after_the_first_eos_and_the_missing_eos_penalty():
    eos, pad = 2, 0
    tokens = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9], [5, 6, 2, 0]])
    cut, mask, ended = truncate_after_stop(tokens, [eos], pad)
    assert cut.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0], [5, 6, 2, 0]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]]
    assert ended.tolist() == [True, False, True, True]
    # a second stop id (e.g. an end-of-turn token) ends a response too
    _, mask2, ended2 = truncate_after_stop(torch.tensor([[5, 3, 2, 7]]), [eos, 3], pad)
    assert mask2.tolist() == [[1, 1, 0, 0]] and ended2.tolist() == [True]
    scores = torch.tensor([1.0, 1.0, -0.5, 0.25])
    penalised = losses.missing_eos_penalty(scores, ended, 0.75)
    assert penalised.tolist() == [1.0, 0.25, -0.5, 0.25]  # only the response that never ended
    assert torch.equal(losses.missing_eos_penalty(scores, ended, 0.0), scores)


def test_rollout_positions_and_decoding(tiny_model):
    tokenizer = modeling.load_tokenizer(model_config(str(tiny_model)))
    query, query_mask = left_pad([[11, 12, 13], [14]], tokenizer.pad_token_id)
    assert query.tolist() == [[11, 12, 13], [tokenizer.pad_token_id] * 2 + [14]]
    hello = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    response = torch.tensor([hello + [eos, tokenizer.pad_token_id], hello + hello[:2]])
    response, response_mask, ended = truncate_after_stop(response, [eos], tokenizer.pad_token_id)
    rollout = Rollout(query, query_mask, response, response_mask, ended)
    n = len(hello)
    assert rollout.position_ids[0].tolist()[: 3 + n + 1] == list(range(3 + n + 1))
    # left padding does not shift positions: the second prompt's real token is at position 0
    assert rollout.position_ids[1].tolist()[2:] == list(range(1 + n + 2))
    assert rollout.lengths.tolist() == [n + 1, n + 2] and rollout.ended.tolist() == [True, False]
    texts = decode_responses(tokenizer, rollout)
    assert texts[0] == "hello world"  # the EOS is not part of the text
    assert texts[1].startswith("hello world")


def test_sampling_ignores_the_models_own_generation_defaults(tiny_model):
    """A model's generation_config.json (repetition penalty, no-repeat n-grams, min length) must not
    change what is sampled: PPO's log-probs assume softmax(logits / T) and nothing else."""
    from transformers import AutoModelForCausalLM

    tokenizer = modeling.load_tokenizer(model_config(str(tiny_model)))
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    prompts = [[11, 12, 13], [14, 15], [16]]

    def greedy(m):
        return sample(m, tokenizer, prompts, 12, 0.0).response.tolist()

    clean = greedy(model)
    model.generation_config.no_repeat_ngram_size = 1
    model.generation_config.repetition_penalty = 50.0
    model.generation_config.min_new_tokens = 12
    # the polluted defaults do change a plain generate() (so the check below can fail) ...
    query, query_mask = left_pad(prompts, tokenizer.pad_token_id)
    plain = model.generate(input_ids=query, attention_mask=query_mask, max_new_tokens=12,
                           do_sample=False, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    assert plain[:, query.size(1) :].tolist() != clean
    # ... but not our sampling, which also leaves the model's own config in place
    assert greedy(model) == clean
    assert model.generation_config.repetition_penalty == 50.0  # exact: the value set above


def test_float32_lm_head_logits_equal_the_models_logits(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    query, query_mask = left_pad([[11, 12, 13, 14], [15, 16]], 0)
    positions = (query_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(input_ids=query, attention_mask=query_mask, position_ids=positions).logits
        ours = modeling.last_logits(model, query, query_mask, positions, 3)
    assert ours.dtype == torch.float32 and ours.shape == (2, 3, full.size(-1))
    # the same backbone; the float32 head on the last 3 positions against all 6: each logit, a dot
    # product of TINY_HIDDEN terms, within reordered_sum(TINY_HIDDEN, S) ~1e-4; another position's
    # or a bf16 head's logits differ by > 1e-2
    largest, _ = head_sizes(model, query, query_mask, positions)
    torch.testing.assert_close(
        ours, full[:, -3:].float(), rtol=0, atol=reordered_sum(TINY_HIDDEN, largest)
    )


def test_fused_response_logprobs_equal_the_float32_logits_ones_with_their_gradient(tiny_model):
    """modeling.last_logprobs fuses a frozen head with the log-softmax at temperature T; it gives
    the log-probs, entropies and parameter gradients of the (B, R, vocab) float32 logits path it
    replaces (last_logits, then token_logprobs and entropy_from_logits), in float64 exactly. A
    trainable head takes that unfused path itself."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64)
    model.get_output_embeddings().weight.requires_grad_(False)
    query, query_mask = left_pad([[11, 12, 13, 14, 21, 22, 23], [15, 16, 24, 25, 26]], 0)
    positions = (query_mask.cumsum(-1) - 1).clamp(min=0)
    tokens, weights = query[:, -3:], torch.tensor([[1.0, -2.0, 0.5], [0.3, 1.5, -1.0]])

    def run(fused: bool):
        model.zero_grad()
        if fused:
            logprobs, entropy = modeling.last_logprobs(
                model, query, query_mask, positions, tokens, 0.7, with_entropy=True
            )
        else:
            logits = modeling.last_logits(model, query, query_mask, positions, 4)[:, :-1] / 0.7
            logprobs = losses.token_logprobs(logits, tokens)
            entropy = losses.entropy_from_logits(logits).double()
        (logprobs * weights).sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        return logprobs.detach(), entropy.detach(), grads

    (ours, our_entropy, our_grads), (theirs, their_entropy, their_grads) = run(True), run(False)
    assert ours.shape == (2, 3) and len(our_grads) == len(their_grads) > 0
    # float64, the same backbone; the head on the 6 scored positions against last_logits' 8, at
    # T = 0.7: each logit within reordered_sum(TINY_HIDDEN, S, EPS64) / T, a log-prob 2x that +
    # log_softmax_error(V, max|z| / T, EPS64): ~2e-12; another row or temperature is > 1e-2 off
    largest, logits_max = head_sizes(model, query, query_mask, positions)
    vocab = model.get_output_embeddings().weight.size(0)
    per_logprob = 2 * reordered_sum(TINY_HIDDEN, largest, EPS64) / 0.7 + log_softmax_error(
        vocab, logits_max / 0.7, EPS64
    )
    torch.testing.assert_close(ours, theirs, rtol=0, atol=per_logprob)
    # the fused entropy against the float64 formula -sum p log p of the same logits: both within
    # per_logprob per term, so (1 + H) x per_logprob + a reordered sum of V terms of total H
    with torch.no_grad():
        logits = modeling.last_logits(model, query, query_mask, positions, 4)[:, :-1] / 0.7
        exact = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    bound = (1 + exact.max().item()) * per_logprob + reordered_sum(vocab, exact.max().item(), EPS64)
    torch.testing.assert_close(our_entropy, exact, rtol=0, atol=bound)
    # the unfused path's entropy is float32 (entropy_from_logits): logsumexp z - sum p z, each of
    # its V terms' p within log_softmax_error(V, max|z|) relative, times |z| <= max|z|, and a
    # float32 sum of V terms of total <= max|z|: ~1e-2 here; a wrong temperature moves it by > 0.5
    z = logits_max / 0.7
    bound = log_softmax_error(vocab, z) * (1 + z) + reordered_sum(vocab, z)
    torch.testing.assert_close(our_entropy, their_entropy, rtol=0, atol=bound)
    for ours_grad, their_grad in zip(our_grads, their_grads, strict=True):
        # float64: the two paths differ only in d logp / d hidden (the fused (onehot - softmax) @
        # W / T against autograd's), a V-term sum's rounding, ~1e-13; the same backward carries it
        # linearly to the parameters, ~1e-13 x |g|: rtol 1e-10 and atol 1e-12 leave 1e3 and ~10x,
        # and a wrong row's or temperature's gradient is off by > 1e-3 relative
        torch.testing.assert_close(ours_grad, their_grad, rtol=1e-10, atol=1e-12)
    model.get_output_embeddings().weight.requires_grad_(True)  # trainable: the unfused path
    trained, _ = modeling.last_logprobs(model, query, query_mask, positions, tokens, 0.7)
    # exact: a trainable head takes the unfused path itself, the same operations on the same
    # inputs in the same order as run(False)
    assert torch.equal(trained.detach(), theirs)


@pytest.mark.parametrize("arch", ["granite", "gemma2"])
def test_response_logprobs_of_a_scaled_or_soft_capped_head_are_the_models_own(arch):
    """Granite divides its logits by logits_scaling, Gemma 2 soft-caps them: PPO's log-probs are
    those of the logits the model samples from (its own forward pass), not of the bare head."""
    from transformers import AutoModelForCausalLM, Gemma2Config, GraniteConfig

    shape = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    config = (
        GraniteConfig(**shape, logits_scaling=4.0)
        if arch == "granite"
        else Gemma2Config(**shape, head_dim=8, final_logit_softcapping=3.0)
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).double().eval()
    query, query_mask = left_pad([[11, 12, 13, 14, 21], [15, 16, 24]], 0)
    positions = (query_mask.cumsum(-1) - 1).clamp(min=0)
    tokens = query[:, -2:]
    with torch.no_grad():
        logits = model(input_ids=query, attention_mask=query_mask, position_ids=positions).logits
        ours, _ = modeling.last_logprobs(model, query, query_mask, positions, tokens, 0.7)
        plain = torch.nn.functional.linear(
            modeling.hidden_states(model, query, query_mask, positions), model.lm_head.weight
        )
    expected = losses.token_logprobs(logits[:, -3:-1] / 0.7, tokens)
    assert not torch.allclose(plain, logits)  # the head alone would give other log-probs
    # float64: the model's own forward with logits_to_keep against all positions: logits (32-term
    # dot products, |z| <= 4) within reordered_sum(32, 4 x 32, EPS64) = 3e-14, log-probs within
    # log_softmax_error(50, 4 / 0.7, EPS64) = 1.6e-13 more: 1e-10 is far above rounding and far
    # below the bare head's log-probs (> 1e-2 away, as the assert above shows)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)


def test_ppo_prompt_stream_has_only_full_batches():
    stream = data.BatchStream(list(range(10)), 4, seed=0, drop_last=True)
    batches = [stream.next() for _ in range(5)]
    assert [len(b) for b in batches] == [4, 4, 4, 4, 4]  # 2 per epoch; the remainder is skipped
    # exact: epoch 2 and 1 of its 2 batches, 2 + 1/2, a binary fraction
    assert stream.position() == {"epoch": 2, "index": 1} and stream.progress() == 2.5
    assert set(batches[0] + batches[1]) != set(batches[2] + batches[3])  # each epoch reshuffles


def ppo_args(prompts_file, out, *extra):
    return ["ppo", f"data={prompts_file}", "data.eval_size=8", f"output_dir={out}",
            "train.batch_size=4", "rollout.max_new_tokens=8", "optim.lr=1e-3", "train.log_every=5",
            "samples.every=0", "train.eval_every=0", *extra]  # fmt: skip


# ---------------------------------------------------------------- roles on one base (in process)
def _config(tiny_model, sft_final, rm_final, out, **ppo_settings) -> PPOConfig:
    config = config_of("ppo", f"output_dir={out}", f"reward.from={rm_final}")
    config.model.name_or_path = str(tiny_model)
    config.policy.init_from = str(sft_final)
    config.train.batch_size, config.train.grad_accum = 4, 1  # 4 episodes per update
    config.rollout.max_new_tokens = 8
    config.optim.lr = 1e-2
    for key, value in ppo_settings.items():
        setattr(config.ppo, key, value)
    return config


def test_one_base_four_roles_frozen_roles_unchanged_first_minibatch_exact(
    tmp_path, tiny_model, sft_final, rm_final, prompts_file
):
    from transformers import AutoModelForCausalLM

    config = _config(tiny_model, sft_final, rm_final, tmp_path, epochs=2, minibatches=2)
    tokenizer = modeling.load_tokenizer(config.model)
    rm_manifest = json.loads((rm_final / "rlhf_stage.json").read_text())
    torch.manual_seed(0)
    roles = ppo.build_roles(
        config, tokenizer, torch.device("cpu"), rm_manifest, None, make_console()
    )
    model = roles.model
    assert roles.reward_kind == "shared base" and roles.value_start == "the reward adapter + head"
    assert set(model.peft_config) == {"policy", "reference", "reward", "value"}

    # one copy of the base weights: every non-LoRA tensor has its own storage, and together they
    # are exactly as many numbers as the base model has
    base_params = {n: p for n, p in model.named_parameters() if "lora_" not in n}
    pointers = [p.untyped_storage().data_ptr() for p in base_params.values()]
    assert len(set(pointers)) == len(pointers)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert sum(p.numel() for p in base_params.values()) == sum(
        p.numel() for p in fresh.parameters()
    )
    del fresh
    gc.collect()
    llamas = [o for o in gc.get_objects() if type(o).__name__ == "LlamaForCausalLM"]
    assert len(llamas) == 1

    # only the policy and value adapters (and the value head) are trainable
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".policy." in n or ".value." in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert any(".reference." in n for n in frozen) and any(".reward." in n for n in frozen)
    reward_head = roles.reward.head.linear.weight.detach().clone()
    learners = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    value_head = roles.value_head.linear.weight.detach().clone()

    rows = data.read_json_rows(prompts_file)[:8]
    prompts, _ = data.tokenize_prompts(rows, tokenizer, config.data, "prompts")
    batch, stats = ppo.collect(roles, prompts, config, 0.05, tokenizer)
    # policy == reference before any update: the KL is 0 on every token. Exact: the reference
    # adapter holds the policy's values (both init_from's), both 64-byte aligned in memory, and
    # scores the same chunks of rows with the same kernels (as the CLI test's step-1 KL of 0.0)
    mask = batch.rollout.response_mask
    assert stats["objective/kl"] == 0.0
    assert torch.equal(batch.kl, torch.zeros_like(batch.kl))
    assert torch.equal(batch.logprobs * mask, batch.ref_logprobs * mask)
    mask = batch.rollout.response_mask.bool()
    assert (batch.advantages[~mask] == 0).all() and (batch.returns[~mask] == 0).all()

    policy = [p for n, p in model.named_parameters() if ".policy." in n]
    value = [p for n, p in model.named_parameters() if ".value." in n] + list(
        roles.value_head.parameters()
    )
    optimizer = torch.optim.AdamW(policy + value, lr=1e-2)
    guard = NonFiniteGuard(3, str(tmp_path))
    updates = ppo.update(roles, batch, optimizer, config, policy, value, guard, step=1)
    assert len(updates) == 4  # 2 epochs x 2 minibatches
    # the first minibatch sees the policy that sampled the batch: ratio 1 and nothing clipped. Not
    # bitwise: the update recomputes its log-probs with gradients on a shuffled micro-batch, where
    # a row may meet another GEMM blocking than in the rollout: log-ratios within delta
    # (first_pass_bounds, ~1e-4); a ratio to another policy is > 1e-2 off
    delta, ratio_bound = first_pass_bounds(batch)
    first = updates[0]
    assert first["policy/ratio"] == pytest.approx(1.0, abs=ratio_bound)
    assert first["policy/approxkl"] <= 0.5 * delta**2  # half the mean square of those log-ratios
    # exact: a count of tokens whose ratio left [0.8, 1.2]; none within delta of 1 can
    assert first["policy/clipfrac"] == 0.0
    assert (
        updates[-1]["policy/approxkl"] > 0
    )  # behavioural: later minibatches see an updated policy

    after = dict(model.named_parameters())
    for name, before in frozen.items():
        assert torch.equal(after[name], before), f"{name} changed"
    assert torch.equal(roles.reward.head.linear.weight, reward_head)
    changed = [n for n, before in learners.items() if not torch.equal(after[n], before)]
    assert any(".policy." in n for n in changed) and any(".value." in n for n in changed)
    assert not torch.equal(roles.value_head.linear.weight, value_head)
    # switching roles leaves the same parameters trainable
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable


def test_value_head_starts_as_the_normalised_reward_head(tiny_model, sft_final, rm_final, tmp_path):
    config = _config(tiny_model, sft_final, rm_final, tmp_path)
    tokenizer = modeling.load_tokenizer(config.model)
    rm_manifest = json.loads((rm_final / "rlhf_stage.json").read_text())
    roles = ppo.build_roles(
        config, tokenizer, torch.device("cpu"), rm_manifest, None, make_console()
    )
    stats = rm_manifest["reward_stats"]
    hidden = torch.randn(3, modeling.hidden_size(roles.model))
    expected = (roles.reward.head(hidden) - stats["mean"]) / stats["std"]
    # float32: w / std . h + (b - mean) / std against (w . h + b - mean) / std: the dot products of
    # TINY_HIDDEN terms (sum |w_k h_k| + |b| = S) in either order, and a few roundings of values up
    # to (S + |mean|) / std; an unnormalised head is off by |mean| or a factor std
    weight, bias = roles.reward.head.linear.weight, roles.reward.head.linear.bias
    with torch.no_grad():
        terms = (hidden.abs() @ weight.abs().T).max().item() + bias.abs().item()
    scale = (terms + abs(stats["mean"])) / stats["std"]
    bound = reordered_sum(TINY_HIDDEN, terms) / stats["std"] + 4 * EPS32 * scale
    torch.testing.assert_close(roles.value_head(hidden), expected, rtol=0, atol=bound)


# ---------------------------------------------------------------- through the CLI
def test_ppo_learns_a_programmatic_reward_with_bounded_kl(tmp_path, sft_final, prompts_file):
    out = tmp_path / "ppo"
    args = ppo_args(prompts_file, out, f"policy.init_from={sft_final}",
                    "reward.fn=ppo_rewards:colour_share", "reward.missing_eos_penalty=0",
                    "train.batch_size=8", "train.max_steps=30", "train.eval_every=15")  # fmt: skip
    result = run_cli(*args, cwd=tmp_path, env=REWARD_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [m for m in read_metrics(out) if "objective/scores" in m]
    assert [m["step"] for m in steps] == list(range(1, 31))
    first = sum(m["objective/scores"] for m in steps[:5]) / 5
    last = sum(m["objective/scores"] for m in steps[-5:]) / 5
    # a clear rise, not noise (measured when written: 0.151 -> 0.361, KL at most 3.7)
    assert last > first + 0.15, (first, last)
    assert max(m["objective/kl"] for m in steps) < 10.0
    assert steps[0]["objective/kl"] == 0.0  # exact: policy == reference, as in the roles test
    evals = [m for m in read_metrics(out) if "eval/scores" in m]
    assert evals, "held-out scores were logged"
    for key in ("policy/approxkl", "policy/clipfrac", "value/loss", "value/clipfrac",
                "value/explained_variance", "objective/entropy", "objective/rlhf_reward",
                "rollout/response_length", "rollout/eos_rate", "perf/rollout_s", "perf/update_s",
                "perf/tokens_per_s"):  # fmt: skip
        assert key in steps[-1], key


def test_sft_reward_ppo_chain_through_the_cli(tmp_path, sft_final, rm_final, prompts_file):
    out = tmp_path / "ppo"
    args = ppo_args(prompts_file, out, f"policy.init_from={sft_final}", f"reward.from={rm_final}",
                    "train.max_steps=3", "samples.every=3")  # fmt: skip
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "one base" in result.stdout and "frozen adapter + head on the same base" in result.stdout
    assert "value: the reward adapter + head" in result.stdout
    assert "sampled responses" in result.stdout  # the samples table
    final = out / "final"
    manifest = json.loads((final / "rlhf_stage.json").read_text())
    assert manifest["stage"] == "ppo" and manifest["parent"]["stage"] == "sft"
    assert manifest["reward"]["kind"] == "shared base"
    assert (final / "adapter_model.safetensors").is_file()
    assert (final / "value" / "adapter_model.safetensors").is_file()
    assert (final / "value_head.safetensors").is_file()
    # each role's share of a step is timed, and the parts fit in the phase that holds them
    for m in (m for m in read_metrics(out) if "objective/scores" in m):
        rollout = [m[f"perf/{k}_s"] for k in ("generate", "score", "policy_forward",
                                             "reference_forward", "value_forward")]  # fmt: skip
        update = [m[f"perf/{k}_s"] for k in ("policy_update", "value_update", "optimizer")]
        assert min(rollout + update) > 0
        assert sum(rollout) <= m["perf/rollout_s"] and sum(update) <= m["perf/update_s"]
    # the policy moved away from the SFT adapter it started from
    start, end = (
        load_file(sft_final / "adapter_model.safetensors"),
        load_file(final / "adapter_model.safetensors"),
    )
    assert start.keys() == end.keys() and any(not torch.equal(start[k], end[k]) for k in start)
    # and a DPO run (or any stage taking a policy) can start from the PPO policy
    result = run_cli("ppo", *ppo_args(prompts_file, tmp_path / "again", f"policy.init_from={final}",
                     f"reward.from={rm_final}", "train.max_steps=1")[1:], cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


def test_reward_model_on_another_base_is_a_second_model(
    tmp_path, tiny_model, sft_final, prompts_file
):
    other = make_model(tmp_path / "other-base", hidden_size=32, seed=1)
    prefs = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(16, 0))
    rm = tmp_path / "rm"
    result = run_cli("reward", f"model.name_or_path={other}", f"data={prefs}", f"output_dir={rm}",
                     "data.eval_size=4", "train.max_steps=1", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "ppo"
    args = ppo_args(prompts_file, out, f"policy.init_from={sft_final}",
                    f"reward.from={rm / 'final'}", "train.max_steps=2")  # fmt: skip
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loading it as a second model" in result.stdout
    assert "value: a new adapter + zero head" in result.stdout
    manifest = json.loads((out / "final" / "rlhf_stage.json").read_text())
    assert manifest["reward"]["kind"] == "second model"


@pytest.mark.slow  # SIGKILL / signal / sweep: many processes (make test runs it)
def test_ppo_sigkill_at_random_points_then_resume_equals_an_uninterrupted_run_nf4(
    tmp_path, sft_final, rm_final, prompts_file
):
    common = ppo_args(prompts_file, None, f"policy.init_from={sft_final}",
                      f"reward.from={rm_final}", "quant=nf4", "kl.adaptive=true", "kl.horizon=100",
                      "train.max_steps=6", "train.save_every=2", "train.keep_last=1")  # fmt: skip
    common = [a for a in common if not a.startswith("output_dir=")]
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    result = run_cli(*common, f"output_dir={full}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    kills = kill_and_resume([*common, f"output_dir={crashed}"], crashed, tmp_path, 4)
    full_steps = {m["step"]: m for m in read_metrics(full) if "objective/scores" in m}
    resumed = [m for m in read_metrics(crashed) if "objective/scores" in m]
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6], kills
    assert resumed[-1]["objective/kl_coef"] != 0.05  # the adaptive controller moved (and resumed)
    for m in resumed:
        for key in ("objective/scores", "objective/kl", "objective/kl_coef", "policy/loss"):
            # exact: the same process setup (threads, kernels) replays the same rollouts (random
            # state restored) and updates from restored weights, optimizer and KL controller
            assert m[key] == full_steps[m["step"]][key], key
    for sub in (".", "value"):
        assert_same_tensors(
            full / "final" / sub / "adapter_model.safetensors",
            crashed / "final" / sub / "adapter_model.safetensors",
        )


@pytest.mark.slow
def test_ppo_killed_between_the_turns_of_a_rollout_resumes_to_the_same_run(
    tmp_path, sft_final, prompts_file, monkeypatch
):
    """In a two-turn environment, killed inside a step and between the two turns of a rollout
    (after step 4): the resumed run's episodes, values and updates are the uninterrupted run's
    (the checkpoint writes are the one-turn kill test's code, killed there)."""
    common = ppo_args(prompts_file, None, f"policy.init_from={sft_final}",
                      "env=toy_envs:ColoursOnSecondTurn", "env.max_turns=2", "train.batch_size=8",
                      "train.max_steps=6", "train.save_every=2", "train.keep_last=1")  # fmt: skip
    common = [a for a in common if not a.startswith("output_dir=")]
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    monkeypatch.setenv("PYTHONPATH", REWARD_ENV["PYTHONPATH"])  # every run imports toy_envs
    result = run_cli(*common, f"output_dir={full}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    kills = kill_and_resume([*common, f"output_dir={crashed}"], crashed, tmp_path, 6,
                            ("episode-turn:2",), writes=False)  # fmt: skip
    full_steps = {m["step"]: m for m in read_metrics(full) if "episode/turns" in m}
    resumed = [m for m in read_metrics(crashed) if "episode/turns" in m]
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6], kills
    for m in resumed:
        for key in ("episode/env_reward", "episode/turns", "objective/kl", "policy/loss"):
            assert m[key] == full_steps[m["step"]][key], key  # exact: as in the test above
    for sub in (".", "value"):
        assert_same_tensors(
            full / "final" / sub / "adapter_model.safetensors",
            crashed / "final" / sub / "adapter_model.safetensors",
        )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["reward.fn=no_such_module:score"], "could not import no_such_module"),
        (["reward.fn=ppo_rewards:missing"], "has no function 'missing'"),
        (["reward.fn=ppo_rewards:one_too_few"], "returned 7 values for 8 responses"),
        (["reward.fn=ppo_rewards:not_finite"], "rewards must be finite numbers"),
        (["reward.fn=ppo_rewards:text_not_numbers"], "not a sequence of numbers"),
        (["reward.fn=not a spec"], "write it as package.module:function"),
        ([], "give exactly one: reward.from"),
        (["rollout.temperature=0"], "the rollouts are sampled, so it must be > 0"),
        (["ppo.vf_coef=0.5"], "ppo.vf_coef was removed: the value adapter and head have their own"),
        (["train.batch_size=16", "train.grad_accum=2", "reward.fn=ppo_rewards:colour_share"],
         "fewer than the 64 episodes of one PPO step (train.batch_size=16 x train.grad_accum=2 x "
         "ppo.minibatches=2)"),
    ],
)  # fmt: skip
def test_ppo_bad_input_is_one_sentence(
    tmp_path, sft_final, prompts_file, extra, message, monkeypatch, capfd
):
    out = tmp_path / "ppo"
    args = ppo_args(prompts_file, out, f"policy.init_from={sft_final}", "train.max_steps=1", *extra)
    if "reward" not in " ".join(extra) and extra != []:
        args.append("reward.fn=ppo_rewards:colour_share")
    monkeypatch.chdir(tmp_path)
    code = run_in_process(args)  # in process: tests/ (ppo_rewards) is importable
    err = capfd.readouterr().err
    assert code == 2, err[-3000:]
    assert message in err and "Traceback" not in err
    assert not (out / "final").exists()


def test_reward_from_must_be_a_reward_checkpoint(tmp_path, sft_final, prompts_file):
    args = ppo_args(prompts_file, tmp_path / "ppo", f"policy.init_from={sft_final}",
                    f"reward.from={sft_final}", "train.max_steps=1")  # fmt: skip
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert "reward.from=" in result.stderr and "is a sft checkpoint" in result.stderr


def test_ppo_from_the_raw_base_takes_the_reward_models_base(tmp_path, rm_final, prompts_file):
    """No policy.init_from and no model named: the base (and its tokenizer) is the reward model's."""
    out = tmp_path / "ppo"
    result = run_cli(*ppo_args(prompts_file, out, f"reward.from={rm_final}", "train.max_steps=1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(the base of reward.from)" in result.stdout
    assert "reference: the base with adapters disabled" in result.stdout


@pytest.mark.parametrize(
    ("code", "first_line", "line"),
    [
        ("def score(prompts, responses):\n    return [1 / 0 for _ in responses]\n",
         "reward.fn=my_rewards:score raised ZeroDivisionError: division by zero; the run stopped.",
         'my_rewards.py", line 2'),
        ("import no_such_package_for_rewards\n\ndef score(prompts, responses):\n    return []\n",
         "reward.fn=my_rewards:score: importing my_rewards raised ModuleNotFoundError: No module "
         "named 'no_such_package_for_rewards'; the run stopped.", 'my_rewards.py", line 1'),
    ],
)  # fmt: skip
def test_a_bug_in_the_users_reward_function_shows_their_traceback(
    tmp_path, sft_final, prompts_file, code, first_line, line
):
    """The user's code failing is not bad input: one clear first line, then the traceback of their
    code (their file and line, none of ours), exit 1 (it used to be one sentence and exit 2, the
    traceback lost)."""
    (tmp_path / "my_rewards.py").write_text(code)
    out = tmp_path / "ppo"
    result = run_cli(*ppo_args(prompts_file, out, f"policy.init_from={sft_final}",
                               "reward.fn=my_rewards:score", "train.max_steps=1"), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert lines[0] == f"rlhf ppo: error: {first_line}"
    assert lines[1] == "Traceback of your code (most recent call last):"
    assert line in result.stderr and "rlhf_cli" not in "\n".join(lines[1:])


def test_grad_accum_adds_episodes_as_in_every_other_stage(tmp_path, sft_final, prompts_file):
    """train.grad_accum split PPO's minibatch but added rows everywhere else; now a step samples
    batch_size x grad_accum x ppo.minibatches episodes and each update sees batch_size x grad_accum
    of them (the old code refused batch_size=2 with grad_accum=2 and 2 minibatches)."""
    out = tmp_path / "ppo"
    args = ppo_args(prompts_file, out, f"policy.init_from={sft_final}",
                    "reward.fn=ppo_rewards:colour_share", "train.batch_size=2", "train.grad_accum=2",
                    "ppo.minibatches=2", "ppo.epochs=1", "train.max_steps=1")  # fmt: skip
    result = run_cli(*args, cwd=tmp_path, env=REWARD_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 PPO steps x 8 episodes (2 per micro-batch x 2 accumulation x 2 minibatches)" in (
        result.stdout
    )
    (step,) = [m for m in read_metrics(out) if "ppo/episodes" in m]
    assert (step["ppo/episodes"], step["ppo/updates"]) == (8, 2)


def test_a_missing_module_is_bad_input_and_a_failing_import_inside_it_is_the_users_bug(
    tmp_path, monkeypatch
):
    from rlhf_cli.schema import UserCodeError, UserError
    from rlhf_cli.scoring import load_reward_fn

    monkeypatch.chdir(tmp_path)
    (tmp_path / "rewards_pkg").mkdir()
    (tmp_path / "rewards_pkg" / "__init__.py").write_text("")
    (tmp_path / "rewards_x.py").write_text("import rew\n")  # a missing import with a shared start
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match="could not import rewards_pkg.nope"):
        load_reward_fn("rewards_pkg.nope:score")
    with pytest.raises(UserCodeError, match="importing rewards_x raised ModuleNotFoundError"):
        load_reward_fn("rewards_x:score")


def test_ppo_in_a_two_turn_environment_learns_the_second_turns_reward(
    tmp_path, sft_final, prompts_file
):
    """The environment's reward (toy_envs.ColoursOnSecondTurn: the second reply's colour share)
    is the only reward: it sits on the second turn's last policy token, GAE runs over the policy's
    tokens of both turns as one sequence, the environment's message between them is masked."""
    out = tmp_path / "ppo"
    args = ppo_args(prompts_file, out, f"policy.init_from={sft_final}",
                    "env=toy_envs:ColoursOnSecondTurn", "env.max_turns=2", "train.batch_size=8",
                    "train.max_steps=30", "train.eval_every=15", "samples.every=30")  # fmt: skip
    result = run_cli(*args, cwd=tmp_path, env=REWARD_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reward: the environment toy_envs:ColoursOnSecondTurn" in result.stdout
    steps = [m for m in read_metrics(out) if "episode/turns" in m]
    assert [m["step"] for m in steps] == list(range(1, 31))
    first = sum(m["episode/env_reward"] for m in steps[:5]) / 5
    last = sum(m["episode/env_reward"] for m in steps[-5:]) / 5
    assert last > first + 0.3, (first, last)  # measured when written: 0.0 -> 0.95
    assert sum(m["episode/turns"] for m in steps) / 30 > 1.5
    assert [m for m in read_metrics(out) if "eval/turns" in m]
    assert "user: Now name colours." in result.stdout
