"""`rlhf chat`: the interactive chat through a pseudo-terminal (streamed replies, multi-turn history,
/system, /reset, /temperature, /quit), the one-shot forms for scripts, and bad input."""

import io
import os
import pty
import select
import subprocess
import sys
import time

from rlhf_cli import chat_cli

PROMPT = chat_cli.PROMPT.encode()


def talk(argv: list[str], lines: list[str], timeout: float = 120) -> tuple[str, int]:
    """Run `rlhf chat` on a pseudo-terminal, sending each line once the prompt is back; returns
    (everything the terminal showed, exit code)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: stdin and stdout are the terminal
        os.execvp(sys.executable, [sys.executable, "-m", "rlhf_cli", "chat", *argv])
    shown = b""

    def wait_for_prompt(count: int) -> None:
        nonlocal shown
        end = time.time() + timeout
        while shown.count(PROMPT) < count and time.time() < end:
            if select.select([fd], [], [], 0.5)[0]:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # the child closed the terminal
                    return
                shown += chunk
        assert shown.count(PROMPT) >= count, shown.decode(errors="replace")[-2000:]

    for n, line in enumerate(lines, 1):
        wait_for_prompt(n)
        os.write(fd, line.encode() + b"\n")
    end = time.time() + timeout
    while time.time() < end:  # read what is left until the child exits
        if select.select([fd], [], [], 0.5)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
    _, status = os.waitpid(pid, 0)
    return shown.decode(errors="replace").replace("\r\n", "\n"), os.waitstatus_to_exitcode(status)


def expected_replies(sft_final, turns: list[list[dict]]) -> list[str]:
    """What the chat should answer greedily to each conversation, computed here in process."""
    config = chat_cli.parse_command_line(
        [f"policy={sft_final}", "temperature=0", "max_new_tokens=12"]
    )
    model, tokenizer = chat_cli.load(config)
    return [chat_cli.reply(model, tokenizer, messages, config, io.StringIO()) for messages in turns]


def test_the_terminal_chat_keeps_the_history_and_obeys_its_commands(sft_final):
    first, second = "three red cats", "and the blue dog"
    user1 = {"role": "user", "content": first}
    answer1 = expected_replies(sft_final, [[user1]])[0]
    with_history = [
        user1,
        {"role": "assistant", "content": answer1},
        {"role": "user", "content": second},
    ]
    answer2, fresh2 = expected_replies(
        sft_final, [with_history, [{"role": "user", "content": second}]]
    )
    assert answer1 and answer2 != fresh2  # the history changes the second answer here

    shown, code = talk(
        [f"policy={sft_final}", "temperature=0", "max_new_tokens=12"],
        [first, second, "/reset", second, "/temperature 2", "/temperature x", "/system be brief",
         "/nonsense", "/quit"],
    )  # fmt: skip
    assert code == 0, shown
    turns = shown.split(chat_cli.PROMPT)
    # each reply is streamed to the terminal after the line typed, and ends its turn
    assert turns[1].strip() == f"{first}\n{answer1}".strip()
    assert turns[2].strip() == f"{second}\n{answer2}".strip()
    assert "(the conversation starts over)" in turns[3]
    assert turns[4].strip() == f"{second}\n{fresh2}".strip()  # /reset forgot the history
    assert "(temperature 2)" in turns[5] and "takes a number >= 0" in turns[6]
    assert "system message set" in turns[7] and "unknown command /nonsense" in turns[8]


def test_one_answer_for_scripts_from_an_argument_or_stdin(sft_final):
    expected = expected_replies(
        sft_final, [[{"role": "user", "content": 'say "red", then: blue'}]]
    )[0]
    common = [sys.executable, "-m", "rlhf_cli", "chat", f"policy={sft_final}", "temperature=0",
              "max_new_tokens=12"]  # fmt: skip
    # prompt= is taken as typed: quotes, commas and colons need no escaping
    by_argument = subprocess.run([*common, 'prompt=say "red", then: blue'], capture_output=True,
                                 text=True, timeout=120, stdin=subprocess.DEVNULL)  # fmt: skip
    by_stdin = subprocess.run(common, input='say "red", then: blue\n', capture_output=True,
                              text=True, timeout=120)  # fmt: skip
    for result in (by_argument, by_stdin):
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout == expected + "\n"  # the answer alone on stdout; logs on stderr


def test_chat_bad_input_is_one_sentence(sft_final, tmp_path):
    cases = [
        ([f"policy={tmp_path / 'nowhere'}", "prompt=hi"], "policy="),
        ([f"policy={sft_final}", "temperature=-1", "prompt=hi"], "temperature=-1.0 is not valid"),
        ([f"policy={sft_final}", "prompt=  "], "the prompt is empty"),
        ([f"policy={sft_final}", "--verbose", "prompt=hi"], "key=value settings only"),
    ]
    for argv, message in cases:
        result = subprocess.run([sys.executable, "-m", "rlhf_cli", "chat", *argv], capture_output=True,
                                text=True, timeout=120, stdin=subprocess.DEVNULL)  # fmt: skip
        assert result.returncode == 2, (argv, result.stderr[-2000:])
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("rlhf chat: error:")
    usage = subprocess.run([sys.executable, "-m", "rlhf_cli", "chat", "--help"], capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    assert (
        usage.returncode == 0
        and "/temperature" in usage.stdout
        and "max_new_tokens:" in usage.stdout
    )


def test_tool_mode_runs_the_calls_and_answers_the_model_with_their_results(sft_final):
    """tools=: the template has no tools= support (ChatML), so the schemas go into a system
    message; a reply's <tool_call> runs the tool and comes back as a `tool` message; replies and
    tool results alternate until a reply calls nothing, at most tool_rounds rounds."""
    config = chat_cli.parse_command_line(
        [f"policy={sft_final}", "temperature=0", "max_new_tokens=6", "tools=[toy_envs:add,toy_envs:fails]",
         "tool_rounds=2"]
    )  # fmt: skip
    model, tokenizer = chat_cli.load(config)
    tools = chat_cli.Tools(config, tokenizer)
    opening = chat_cli.opening(config, tools)
    assert opening[0]["role"] == "system" and '"name": "add"' in opening[0]["content"]
    shown = io.StringIO()
    call = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
    assert tools.answer(call, shown) == [{"role": "tool", "content": "5"}]
    failed = tools.answer('<tool_call>{"name": "fails", "arguments": {"x": 1}}</tool_call>', shown)
    assert "RuntimeError: broken tool" in failed[0]["content"]
    assert "[tool add] 5" in shown.getvalue() and tools.answer("no call here", shown) == []

    class AlwaysAnswered(chat_cli.Tools):  # every reply counts as a call: the round limit ends it
        def answer(self, text, out):
            return [{"role": "tool", "content": "again"}]

    always = AlwaysAnswered.__new__(AlwaysAnswered)
    always.__dict__.update(tools.__dict__)
    messages = [*opening, {"role": "user", "content": "add 2 and 3"}]
    out = io.StringIO()
    chat_cli.respond(model, tokenizer, messages, config, out, always)
    assert [m["role"] for m in messages[2:]] == ["assistant", "tool"] * 3
    assert "stopped after 2 rounds of tool calls" in out.getvalue()
    # without a call: one reply, as without tools
    messages = [*opening, {"role": "user", "content": "hi"}]
    chat_cli.respond(model, tokenizer, messages, config, io.StringIO(), tools)
    assert [m["role"] for m in messages[2:]][:1] == ["assistant"]


def test_tool_mode_bad_input_is_one_sentence(sft_final, capsys, monkeypatch):
    """In process (each case stops before or just after loading): one sentence, exit 2."""
    import pytest

    monkeypatch.syspath_prepend(os.path.dirname(__file__))
    cases = [
        (["tools=[not a spec]"], "write each tool as package.module:function"),
        (["tools=[toy_envs:undocumented]"], "no JSON schema could be built for `undocumented`"),
        (["tools=[toy_envs:nothing_here]"], "has no function 'nothing_here'"),
        (["tool_rounds=0"], "tool_rounds=0"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as stopped:
            chat_cli.main([f"policy={sft_final}", "prompt=hi", *argv])
        err = capsys.readouterr().err
        assert stopped.value.code == 2, (argv, err[-2000:])
        assert message in err and "Traceback" not in err, err
