"""Splitting model text into content and tool calls, and building chat prompts with tools."""

from __future__ import annotations

import json
import random

import pytest

from agentrt.chat import ChatOptions, ToolCallStream, build_prompt, chat_constraint
from agentrt.errors import InvalidRequestError

TEXT = ('Let me check.<tool_call>{"name":"get_weather","arguments":{"city":"Paris","days":{"n":2}}}</tool_call>\n'
        '<tool_call>{"name":"add","arguments":{"a":1,"b":2}}</tool_call>')


def run(chunks: list[str]):
    s = ToolCallStream()
    events = [e for c in chunks for e in s.push(c)] + s.finish()
    return s, events


def test_whole_text_gives_content_and_calls():
    s, _ = run([TEXT])
    assert s.content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in s.calls] == [
        ("get_weather", {"city": "Paris", "days": {"n": 2}}), ("add", {"a": 1, "b": 2})]


@pytest.mark.parametrize("seed", range(20))
def test_any_chunking_streams_the_same_result(seed):
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(TEXT)), 12))
    chunks = [TEXT[i:j] for i, j in zip([0] + cuts, cuts + [len(TEXT)])]
    s, events = run(chunks)
    whole, _ = run([TEXT])
    assert s.content == whole.content == "".join(e.text for e in events if e.kind == "content")
    for i, call in enumerate(whole.calls):
        starts = [e for e in events if e.kind == "call_start" and e.index == i]
        assert len(starts) == 1 and starts[0].name == call.name  # the whole name, once
        frags = "".join(e.text for e in events if e.kind == "call_args" and e.index == i)
        assert frags == call.arguments == s.calls[i].arguments
        assert json.loads(frags) == json.loads(whole.calls[i].arguments)


def test_partial_tags_are_held_back_and_released():
    s = ToolCallStream()
    assert [e.text for e in s.push("a <tool_")] == ["a"]  # the space waits for what follows
    assert [e.text for e in s.push("box>")] == [" <tool_box>"]  # not a tag after all


def test_a_call_cut_short_keeps_its_arguments_so_far():
    s, _ = run(['<tool_call>{"name":"f","arguments":{"x":"abc'])
    assert s.calls[0].name == "f" and s.calls[0].arguments == '{"x":"abc'


def test_a_block_cut_before_its_name_is_dropped():
    s, events = run(['hello\n\n<tool_call>{"na'])
    assert s.content == "hello" and not s.calls


def test_prompt_describes_tools_when_the_template_has_no_tool_support(tiny_parts):
    tok = tiny_parts[1]
    tools = [{"type": "function", "function": {"name": "lookup", "description": "Find a fact",
                                               "parameters": {"type": "object", "properties": {}}}}]
    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"q":"x"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "42"}]
    text = tok.decode(build_prompt(tok, msgs, ChatOptions(tools=tools)))
    assert '"name": "lookup"' in text and "<tool_call>" in text
    assert '<tool_call>{"name": "lookup", "arguments": {"q": "x"}}</tool_call>' in text
    assert "<tool_response>\n42\n</tool_response>" in text
    no_tools = tok.decode(build_prompt(tok, msgs[:1], ChatOptions(tools=tools, tool_choice="none")))
    assert "lookup" not in no_tools


@pytest.mark.parametrize("messages,param", [
    ([], "messages"),
    ([{"role": "wizard", "content": "x"}], "messages[0].role"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}],
     "messages[0].tool_calls"),
])
def test_bad_messages_name_the_field(tiny_parts, messages, param):
    with pytest.raises(InvalidRequestError) as err:
        build_prompt(tiny_parts[1], messages, ChatOptions())
    assert err.value.param == param


def test_constraint_choice():
    from agentrt import grammar

    tools = [{"name": "f", "parameters": {"type": "object", "properties": {}}}]
    assert chat_constraint(ChatOptions()) is None
    assert isinstance(chat_constraint(ChatOptions(tools=tools)), grammar.ToolCalls)
    assert chat_constraint(ChatOptions(tools=tools, tool_choice="none")) is None
    assert isinstance(chat_constraint(ChatOptions(response_format={"type": "json_object"})), grammar.Json)
    with pytest.raises(InvalidRequestError):
        chat_constraint(ChatOptions(response_format={"type": "xml"}))
