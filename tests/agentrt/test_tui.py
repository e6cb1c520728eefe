"""`agentrt chat` headless: prompt_toolkit pipe input, a recording rich console, the real tiny-random engine."""

from __future__ import annotations

import io
import json
import os
import signal
from contextlib import contextmanager

import anyio
import pytest
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.console import Console

from agentrt import Agent, tool
from agentrt.tools import calculator
from agentrt.backends import LocalBackend
from agentrt.tui import COMMANDS, ChatApp, PromptInput


@contextmanager
def chat_app(engine, *, tools=None, max_tokens=24, tool_choice="auto"):
    """A ChatApp over `engine`, reading a prompt_toolkit pipe, drawing on a recording console."""
    backend = LocalBackend(engine)

    def factory(model, mode, tools):
        agent = Agent(backend, tools, mode=mode, max_tokens=max_tokens, max_steps=2, temperature=1.0,
                      tool_choice=tool_choice if mode in ("chat", "thread") else "auto", workers=2,
                      grammar_options={"max_string_length": 6},  # lets a random model finish its calls
                      thread_options={"max_depth": 2, "max_text_chars": 3})  # and its reasoning trees
        agent.params.seed = 0  # greedy tiny-random writes only newlines; a seeded sample writes words
        return agent

    with create_pipe_input() as pipe:
        console = Console(record=True, file=io.StringIO(), width=120)
        app = ChatApp(factory, console, PromptInput(input=pipe, output=DummyOutput()), model="tiny-random",
                      tools=tools)
        yield app, pipe, console


def run(fn, *args, seconds: float = 20):
    async def go():
        with anyio.fail_after(seconds):
            return await fn(*args)
    return anyio.run(go)


def wait_until_free(engine) -> None:
    async def go():
        with anyio.fail_after(5):
            while engine.num_active or engine.pool.num_in_use:
                await anyio.sleep(0.01)
    anyio.run(go)


def test_a_message_gets_a_streamed_reply_and_joins_the_history(tiny_engine):
    with chat_app(tiny_engine, tools=[], max_tokens=24) as (app, _pipe, console):
        turn = run(app.handle, "Hello there")
        assert not turn.cancelled and turn.error is None
        assert turn.text and turn.deltas > 1  # drawn piece by piece as it was decoded
        assert app.history[0] == {"role": "user", "content": "Hello there"}
        assert app.history[-1] == {"role": "assistant", "content": turn.text}
        assert f"{turn.seconds:.1f}s" in console.export_text()
        run(app.handle, "And again")  # the second message carries the first exchange with it
        assert [m["content"] for m in app.history if m["role"] == "user"] == ["Hello there", "And again"]
    wait_until_free(tiny_engine)


def test_the_prompt_sends_on_enter_adds_lines_on_esc_enter_and_leaves_on_ctrl_d(tiny_engine):
    with chat_app(tiny_engine) as (app, pipe, console):
        source = app.input
        pipe.send_text("first line\x1b\rsecond line\r")
        assert run(source.read, "> ") == "first line\nsecond line"
        pipe.send_text("half-typed\x03")
        with pytest.raises(KeyboardInterrupt):
            run(source.read, "> ")
        pipe.send_text("/clear\r\x03/nope\r\x04")  # Ctrl-C at the prompt drops the line; Ctrl-D leaves
        run(app.run)
        out = console.export_text()
        assert "conversation cleared" in out and "unknown command /nope" in out


def test_slash_commands(tiny_engine, tmp_path):
    with chat_app(tiny_engine) as (app, _pipe, console):
        def said(line: str) -> str:
            start = len(console.export_text(clear=False))
            run(app.handle, line)
            return console.export_text(clear=False)[start:]

        assert all(cmd.split()[0] in said("/help") for cmd in COMMANDS)
        tools = said("/tools")
        assert all(name in tools for name in ("calculator", "read_file", "list_dir", "write_file"))
        assert "asks first" in tools  # write_file has side effects
        assert "unknown command /frobnicate" in said("/frobnicate")
        assert "no run yet" in said("/trace")
        assert "mode: chat" in said("/mode")
        assert "no mode 'sideways'" in said("/mode sideways") and app.mode == "chat"
        said("/mode react")
        assert app.mode == "react" and app.agent.mode == "react"
        said("/mode chat")
        assert "model: tiny-random" in said("/model")

        run(app.handle, "hi")
        assert app.history
        trace = tmp_path / "t.json"
        assert "wrote" in said(f"/trace {trace}")
        assert "traceEvents" in json.loads(trace.read_text())
        assert "conversation cleared" in said("/clear") and app.history == []
        said("/exit")
        assert app.done


def approval_tool(calls: list):
    @tool(side_effects=True)
    def launch(target: str) -> str:
        """Launch something at a target (changes the world).

        Args:
            target: what to launch at.
        """
        calls.append(target)
        return "launched"

    return launch


def answering(app, pipe, console, prompt: str, answers: list[str]):
    """Send `prompt`, typing the next of `answers` each time the app asks (then "n"); the Turn and the
    number of questions asked."""
    asked = 0

    def questions() -> int:
        out = console.export_text(clear=False)
        return out.count("has side effects") + out.count("answer y, n or a")

    async def go():
        base = questions()
        async with anyio.create_task_group() as tg:
            async def answer():
                nonlocal asked
                while True:
                    if questions() - base > asked:
                        pipe.send_text((answers[asked] if asked < len(answers) else "n") + "\r")
                        asked += 1
                    await anyio.sleep(0.01)
            tg.start_soon(answer)
            with anyio.fail_after(20):
                turn = await app.handle(prompt)
            tg.cancel_scope.cancel()
        return turn

    turn = anyio.run(go)
    return turn, asked


def test_side_effecting_tools_ask_yes_no_always(tiny_engine):
    calls: list[str] = []
    with chat_app(tiny_engine, tools=[approval_tool(calls)], tool_choice="required", max_tokens=60) as (
            app, pipe, console):
        turn, asked = answering(app, pipe, console, "launch it", ["n"])
        assert asked >= 1 and calls == [] and turn.tools
        assert all(not t.ok and "did not allow" in t.observation for t in turn.tools)

        turn, asked = answering(app, pipe, console, "launch it", ["maybe", "y", "y", "y"])
        assert asked >= 2  # an answer that is not y, n or a asks again
        assert len(calls) == len(turn.tools) >= 1 and all(t.ok for t in turn.tools)

        calls.clear()
        turn, asked = answering(app, pipe, console, "launch it", ["a"])
        assert asked == 1 and "launch" in app.always
        turn, asked = answering(app, pipe, console, "launch it again", [])
        assert asked == 0 and turn.tools and all(t.ok for t in turn.tools)  # allowed for the session
        run(app.handle, "/tools")
        assert "always allowed" in console.export_text(clear=False)


def test_ctrl_c_cancels_the_run_keeps_the_conversation_and_frees_the_engine(tiny_engine):
    with chat_app(tiny_engine, max_tokens=4000) as (app, _pipe, console):
        earlier = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
        app.history = list(earlier)

        async def interrupt_once_decoding():
            while tiny_engine.num_active == 0:
                await anyio.sleep(0.005)
            await anyio.sleep(0.2)
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends while a run goes

        async def go():
            async with anyio.create_task_group() as tg:
                tg.start_soon(interrupt_once_decoding)
                with anyio.fail_after(60):
                    return await app.send("write a very long story")

        turn = anyio.run(go)
        assert turn.cancelled and turn.seconds < 30
        assert app.history == earlier
        assert "cancelled" in console.export_text()
        wait_until_free(tiny_engine)
        app.agent.params.max_tokens = 8
        assert not run(app.handle, "still there?").cancelled  # the app goes on
        assert len(app.history) == 4


def test_plan_mode_draws_the_dag_and_keeps_its_trace(tiny_engine, tmp_path):
    with chat_app(tiny_engine, max_tokens=60) as (app, _pipe, console):
        run(app.handle, "/mode plan")
        turn = run(app.handle, "What is 2 + 3?", seconds=60)
        out = console.export_text()
        assert "plan being decoded" in out and "tasks" in out
        assert turn.error is None and app.history[-1] == {"role": "assistant", "content": turn.text}
        run(app.handle, f"/trace {tmp_path / 'plan.json'}")
        assert "traceEvents" in json.loads((tmp_path / "plan.json").read_text())
    wait_until_free(tiny_engine)


def test_thread_mode_shows_the_tool_calls_made_inside_the_generation(tiny_engine):
    with chat_app(tiny_engine, tools=[calculator], tool_choice="required", max_tokens=800) as (app, _pipe, console):
        run(app.handle, "/mode thread")
        turn = run(app.handle, "What is 2 + 3?", seconds=120)
        assert turn.error is None and not turn.cancelled
        assert turn.tools and all(t.name == "calculator" for t in turn.tools)  # the tree's first task calls it
        out = console.export_text()
        assert "mode thread" in out and "⚙ calculator(" in out
        assert app.history[-2:] == [{"role": "user", "content": "What is 2 + 3?"},
                                    {"role": "assistant", "content": turn.text}]
        second = run(app.handle, "And 4 + 4?", seconds=120)  # the conversation rides in the prompt
        assert second.error is None and len(app.history) == 4
    wait_until_free(tiny_engine)


def test_hogwild_mode_answers_from_workers_over_one_cache(tiny_engine):
    with chat_app(tiny_engine, tools=[], max_tokens=48) as (app, _pipe, console):
        run(app.handle, "/mode hogwild")
        turn = run(app.handle, "Name three colours.", seconds=120)
        assert turn.error is None and turn.text
        assert app.history[-1] == {"role": "assistant", "content": turn.text}
        assert "mode hogwild" in console.export_text()
    wait_until_free(tiny_engine)
