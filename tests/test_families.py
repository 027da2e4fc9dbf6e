"""Every model family a preset ships: its real chat template masks exactly the assistant turns, its
architecture's quirks reach the log-probs the stages use, and a tiny random model of its class goes
through sft -> reward -> dpo -> ppo -> eval on the CPU (4-bit), each stage loading the last one's
checkpoint."""

import json
import math

import pytest
import torch

from rlhf_cli import chat, data, modeling
from rlhf_cli.data import IGNORE_INDEX
from rlhf_cli.scoring import RewardScorer

from conftest import config_of, data_config, run_in_process
from numerics import log_softmax_error, reordered_sum
from tiny import FAMILIES, chat_rows, family_chats, make_family_model, write_jsonl

CLOSING = {  # what ends an assistant turn in each template (trained: the model must learn to stop)
    "llama-3.2": "<|eot_id|>",
    "llama-3.1": "<|eot_id|>",
    "qwen2.5": "<|im_end|>\n",
    "qwen3": "<|im_end|>\n",
    "mistral": "</s>",
    "gemma-2": "<end_of_turn>\n",
    "smollm2": "<|im_end|>\n",
}


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    """family -> a tiny model folder, made on first use."""
    made = {}

    def get(family: str):
        if family not in made:
            made[family] = make_family_model(tmp_path_factory.mktemp(family), family)
        return made[family]

    return get


def preset_model(family: str, folder):
    """`model` as `model=<the family's preset> model.name_or_path=<folder>` composes it."""
    config = config_of("sft", f"model={FAMILIES[family]['preset']}", f"model.name_or_path={folder}")
    return config.model


def _targets(tokenizer, ids, labels) -> str:
    return tokenizer.decode(
        [t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    )


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_templates_mask_exactly_the_assistant_turns(family, family_models):
    """With a system turn and two assistant turns (Qwen3 renders past turns differently from the
    last one, which gets an empty think block; Mistral writes a system message only into a final user
    turn and Gemma 2 refuses one, which their presets fold into the first user turn), the targets
    are each reply and the text closing its turn, and the prompt a model generates from is where
    training put it."""
    folder = family_models(family)
    tokenizer = modeling.load_tokenizer(preset_model(family, folder))
    (row,) = family_chats(1)
    messages = row["messages"]
    ids, labels = data.tokenize_sft_row(row, "messages", tokenizer, data_config(), "row")
    assert tokenizer.decode(ids) == chat.render(tokenizer, messages)
    reply = messages[2]["content"]
    # (Qwen3's empty think block before the last reply is in the prompt its preset generates from,
    # enable_thinking=false, so it is not a target)
    turn = (" " if family == "mistral" else "") + reply + CLOSING[family]
    assert _targets(tokenizer, ids, labels) == turn + turn
    # what PPO and eval generate from is the start of what SFT trained on
    prompt = chat.render(tokenizer, messages[:-1], add_generation_prompt=True)
    assert chat.render(tokenizer, messages).startswith(prompt)
    # the system text reaches the model (Mistral's own template would drop it here)
    assert messages[0]["content"] in tokenizer.decode(ids)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_stages_log_probs_equal_the_models_own_forward(family, family_models):
    """modeling.target_logprobs (the fused head, or the full forward for soft-capped / scaled
    logits) and last_logprobs (PPO's) against log_softmax of the model's own forward: Gemma 2's
    soft-capping and scaled embeddings, tied embeddings and Qwen's biases all reach them."""
    from transformers import AutoModelForCausalLM

    folder = family_models(family)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 64, 23, 11]])
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX
    with torch.no_grad():
        expected = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0, :-1]
        expected = expected.gather(-1, ids[0, 1:, None])[:, 0]
        ours, _ = modeling.target_logprobs(model, {"input_ids": ids}, labels)
        mask = torch.ones_like(ids)
        positions = torch.arange(ids.size(1))[None]
        last, _ = modeling.last_logprobs(model, ids, mask, positions, ids[:, -4:], 1.0)
    # another order: the same backbone, the head on fewer rows (or the model's own forward,
    # sliced): each logit, a dot product of H terms (sum|h_k w_k| <= S; soft-capping and scaling
    # only shrink a difference), within reordered_sum(H, S), a log-prob 2x that + the float32
    # log_softmax_error(V, max|z|); a missing cap, scale or tie moves log-probs by > 1e-2
    with torch.no_grad():
        hidden = modeling.hidden_states(model, ids)
        weight = model.get_output_embeddings().weight
        largest = (hidden.abs() @ weight.abs().T).max().item()
        logits_max = model(input_ids=ids).logits.abs().max().item()
    bound = 2 * reordered_sum(hidden.size(-1), largest) + log_softmax_error(len(weight), logits_max)
    torch.testing.assert_close(ours, expected[2:], rtol=0, atol=bound)
    torch.testing.assert_close(last[0], expected[-4:], rtol=0, atol=bound)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_stage_runs_on_every_family_in_4_bit(family, family_models, tmp_path):
    folder = family_models(family)
    chats = write_jsonl(tmp_path / "chats.jsonl", family_chats(12))
    system = {"role": "system", "content": "Answer with a count and a colour."}
    pairs, prompts = [], []
    for row in chat_rows(12, 1):
        question, answer = row["messages"]
        wrong = {"role": "assistant", "content": answer["content"].replace("Answer", "cat dog")}
        pairs.append({"prompt": [system, question], "chosen": [answer], "rejected": [wrong]})
        prompts.append({"prompt": [system, question]})
    prefs = write_jsonl(tmp_path / "prefs.jsonl", pairs)
    prompt_file = write_jsonl(tmp_path / "prompts.jsonl", prompts)
    runs = {stage: tmp_path / stage for stage in ("sft", "reward", "dpo", "ppo", "eval")}
    steps = ["quant=nf4", "train.max_steps=2", "train.batch_size=2", "train.eval_every=0"]
    commands = {
        "sft": ["sft", f"model={FAMILIES[family]['preset']}", f"model.name_or_path={folder}",
                f"data={chats}", "data.eval_size=2", "samples.num_prompts=1",
                "samples.max_new_tokens=4", *steps],
        "reward": ["reward", f"init_from={runs['sft']}/final", f"data={prefs}", "data.eval_size=2",
                   *steps],
        "dpo": ["dpo", f"init_from={runs['sft']}/final", f"data={prefs}", "data.eval_size=2",
                *steps],
        "ppo": ["ppo", f"policy.init_from={runs['sft']}/final",
                f"reward.from={runs['reward']}/final", f"data={prompt_file}", "data.eval_size=2",
                "rollout.max_new_tokens=6", "samples.every=0", *steps[:-1], "train.max_steps=1"],
        "eval": ["eval", f"policy={runs['ppo']}/final", f"reward.from={runs['reward']}/final",
                 f"data={prompt_file}", "data.eval_size=2", "generation.max_new_tokens=6",
                 "judge=ppo_rewards:colour_share", f"perplexity_data={chats}", "quant=nf4"],
    }  # fmt: skip
    for stage, command in commands.items():
        assert run_in_process([*command, f"output_dir={runs[stage]}"]) == 0, (family, stage)
    for stage in ("sft", "reward", "dpo", "ppo"):
        manifest = json.loads((runs[stage] / "final" / "rlhf_stage.json").read_text())
        assert manifest["base_model"] == str(folder), stage  # each took the base from its parent
        assert all(math.isfinite(v) for v in manifest["final_metrics"].values()), stage
    report = json.loads((runs["eval"] / "eval.json").read_text())
    assert all(math.isfinite(report["metrics"][k]) for k in ("gold/mean", "rm/mean", "perplexity"))
    # the reward checkpoint loads back on its own (as a second model would) and scores
    scorer = RewardScorer.load(runs["reward"] / "final", quant="nf4")
    prompt = prompts[0]["prompt"]
    scores = scorer.score([prompt, prompt], [pairs[0]["chosen"][0]["content"], "cat"])
    assert all(math.isfinite(s) for s in scores)
