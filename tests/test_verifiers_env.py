"""env=verifiers: environments written for the installed verifiers package (tests/vf_envs.py, its
classic API as users write it) play unchanged: their env_response, stop conditions and rubric
decide; the policy's turns stand where verifiers would ask a client."""

import json
import os
from pathlib import Path

import pytest
import verifiers
from test_episodes import family_tokenizer, scripted

from rlhf_cli import episodes
from rlhf_cli.envs import verifiers_env
from rlhf_cli.schema import UserCodeError, UserError
from rlhf_cli.tracking import read_metrics

from conftest import run_cli

TESTS = Path(__file__).parent
VF_ENV = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
ADD = '<tool_call>{"name": "add", "arguments": {"a": 123456, "b": 654321}}</tool_call>'


@pytest.fixture
def on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


def first_row(kind: str = "tools") -> dict:
    env = verifiers_env.load_environment("vf_envs", {"kind": kind})
    return dict(env.get_dataset()[0])


def test_the_installed_package_is_the_classic_api_we_drive():
    assert verifiers.__version__.startswith("0.3."), verifiers.__version__


def test_a_tool_env_runs_its_own_tools_and_rubric(on_path):
    """The reply's <tool_call> becomes the AssistantMessage's tool call; ToolEnv.env_response runs
    the tool (its result is the next message); the reply without a call is the answer, which
    ToolEnv's stop condition ends and the environment's rubric scores."""
    make = verifiers_env.Verifiers.for_run(id="vf_envs")
    row = first_row()  # the environment's own data set, as write_rows writes it
    assert row["answer"] == "777777"
    env = make()
    opening = env.reset(row)
    assert opening[0] == {"role": "system", "content": "Use the tools to compute."}
    assert [s["function"]["name"] for s in env.tool_schemas] == ["add", "divide", "wait"]
    assert env.tool_schemas[0]["function"]["parameters"]["required"] == ["a", "b"]
    new, reward, done, info = env.step(ADD)
    assert (new, reward, done, info) == ([{"role": "tool", "content": "777777"}], 0.0, False,
                                         {"tool_calls": 1})  # fmt: skip
    assert env.step("Answer: 777777")[1:3] == (1.0, True)
    assert env.state["stop_condition"] == "no_tools_called"
    wrong = make()
    wrong.reset(row)
    assert wrong.step("Answer: 7")[1:3] == (0.0, True)


def test_a_tool_that_raises_is_the_environments_message_not_a_crash(on_path):
    env = verifiers_env.Verifiers.for_run(id="vf_envs")()
    env.reset(first_row())
    call = '<tool_call>{"name": "divide", "arguments": {"a": 1, "b": 0}}</tool_call>'
    new, reward, done, _ = env.step(call)
    assert new == [{"role": "tool", "content": "division by zero"}] and not done


def test_a_call_that_hangs_ends_the_episode_as_a_timeout_and_is_counted(on_path):
    """A tool that does not return within env.tool_timeout: the episode ends as verifiers' own
    timeout ends one (reward 0), counted as a tool error; the next episode runs on a fresh loop."""
    make = verifiers_env.Verifiers.for_run(id="vf_envs")
    env = make()
    env.tool_timeout = 0.2
    env.reset(first_row())
    call = '<tool_call>{"name": "wait", "arguments": {"seconds": 3}}</tool_call>'
    assert env.step(call) == ([], 0.0, True, {"tool_calls": 1, "tool_errors": 1})
    assert env.state["stop_condition"] == "timeout_reached"
    after = make()
    after.reset(first_row())
    assert after.step(ADD)[0] == [{"role": "tool", "content": "777777"}]


def test_its_own_stop_conditions_and_final_message_end_the_episode(on_path):
    """A MultiTurnEnv's env_response answers each reply; its final_env_response ends it (scored);
    its max_turns ends it too, before rlhf's limit."""
    make = verifiers_env.Verifiers.for_run(id="vf_envs", args={"kind": "relay", "max_turns": 4})
    env = make()
    env.reset(first_row("relay"))
    assert env.step("red")[:3] == ([{"role": "user", "content": "Now say blue (1)."}], 0.0, False)
    assert env.step("green")[0] == [{"role": "user", "content": "Now say blue (2)."}]
    assert env.step("blue")[1:3] == (1.0, True)
    assert env.state["stop_condition"] == "has_final_env_response"
    short = verifiers_env.Verifiers.for_run(id="vf_envs", args={"kind": "relay", "max_turns": 1})()
    short.reset(first_row("relay"))
    assert short.step("red")[1:3] == (0.0, True)
    assert short.state["stop_condition"] == "max_turns_reached"


@pytest.mark.parametrize("family", ["smollm2", "qwen2.5", "gemma-2"])
def test_through_the_rollout_layer_the_ids_are_the_templates_rendering(family, tmp_path, on_path):
    """Played by the rollout layer: the tools are shown by the template (`tools=`) or in the system
    message, the tool result comes back in the template's tool role or wrapped in a user message,
    the call is counted, and the episode's ids are the rendering of the whole conversation."""
    from rlhf_cli import chat

    tokenizer = family_tokenizer(tmp_path, family)
    make = verifiers_env.Verifiers.for_run(id="vf_envs")
    setup = episodes.Setup(env=make, spec="verifiers", max_turns=4)
    episode = scripted(make(), tokenizer, [ADD, "Answer: 777777"], setup, first_row())
    assert episode.finish == "done" and episode.turn_rewards == [0.0, 1.0]
    assert episode.tool_calls == 1 and episode.tool_errors == 0
    result = episode.messages[-2]
    assert result["role"] == ("tool" if chat.takes_tool_role(tokenizer) else "user")
    assert "777777" in result["content"]
    schemas = episode.tool_schemas
    assert (schemas is not None) == chat.takes_tools(tokenizer)
    whole = chat.render(tokenizer, episode.messages, tools=schemas)
    expected = tokenizer(whole, add_special_tokens=False)["input_ids"]
    ours = episode.prompt_ids + episode.ids
    assert ours == expected[: len(ours)], (tokenizer.decode(ours), whole)


def test_write_rows_and_bad_input(tmp_path, on_path, capsys):
    out = tmp_path / "rows.jsonl"
    assert verifiers_env.main(["vf_envs", str(out), "--args", '{"kind": "relay"}']) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 8 and rows[0]["prompt"][-1]["content"] == "Name a colour."
    assert verifiers_env.main(["no_such_env", str(tmp_path / "x.jsonl")]) == 2
    assert "no module no_such_env is installed" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()
    with pytest.raises(UserError, match="group reward functions"):
        verifiers_env.Verifiers.for_run(id="vf_envs", args={"kind": "group"})
    with pytest.raises(UserError, match="do not fit vf_envs.load_environment"):
        verifiers_env.Verifiers.for_run(id="vf_envs", args={"colour": "red"})
    with pytest.raises(UserCodeError, match="vf_envs.load_environment raised ValueError"):
        verifiers_env.Verifiers.for_run(id="vf_envs", args={"kind": "broken"})
    env = verifiers_env.Verifiers.for_run(id="vf_envs")()
    with pytest.raises(UserError, match="neither `prompt` nor `question`"):
        env.reset({"secret": 3})


@pytest.mark.slow  # two runs of the CLI (make test runs it)
def test_grpo_and_eval_run_in_a_verifiers_environment(tmp_path, tiny_model, sft_final):
    """The stages take env=verifiers end to end: GRPO trains on its episodes (the rubric's reward,
    the episode metrics), eval reports the environment's success with its interval."""
    rows = tmp_path / "relay.jsonl"
    assert verifiers_env.main(["vf_envs", str(rows), "--args", '{"kind": "relay"}']) == 0
    kwargs = "env.kwargs={id: vf_envs, args: {kind: relay, max_turns: 2}}"
    common = ["env=verifiers", kwargs, "env.max_turns=2", f"data={rows}"]
    out = tmp_path / "grpo"
    result = run_cli(
        "grpo", *common, f"policy.init_from={sft_final}", f"output_dir={out}",
        "data.eval_size=0", "train.batch_size=8", "grpo.group_size=4", "rollout.max_new_tokens=6",
        "train.max_steps=2", "samples.every=0", "train.eval_every=0", env=VF_ENV,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    last = [m for m in read_metrics(out) if "reward/mean" in m][-1]
    assert last["episode/turns"] >= 1 and "episode/finish_done" in last
    evaluated = run_cli(
        "eval", *common, f"policy={out / 'final'}", f"output_dir={tmp_path / 'eval'}",
        "generation.max_new_tokens=6", env=VF_ENV,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "eval.json").read_text())["metrics"]
    assert 0.0 <= metrics["env/success_ci_low"] <= metrics["env/success"] <= 1.0
