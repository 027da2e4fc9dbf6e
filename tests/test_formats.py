"""The dataset formats people bring (TRL's documented ones, HH-RLHF, UltraFeedback, ShareGPT),
message roles, a stage given the wrong kind of data, and the one truncation rule for preference
data (training pairs and every reward-model scorer alike)."""

import re

import pytest

from rlhf_cli import chat, data, modeling
from rlhf_cli.data import IGNORE_INDEX
from rlhf_cli.schema import UserError
from rlhf_cli.scoring import RewardScorer

from conftest import config_of, data_config, model_config


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return modeling.load_tokenizer(model_config(tiny_model))


def _targets(tokenizer, example) -> str:
    return tokenizer.decode(
        [t for t, label in zip(example.input_ids, example.labels, strict=True) if label >= 0]
    )


def _prompt_part(tokenizer, example) -> str:
    return tokenizer.decode(
        [t for t, label in zip(example.input_ids, example.labels, strict=True) if label < 0]
    )


def _pairs(tokenizer, rows, **changes):
    return data.tokenize_preferences(rows, tokenizer, data_config("dpo", **changes), "src")


# ---------------------------------------------------------------- preference formats
def test_hh_rlhf_text_transcripts_without_a_prompt_column(tokenizer):
    """Anthropic HH-RLHF: `chosen`/`rejected` are whole transcripts sharing their start; the prompt
    is that start, up to the whitespace before the first word that differs (the old code stopped:
    "has no `prompt` column ... add a prompt column")."""
    dialogue = "\n\nHuman: What is the colour of the sky?\n\nAssistant:"
    rows = [{"chosen": dialogue + " It is blue.", "rejected": dialogue + " Green."},
            {"chosen": dialogue + " Blue.", "rejected": dialogue + " Bleh."}]  # fmt: skip
    pairs, stats = _pairs(tokenizer, rows)
    assert stats.kept == 2
    for pair, (good, bad) in zip(pairs, [(" It is blue.", " Green."), (" Blue.", " Bleh.")],
                                 strict=True):  # fmt: skip
        # plain text: the tokenizer's BOS, the prompt, the response and a trained EOS
        assert _targets(tokenizer, pair.chosen) == good + tokenizer.eos_token
        assert _targets(tokenizer, pair.rejected) == bad + tokenizer.eos_token
        assert _prompt_part(tokenizer, pair.chosen).endswith("Assistant:")
    # responses that begin alike ("I ...") stay whole: the prompt ends at the last "Assistant:"
    (alike,), _ = _pairs(tokenizer, [{"chosen": dialogue + " I think blue.",
                                      "rejected": dialogue + " I think red."}])  # fmt: skip
    assert _targets(tokenizer, alike.chosen) == " I think blue." + tokenizer.eos_token
    # the same rows with the prompt given explicitly tokenize the same
    explicit = [{"prompt": dialogue, "chosen": " It is blue.", "rejected": " Green."}]
    (same,), _ = _pairs(tokenizer, explicit)
    assert same.chosen.input_ids == pairs[0].chosen.input_ids
    assert same.rejected.labels == pairs[0].rejected.labels


def test_ultrafeedback_rows_whose_responses_repeat_the_prompt(tokenizer):
    """UltraFeedback-binarized: `prompt` is a string, `chosen`/`rejected` are [user, assistant]
    message lists repeating it (the old code stopped: "a plain-text prompt needs a plain-text
    completion"). They train exactly as the explicit conversational pair does."""
    user = {"role": "user", "content": "What is the colour of grass?"}
    rows = [{"prompt": user["content"],
             "chosen": [user, {"role": "assistant", "content": "green"}],
             "rejected": [user, {"role": "assistant", "content": "red"}]}]  # fmt: skip
    explicit = [{"prompt": [user], "chosen": [{"role": "assistant", "content": "green"}],
                 "rejected": [{"role": "assistant", "content": "red"}]}]  # fmt: skip
    (ours,), _ = _pairs(tokenizer, rows)
    (theirs,), _ = _pairs(tokenizer, explicit)
    assert ours == theirs
    assert _targets(tokenizer, ours.chosen) == "green<|im_end|>\n"
    # a message-list prompt repeated by message-list responses (conversational UltraFeedback)
    (again,), _ = _pairs(tokenizer, [{**rows[0], "prompt": [user]}])
    assert again == theirs
    # a text prompt with conversational responses that do not repeat it: one user turn
    (turned,), _ = _pairs(tokenizer, [{**explicit[0], "prompt": user["content"]}])
    assert turned == theirs


def test_implicit_prompt_conversations_share_their_start(tokenizer):
    """TRL's implicit-prompt rows: chosen/rejected are whole conversations; the prompt is every
    turn they share (system and earlier turns included)."""
    start = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "sky?"}]
    rows = [{"chosen": [*start, {"role": "assistant", "content": "blue"}],
             "rejected": [*start, {"role": "assistant", "content": "red"}]}]  # fmt: skip
    (pair,), _ = _pairs(tokenizer, rows)
    assert _targets(tokenizer, pair.chosen) == "blue<|im_end|>\n"
    assert "be brief" in _prompt_part(tokenizer, pair.rejected)
    with pytest.raises(UserError, match="do not share a start"):
        _pairs(tokenizer, [{"chosen": "yes", "rejected": "no"}])


def test_sharegpt_rows_for_sft_and_preferences(tokenizer):
    """ShareGPT (`conversations` of {from, value}: human/gpt/system), which LLaMA-Factory users
    bring, is the same data as `messages`; its ranking form has {from, value} responses."""
    turns = [{"from": "system", "value": "be brief"}, {"from": "human", "value": "sky?"},
             {"from": "gpt", "value": "blue"}]  # fmt: skip
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "sky?"},
                {"role": "assistant", "content": "blue"}]  # fmt: skip
    config = data_config()
    sharegpt, _ = data.tokenize_sft([{"conversations": turns}], tokenizer, config, "src")
    plain, _ = data.tokenize_sft([{"messages": messages}], tokenizer, config, "src")
    assert sharegpt == plain and _targets(tokenizer, sharegpt[0]) == "blue<|im_end|>\n"
    # the speakers are mapped, never rendered as roles
    assert "gpt" not in tokenizer.decode(sharegpt[0].input_ids)
    ranking = [{"conversations": turns[:2], "chosen": {"from": "gpt", "value": "blue"},
                "rejected": {"from": "gpt", "value": "red"}}]  # fmt: skip
    (pair,), _ = _pairs(tokenizer, ranking)
    assert pair.chosen == plain[0]
    prompts, _ = data.tokenize_prompts([{"conversations": turns}], tokenizer, config, "src")
    assert prompts[0].prompt == messages[:2]  # the last assistant turn is the answer, dropped
    for speaker in ("wizard", ["human"]):
        with pytest.raises(UserError, match=re.escape(f"is from {speaker!r}; the speakers")):
            data.tokenize_sft([{"conversations": [{"from": speaker, "value": "x"}]}], tokenizer,
                              config, "src")  # fmt: skip
    # LLaMA-Factory's `system` column is the conversation's system turn
    with_column = {"conversations": turns[1:], "system": "be brief"}
    assert data.tokenize_sft([with_column], tokenizer, config, "src")[0] == plain


def test_sft_on_several_assistant_turns_and_a_system_turn(tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "sky?"},
                {"role": "assistant", "content": "blue"}, {"role": "user", "content": "grass?"},
                {"role": "assistant", "content": "green"}]  # fmt: skip
    (example,), _ = data.tokenize_sft([{"messages": messages}], tokenizer, data_config(), "src")
    assert _targets(tokenizer, example) == "blue<|im_end|>\ngreen<|im_end|>\n"


def test_prompt_only_rows_for_ppo_eval_and_sample(tokenizer):
    """Prompt-only rows (text or conversational), conversations whose last assistant turn is
    dropped, and preference rows whose shared start is the prompt."""
    system = {"role": "system", "content": "be brief"}
    user = {"role": "user", "content": "sky?"}
    rows = [{"prompt": "sky?"}, {"prompt": [system, user]},
            {"messages": [system, user, {"role": "assistant", "content": "blue"}]},
            {"chosen": [user, {"role": "assistant", "content": "blue"}],
             "rejected": [user, {"role": "assistant", "content": "red"}]},
            # UltraFeedback: the prompt is rendered as the pair trained it, a user turn
            {"prompt": "sky?", "chosen": [user, {"role": "assistant", "content": "blue"}],
             "rejected": [user, {"role": "assistant", "content": "red"}]},
            {"conversations": [{"from": "human", "value": "sky?"}], "system": "be brief"}]  # fmt: skip
    prompts, _ = data.tokenize_prompts(rows, tokenizer, data_config("eval"), "src")
    expected = ["sky?", [system, user], [system, user], [user], [user], [system, user]]
    assert [p.prompt for p in prompts] == expected
    with pytest.raises(UserError, match="nor `chosen` and `rejected`"):
        data.tokenize_prompts([{"chosen": "blue"}], tokenizer, data_config("eval"), "src")
    assert tokenizer.decode(prompts[1].input_ids).endswith("<|im_start|>assistant\n")


# ---------------------------------------------------------------- roles
def test_a_role_outside_the_known_set_is_refused_unless_configured(tokenizer):
    """A `wizard` turn was rendered and trained on silently (loss 6.55); now one sentence naming
    the roles accepted, unless data.extra_roles lets it through to a template that takes it."""
    messages = [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(UserError) as err:
        data.tokenize_sft([{"messages": messages}], tokenizer, data_config(), "src")
    assert "has the role 'wizard'; the roles accepted are system, user, assistant, tool" in str(
        err.value
    )
    assert "data.extra_roles" in str(err.value)
    config = data_config(extra_roles=["wizard"])
    (example,), _ = data.tokenize_sft([{"messages": messages}], tokenizer, config, "src")
    assert "<|im_start|>wizard" in tokenizer.decode(example.input_ids)


# ---------------------------------------------------------------- the wrong data for a stage
@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "q", "completion": "a", "label": True},
         "holds unpaired feedback (prompt/completion with a good/bad `label`, KTO's format), but "
         "rlhf reward needs preference pairs: `prompt` + `chosen` + `rejected`"),
        ({"messages": [{"role": "user", "content": "q"}]},
         "holds SFT demonstrations, but rlhf reward needs preference pairs"),
        ({"text": "q"}, "has columns ['text'], but rlhf reward needs preference pairs"),
    ],
)  # fmt: skip
def test_a_preference_stage_given_other_data_names_the_format_it_needs(tokenizer, row, message):
    with pytest.raises(UserError) as err:
        data.tokenize_preferences([row], tokenizer, data_config("reward"), "src", "rlhf reward")
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("row", "kind"),
    [({"prompt": "q", "chosen": "a", "rejected": "b"}, "preference pairs"),
     ({"prompt": "q", "completion": "a", "label": False}, "unpaired feedback")],
)  # fmt: skip
def test_sft_given_pairs_or_feedback_refuses_to_learn_the_bad_responses(tokenizer, row, kind):
    with pytest.raises(UserError) as err:
        data.tokenize_sft([row], tokenizer, data_config(), "src")
    assert f"src holds {kind}" in str(err.value) and "rlhf sft cannot train on" in str(err.value)


# ---------------------------------------------------------------- truncation of preference data
def test_keep_end_cuts_the_prompts_start_first_and_keeps_a_bos():
    ids, labels = list(range(10)), [IGNORE_INDEX] * 6 + [6, 7, 8, 9]
    assert data.keep_end(ids, labels, 10) == (ids, labels, False)
    cut_ids, cut_labels, into_response = data.keep_end(ids, labels, 7, keep_first=1)
    assert cut_ids == [0, 4, 5, 6, 7, 8, 9] and cut_labels[-4:] == [6, 7, 8, 9]
    assert not into_response
    # a response longer than max_length keeps its end: the scored token and EOS
    cut_ids, cut_labels, into_response = data.keep_end(ids, labels, 3)
    assert cut_ids == [7, 8, 9] and cut_labels == [7, 8, 9] and into_response


def test_long_pairs_and_scored_responses_are_cut_the_same_way(tokenizer):
    """The reward stage used to keep a long pair's start (cutting the scored last token and EOS)
    while its scorer (PPO, eval) kept the end: a reward model trained on one input and scored
    another. Now a training pair's side and the scorer's input are the same tokens, the end kept."""
    prompt = [{"role": "user", "content": " ".join(["what is the colour of the sky"] * 8)}]
    row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "blue"}],
           "rejected": [{"role": "assistant", "content": "green green green"}]}  # fmt: skip
    (full,), _ = _pairs(tokenizer, [row])
    limit = len(full.chosen)  # the rejected side is longer by two tokens
    assert len(full.rejected) == limit + 2
    (pair,), stats = _pairs(tokenizer, [row], max_length=limit)
    assert (stats.truncated, stats.response_cut) == (1, 0) and pair.chosen == full.chosen
    # only the prompt's start is gone, after the leading BOS (this tokenizer's BOS is ChatML's
    # <|im_start|>, as SmolLM2's is)
    assert tokenizer.bos_token_id == full.rejected.input_ids[0]
    assert pair.rejected.input_ids == full.rejected.input_ids[:1] + full.rejected.input_ids[3:]
    assert _targets(tokenizer, pair.rejected) == _targets(tokenizer, full.rejected)
    # what a reward model trained on these pairs scores at PPO / eval time
    config = config_of("reward", f"data.max_length={limit}")
    scorer = RewardScorer(None, None, tokenizer, config, {}, "cpu", None)
    scored = scorer.encode(prompt, "green green green")
    assert scored.input_ids == pair.rejected.input_ids and scorer.truncated == 1
    # counted in the summary the stage prints; drop skips the pair instead
    assert "1 truncated" in stats.summary()
    with pytest.raises(UserError, match="no usable example"):
        _pairs(tokenizer, [row], max_length=limit, truncation="drop")


def test_chat_render_uses_the_template_variables_and_merge_system(tiny_model):
    """model.chat_template_kwargs reach the template (Llama 3.2's date_string, Qwen3's
    enable_thinking) in every rendering; model.merge_system folds a system turn into the first
    user turn for templates without a system role."""
    template = ("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
                "{% if add_generation_prompt %}<{{ day | default('today') }}>{% endif %}")  # fmt: skip
    tokenizer = modeling.load_tokenizer(
        model_config(tiny_model, chat_template=template, merge_system=True,
                     chat_template_kwargs={"day": "26 Jul 2024"})
    )  # fmt: skip
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "sky?"}]
    text = chat.render(tokenizer, messages, add_generation_prompt=True)
    assert text == "[user]be brief\n\nsky?<26 Jul 2024>"
    assert tokenizer.decode(data.encode_prompt(tokenizer, messages)) == text
