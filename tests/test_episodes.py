"""The rollout layer (rlhf_cli.episodes): multi-turn episodes token in, token out; the environment
interface and its checks; tools (schemas, the call protocol, errors and timeouts); the limits."""

import concurrent.futures
import random
import time

import pytest
import torch
import toy_envs
from transformers import AutoModelForCausalLM

from rlhf_cli import chat, envs, episodes, modeling, rollout
from rlhf_cli.data import PromptExample
from rlhf_cli.envs import calculator, guess
from rlhf_cli.envs import tools as toolkit
from rlhf_cli.schema import UserError

from conftest import config_of
from tiny import FAMILIES, make_family_model, make_family_tokenizer


def family_tokenizer(folder, family: str):
    """A family's tiny tokenizer as a run loads it: its preset's settings (Gemma 2 and Mistral
    fold a system message into the first user turn), a pad token distinct from EOS."""
    make_family_tokenizer(folder, family)
    config = config_of("sft", f"model={FAMILIES[family]['preset']}", f"model.name_or_path={folder}")
    return modeling.load_tokenizer(config.model)


def opening(tokenizer) -> str:
    """The whitespace a template puts between the generation prompt and the reply (Mistral: a
    space), which a model of that family samples as the start of its reply."""
    user = [{"role": "user", "content": "q"}]
    prompt = chat.render(tokenizer, user, add_generation_prompt=True)
    full = chat.render(tokenizer, [*user, {"role": "assistant", "content": "\ue000"}])
    lead = full[len(prompt) : full.index("\ue000")] if full.startswith(prompt) else ""
    return lead if not lead.strip() else ""


def scripted(
    env, tokenizer, replies: list[str], setup: episodes.Setup, row: dict | None = None
) -> episodes.Episode:
    """An episode of `env` on `row` whose policy turns are `replies` (tokenised and closed with
    the template's turn-end token, as a model would sample them), played through the same
    `episodes._advance` that `episodes.run` uses after sampling. `setup.env` (what makes the
    instances) defaults to env's class."""
    row = row or {"prompt": "p"}
    setup.env, setup.spec = setup.env or type(env), setup.spec or type(env).__name__
    (episode,) = episodes.start([PromptExample(None, [], 0, row)], tokenizer, setup)
    episode.env = env
    env.rng = getattr(env, "rng", None) or random.Random(0)
    env.tool_timeout = setup.tool_timeout
    env.reset(row)  # the instance `start` made played reset; so does this one
    stops = rollout.stop_token_ids(None, tokenizer)
    end = chat.turn_end_id(tokenizer) or tokenizer.eos_token_id
    tool_role = chat.takes_tool_role(tokenizer)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        for reply in replies:
            if episode.finish:
                break
            tokens = tokenizer(opening(tokenizer) + reply, add_special_tokens=False)["input_ids"]
            tokens.append(end)
            episodes._advance(episode, tokens, True, tokenizer, setup, stops, tool_role, pool)
    return episode


class Hints(envs.Environment):
    """Two hints, then done."""

    def reset(self, row):
        self.n = 0
        return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Guess."}]

    def step(self, message):
        self.n += 1
        return (
            ([{"role": "user", "content": "Higher."}], 0.0, False)
            if self.n < 3
            else ([], 1.0, True)
        )


# ---------------------------------------------------------------- token in, token out
# What a template writes into a conversation rendered whole that the policy did not sample: Qwen3
# puts an empty think block into the last assistant turn (the turns after the last user message)
# and none into earlier ones. An episode keeps the policy's own tokens (here: no think block).
# With enable_thinking=false (the preset), every generation prompt ends in that block, so the
# episode has it in every turn; the comparison leaves the block out on both sides.
REWRITES = {"qwen3": "<think>\n\n</think>\n\n"}


def without(ids: list[int], block: list[int]) -> list[int]:
    """`ids` with every occurrence of the sub-sequence `block` removed."""
    out, t = [], 0
    while t < len(ids):
        if block and ids[t : t + len(block)] == block:
            t += len(block)
        else:
            out.append(ids[t])
            t += 1
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_an_episode_built_turn_by_turn_is_the_templates_rendering_of_the_conversation(
    family, tmp_path
):
    """Every family's real template: the ids an episode holds after three policy turns and two
    environment replies (each appended as the text after the previous turn, never re-rendering
    it) are the ids of the template's rendering of the whole conversation, up to the text the
    template writes after the last turn's closing token (a newline). Environment ids are masked
    out of the policy's."""
    tokenizer = family_tokenizer(tmp_path, family)
    replies = ["I guess 50.", "Then 75, I think.", "It is 88"]
    episode = scripted(Hints(), tokenizer, replies, episodes.Setup(max_turns=5))
    assert episode.finish == "done" and episode.turns == 3 and episode.turn_rewards == [0, 0, 1]
    whole = chat.render(tokenizer, episode.messages)
    block = tokenizer(REWRITES.get(family, ""), add_special_tokens=False)["input_ids"]
    expected = without(tokenizer(whole, add_special_tokens=False)["input_ids"], block)
    ours = without(episode.prompt_ids + episode.ids, block)
    assert ours == expected[: len(ours)], (tokenizer.decode(ours), whole)
    assert tokenizer.decode(expected[len(ours) :]).strip() == ""
    # the policy's ids are exactly the replies and their closing tokens, in order
    sampled = [t for t, p in zip(episode.ids, episode.policy, strict=True) if p]
    end = chat.turn_end_id(tokenizer) or tokenizer.eos_token_id
    assert sampled == [
        t
        for r in replies
        for t in tokenizer(opening(tokenizer) + r, add_special_tokens=False)["input_ids"] + [end]
    ]
    assert episode.responses == replies


@pytest.mark.parametrize("family", ["qwen2.5", "smollm2", "llama-3.1", "gemma-2"])
def test_tool_results_follow_the_template_with_or_without_a_tool_role(family, tmp_path):
    """A reply with a tool call is answered by the tool, without a step: as a `tool` message where
    the template renders one (ChatML, Qwen2.5, Llama 3.1's ipython), as a user message wrapping
    <tool_response> where it does not (Gemma 2); templates with `tools=` support get the schemas
    that way, the others in a system message. Either way the episode's ids are the rendering of
    the conversation."""
    tokenizer = family_tokenizer(tmp_path, family)
    call = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
    episode = scripted(
        toy_envs.WithTools(), tokenizer, [call, "It is 5"], episodes.Setup(max_turns=3)
    )
    assert episode.finish == "done" and episode.tool_calls == 1 and episode.tool_errors == 0
    result = episode.messages[-2]
    assert result["role"] == ("user" if family == "gemma-2" else "tool")
    assert "5" in result["content"]
    schemas = episode.tool_schemas
    assert (schemas is not None) == chat.takes_tools(tokenizer)
    if schemas is None:
        assert "<tool_call>" in episode.messages[0]["content"]  # the instructions, as system text
    whole = chat.render(tokenizer, episode.messages, tools=schemas)
    expected = tokenizer(whole, add_special_tokens=False)["input_ids"]
    ours = episode.prompt_ids + episode.ids
    assert ours == expected[: len(ours)], (tokenizer.decode(ours), whole)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_ids_trained_on_are_the_ids_sampled(family, tmp_path, monkeypatch):
    """A real (tiny, random) model of each family plays 3-turn episodes in batches of 3: every
    turn's sampled ids (recorded from rollout.sample) are the episode's policy ids, in order; the
    context each turn was sampled from is the episode so far; the rollout's rows are prompt +
    episode, with the policy mask on exactly the sampled ids."""
    folder = make_family_model(tmp_path / family, family)
    tokenizer = modeling.load_tokenizer(
        config_of(
            "sft", f"model={FAMILIES[family]['preset']}", f"model.name_or_path={folder}"
        ).model
    )
    model = AutoModelForCausalLM.from_pretrained(folder)
    calls = []
    original = episodes.sample

    def recorded(model, tokenizer, contexts, *args):
        out = original(model, tokenizer, contexts, *args)
        calls.append((contexts, out))
        return out

    monkeypatch.setattr(episodes, "sample", recorded)
    setup = episodes.Setup(toy_envs.Echo, "toy_envs:Echo", max_turns=3, max_new_tokens=5,
                           batch_size=3)  # fmt: skip
    rows = [PromptExample(None, [], i, {"n": i}) for i in range(5)]  # five distinct prompts
    played = episodes.start(rows, tokenizer, setup)
    torch.manual_seed(0)
    # a random model rarely samples its stop token: every 4th id stops a turn as well, so that
    # turns end and the environment answers
    stops = sorted({*rollout.stop_token_ids(model, tokenizer), *range(40, len(tokenizer), 4)})
    episodes.run(model, tokenizer, played, setup, 1.0, stops)
    batch = episodes.to_rollout(played, tokenizer.pad_token_id, "cpu")
    segments = {}  # (episode, start) -> (start, end) of each run of policy ids
    for i, episode in enumerate(played):
        flags = [0, *episode.policy, 0]
        starts = [t for t in range(len(episode.policy)) if flags[t + 1] and not flags[t]]
        ends = [t for t in range(1, len(flags) - 1) if flags[t] and not flags[t + 1]]
        segments |= {(i, a): (a, b) for a, b in zip(starts, ends, strict=True)}
    matched = set()
    for context_batch, out in calls:
        for row, context in enumerate(context_batch):
            taken = out.response[row][out.response_mask[row].bool()].tolist()
            (key,) = [
                (i, a) for (i, a) in segments
                if (i, a) not in matched and played[i].prompt_ids + played[i].ids[:a] == context
            ]  # fmt: skip
            a, b = segments[key]
            assert played[key[0]].ids[a:b] == taken  # the sampled ids, untouched
            matched.add(key)
    assert matched == set(segments), "every policy turn is one sampled turn"
    # later turns are sampled together, not one episode at a time: a call after the first turn
    # holds several episodes
    assert any(len(batch) > 1 for batch, _ in calls[2:]), [len(b) for b, _ in calls]
    for i, episode in enumerate(played):
        row = batch.response[i][batch.response_mask[i].bool()].tolist()
        assert row == episode.ids
        assert batch.policy_mask[i][: len(row)].tolist() == episode.policy
        assert batch.query[i][batch.query_mask[i].bool()].tolist() == episode.prompt_ids
    assert any(e.turns == 3 for e in played), "episodes reached the turn limit"
    assert all(0 in e.policy for e in played if e.turns > 1), "the environment's ids are masked"


# ---------------------------------------------------------------- the one-turn case
def test_without_an_environment_an_episode_is_one_sampled_response(tiny_model):
    """env unset: the prompt's ids, one response, done: the Rollout is the one batched sampling
    returns, tensor for tensor (so the one-turn stages train exactly as before)."""
    tokenizer = modeling.load_tokenizer(config_of("sft", f"model.name_or_path={tiny_model}").model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    prompts = [[11, 12, 13], [14, 15], [16, 17, 18, 19], [20]]
    setup = episodes.Setup(max_new_tokens=6, batch_size=4)
    played = episodes.start([PromptExample("p", ids, i, {}) for i, ids in enumerate(prompts)], tokenizer, setup)  # fmt: skip
    stops = rollout.stop_token_ids(model, tokenizer)
    torch.manual_seed(3)
    episodes.run(model, tokenizer, played, setup, 1.0, stops)
    torch.manual_seed(3)
    direct = rollout.sample(model, tokenizer, prompts, 6, 1.0, stops)
    ours = episodes.to_rollout(played, tokenizer.pad_token_id, "cpu")
    for name in ("query", "query_mask", "response", "response_mask", "ended", "policy_mask"):
        assert torch.equal(getattr(ours, name), getattr(direct, name)), name
    assert [e.response for e in played] == rollout.decode_responses(tokenizer, direct)
    assert all(e.finish in ("done", "truncated") and e.turns == 1 for e in played)


# ---------------------------------------------------------------- limits
def test_the_limits_end_an_episode_and_say_why(tmp_path):
    tokenizer = family_tokenizer(tmp_path, "qwen2.5")
    episode = scripted(toy_envs.Echo(), tokenizer, ["a"] * 10, episodes.Setup(max_turns=3))
    assert (episode.finish, episode.turns, episode.turn_rewards) == ("max_turns", 3, [0.1] * 3)
    long = scripted(toy_envs.Echo(), tokenizer, ["one two three four"] * 10, episodes.Setup(max_turns=10, max_tokens=30))  # fmt: skip
    assert long.finish == "max_tokens" and len(long.ids) < 30 and long.turns < 10
    # a turn cut at max_new_tokens (no stop token) ends the episode as truncated
    setup = episodes.Setup(toy_envs.Echo, "Echo", max_turns=3)
    (cut,) = episodes.start([PromptExample(None, [], 0, {})], tokenizer, setup)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        episodes._advance(cut, [5, 6, 7], False, tokenizer, setup, [], False, pool)
    assert (cut.finish, cut.ended, cut.turns) == ("truncated", False, 1)
    table = episodes.counts([episode, long, cut])
    summary = episodes.summary(table)
    assert summary["episode/finish_max_turns"] == pytest.approx(1 / 3)  # 1 of 3, one rounding
    assert summary["episode/turns"] == pytest.approx((3 + long.turns + 1) / 3)


# ---------------------------------------------------------------- tools
def test_tool_calls_are_read_in_the_documented_protocol():
    text = 'x <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call> <tool_call>{"name": "add"</tool_call>'
    first, second = toolkit.parse_tool_calls(text)
    assert first == toolkit.ToolCall("add", {"a": 1, "b": 2})
    assert isinstance(second, str) and "not valid JSON" in second
    assert toolkit.parse_tool_calls('{"name": "add", "parameters": {"a": 1, "b": 2}}') == [toolkit.ToolCall("add", {"a": 1, "b": 2})]  # fmt: skip
    assert toolkit.parse_tool_calls('<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call>') == [toolkit.ToolCall("add", {"a": 1})]  # fmt: skip
    assert toolkit.parse_tool_calls("The answer is 3.") == []
    assert isinstance(toolkit.parse_tool_calls("<tool_call>[1, 2]</tool_call>")[0], str)


def test_a_tool_that_raises_hangs_or_is_misnamed_is_an_error_message_and_counted(tmp_path):
    tools = {t.__name__: t for t in toy_envs.WithTools.tools}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        ok = toolkit.run_tool(tools, toolkit.ToolCall("add", {"a": 2, "b": 3}), 5, pool)
        assert (ok.text, ok.error) == ("5", False)
        raised = toolkit.run_tool(tools, toolkit.ToolCall("fails", {"x": 1}), 5, pool)
        assert raised.error and "RuntimeError: broken tool" in raised.text
        started = time.perf_counter()
        hung = toolkit.run_tool(tools, toolkit.ToolCall("hangs", {"seconds": 3}), 0.2, pool)
        assert hung.error and "within 0.2 s" in hung.text and time.perf_counter() - started < 2
        missing = toolkit.run_tool(tools, toolkit.ToolCall("mul", {}), 5, pool)
        assert missing.error and "no tool 'mul'" in missing.text
        wrong = toolkit.run_tool(tools, toolkit.ToolCall("add", {"a": 1}), 5, pool)
        assert wrong.error and "wrong arguments" in wrong.text
    tokenizer = family_tokenizer(tmp_path, "smollm2")
    calls = ['<tool_call>{"name": "fails", "arguments": {"x": 1}}</tool_call>',
             '<tool_call>{"name": "hangs", "arguments": {"seconds": 3}}</tool_call>', "done"]  # fmt: skip
    episode = scripted(toy_envs.WithTools(), tokenizer, calls, episodes.Setup(max_turns=4, tool_timeout=0.2))  # fmt: skip
    assert (episode.tool_calls, episode.tool_errors, episode.finish) == (2, 2, "done")
    assert "broken tool" in episode.messages[-4]["content"]


def test_tool_schemas_come_from_signatures_and_docstrings():
    (schema,) = toolkit.tool_schemas([calculator.calculate])
    assert schema["function"]["name"] == "calculate"
    assert schema["function"]["parameters"]["required"] == ["expression"]
    with pytest.raises(UserError, match="no JSON schema could be built for `undocumented`"):
        toolkit.tool_schemas([toy_envs.undocumented])


# ---------------------------------------------------------------- the environment interface
def test_environment_results_are_checked_with_one_sentence():
    assert envs.messages_of("hi", "x") == [{"role": "user", "content": "hi"}]
    with pytest.raises(UserError, match="must return a string"):
        envs.messages_of([{"role": "user"}], "x")
    with pytest.raises(UserError, match=r"must return \(new messages, reward, done\)"):
        envs.step_result(1.0, "toy_envs:WrongStep")
    with pytest.raises(UserError, match="reward 'good'"):
        envs.step_result(([], "good", True), "e")
    with pytest.raises(UserError, match="done=1"):
        envs.step_result(([], 0.0, 1), "e")
    with pytest.raises(UserError, match="has no `reset` method"):
        envs.load("json:JSONDecoder")
    assert envs.load("calculator") is calculator.Calculator
    with pytest.raises(UserError, match="env.kwargs"):
        envs.make(calculator.Calculator, {"nope": 1}, "calculator")


def test_an_episodes_random_stream_is_seeded_by_its_place(tmp_path):
    """Drawn secrets depend on the run's seed, the step and the episode's place only."""
    tokenizer = family_tokenizer(tmp_path, "smollm2")
    setup = episodes.Setup(guess.GuessNumber, "guess_number", max_turns=7, seed=1)
    rows = [PromptExample(None, [], i, {}) for i in range(6)]
    first = [e.env.secret for e in episodes.start(rows, tokenizer, setup, "step 1")]
    assert first == [e.env.secret for e in episodes.start(rows, tokenizer, setup, "step 1")]
    assert first != [e.env.secret for e in episodes.start(rows, tokenizer, setup, "step 2")]


def test_the_shipped_environments():
    assert calculator.calculate("(17 + 5) * 123") == "2706"
    assert calculator.calculate("7 / 2") == "3.5"
    for bad in ("__import__('os')", "2 ** 1000", "x + 1"):
        with pytest.raises(ValueError):
            calculator.evaluate(bad)
    env = calculator.Calculator()
    env.reset({"question": "What is 12 * 34?", "answer": 408})
    assert env.step("The answer is 408.") == ([], 1.0, True)
    assert env.step("It is 1,408") == ([], 0.0, True)
    game = guess.GuessNumber()
    game.reset({"secret": 42})
    assert game.step("50") == ("Lower.", 0.0, False)
    assert game.step("I say 30") == ("Higher.", 0.0, False)
    assert game.step("42") == ([], pytest.approx(0.8), True)  # two wrong guesses: 1 - 2 x 0.1


# ---------------------------------------------------------------- Gymnasium (the real package)
def test_a_gymnasium_environment_plays_as_text_turns(tmp_path):
    """FrozenLake without slipping: the map as text (the agent's cell in brackets), actions by
    name, Gymnasium's own reward and termination; through the rollout layer like any
    environment."""
    from rlhf_cli.envs.gymnasium_env import Gymnasium

    kwargs = {"id": "FrozenLake-v1", "make": {"is_slippery": False},
              "actions": ["left", "down", "right", "up"]}  # fmt: skip
    tokenizer = family_tokenizer(tmp_path, "qwen2.5")
    setup = episodes.Setup(Gymnasium, "gymnasium", kwargs, max_turns=10)
    env = Gymnasium(**kwargs)
    env.rng = random.Random(0)
    path = ["I go right", "right", "jump", "down", "down", "down", "right"]  # "jump": no action
    episode = scripted(env, tokenizer, path, setup)
    assert (episode.finish, episode.turns, episode.env_reward) == ("done", 7, 1.0)
    assert "[S]FFF" in episode.messages[0]["content"]
    assert "not a valid action" in episode.messages[6]["content"]
    fell = scripted(Gymnasium(**kwargs), tokenizer, ["right", "down"], setup)  # (1, 1) is a hole
    assert (fell.finish, fell.env_reward) == ("done", 0.0)
    blackjack = Gymnasium("Blackjack-v1")  # no text rendering: the observation's value
    blackjack.rng = random.Random(0)
    assert "Observation: (" in blackjack.reset({"seed": 3})[0]["content"]
    with pytest.raises(UserError, match="takes Discrete action spaces"):
        Gymnasium("Pendulum-v1")
    with pytest.raises(UserError, match="env.kwargs.id=NoSuchGame-v0"):
        Gymnasium("NoSuchGame-v0")
    with pytest.raises(UserError, match="names 2 actions, but FrozenLake-v1 has 4"):
        Gymnasium("FrozenLake-v1", actions=["left", "right"])


def test_the_tool_use_demos_are_the_transcripts_the_rollout_layer_plays(tmp_path):
    """The shipped tool-use SFT demonstrations (make demo) are, message for message, the episode
    the calculator environment and the rollout layer make of their row and replies with the demo's
    template (SmolLM2's ChatML: the tool instructions in a system message, results in `tool`
    messages); the guesses without the tool are always wrong."""
    import json

    from conftest import REPO

    tokenizer = family_tokenizer(tmp_path, "smollm2")
    path = REPO / "rlhf_cli" / "datasets" / "demo-tools-sft" / "train.jsonl"
    rows = [json.loads(line) for line in path.open()]
    for row in [next(r for r in rows if r["ideal"]), next(r for r in rows if not r["ideal"])]:
        question = row["messages"][1]["content"]
        replies = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        setup = episodes.Setup(max_turns=3)
        env_row = {"question": question, "answer": row["answer"]}
        episode = scripted(calculator.Calculator(), tokenizer, replies, setup, env_row)
        assert episode.messages == row["messages"]
        assert episode.env_reward == float(row["ideal"])
    guesses = [r for r in rows if not r["ideal"]]
    assert len(guesses) == len(rows) // 2
    assert not any(calculator.correct(r["messages"][-1]["content"], r["answer"]) for r in guesses)
