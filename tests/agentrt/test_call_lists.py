"""Call lists that end: an exact repeat of an earlier call of the turn is refused and ends the list,
as do the call cap and the budget; a named tool_choice or parallel_tool_calls=false mean one call."""

from __future__ import annotations

import json
import random

import anyio
import pytest
import torch

from agentrt.chat import TOOL_SEPARATORS, ChatOptions, ToolCallStream, prepare_chat, stream_chat, turn_calls
from agentrt.grammar import GrammarCompiler, render_tool_call
from agentrt.engine.sampling import SamplingParams

ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}}}
MUL = {"type": "function", "function": {"name": "mul", "parameters": ADD["function"]["parameters"]}}


def call(name: str, **args) -> str:
    return render_tool_call(name, args, separators=TOOL_SEPARATORS)


class Scripted:
    """A model that wants to write `script`, token after token: of the tokens its matcher allows it
    takes the script's next one, and when that one is refused it takes the first allowed."""

    def __init__(self, matcher, tokenizer, script: str) -> None:
        self.matcher, self.script = matcher, tokenizer.encode(script, add_special_tokens=False)

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, index)
        n = self.matcher.num_accepted
        want = self.script[n] if n < len(self.script) else None
        if want is not None and bitmask[index, want // 32].item() >> (want % 32) & 1:
            bitmask[index] = 0
            bitmask[index, want // 32] = (1 << (want % 32)) - (1 << 32) * (want % 32 == 31)

    def __getattr__(self, name: str):
        return getattr(self.matcher, name)


def chat(engine, options: ChatOptions, script: str, max_tokens: int = 200, messages=None):
    compiler = GrammarCompiler(engine.tokenizer, vocab_size=engine.vocab_size)
    messages = messages or [{"role": "user", "content": "Add some numbers."}]

    async def go():
        prompt, matcher = await prepare_chat(engine, compiler, messages, options)
        events, result = [], None
        async for ev in stream_chat(engine, prompt, Scripted(matcher, engine.tokenizer, script),
                                    SamplingParams(max_tokens=max_tokens)):
            events.append(ev)
            result = ev
        return result, events[:-1]

    return anyio.run(go)


def test_a_model_that_repeats_its_call_makes_it_once(tiny_engine):
    script = "\n".join([call("add", a=5, b=-3)] * 6)
    result, events = chat(tiny_engine, ChatOptions(tools=[ADD], tool_choice="required"), script)
    assert [(c.name, json.loads(c.arguments)) for c in result.tool_calls] == [("add", {"a": 5, "b": -3})]
    assert result.finish_reason == "tool_calls" and result.refused == 1
    assert [e.kind for e in events].count("call_start") == 1  # the repeat was never streamed


def test_different_calls_all_run_and_a_repeat_among_them_ends_the_list(tiny_engine):
    script = "\n".join([call("add", a=1, b=2), call("mul", a=1, b=2), call("add", a=1, b=20),
                        call("add", a=1, b=2), call("mul", a=3, b=4)])
    result, events = chat(tiny_engine, ChatOptions(tools=[ADD, MUL], tool_choice="required"), script)
    got = [(c.name, json.loads(c.arguments)) for c in result.tool_calls]
    assert got == [("add", {"a": 1, "b": 2}), ("mul", {"a": 1, "b": 2}), ("add", {"a": 1, "b": 20})]
    streamed = "".join(e.text for e in events if e.kind == "call_args" and e.index == 2)
    assert json.loads(streamed) == {"a": 1, "b": 20}  # held back while it could repeat, then shown whole


def test_a_call_made_earlier_in_the_turn_is_not_made_again(tiny_engine):
    messages = [{"role": "user", "content": "Add 5 and -3."},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 5, "b": -3}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "2"}]
    assert turn_calls(messages) == [("add", '{"a": 5, "b": -3}')]
    assert turn_calls(messages + [{"role": "user", "content": "again"}]) == []
    result, _ = chat(tiny_engine, ChatOptions(tools=[ADD]), call("add", a=5, b=-3) + " more", messages=messages)
    assert result.tool_calls == [] and result.refused == 1 and result.finish_reason == "stop"


@pytest.mark.parametrize("options", [
    ChatOptions(tools=[ADD, MUL], tool_choice="required", parallel_tool_calls=False),
    ChatOptions(tools=[ADD, MUL], tool_choice={"type": "function", "function": {"name": "add"}}),
    ChatOptions(tools=[ADD, MUL], tool_choice="auto", parallel_tool_calls=False),
    ChatOptions(tools=[ADD, MUL], tool_choice="required", max_tool_calls=1),
], ids=["parallel_tool_calls=false", "named tool_choice", "auto, parallel_tool_calls=false", "max_tool_calls=1"])
def test_one_call_when_one_is_asked_for(tiny_engine, options):
    script = "\n".join([call("add", a=1, b=2), call("add", a=3, b=4), call("add", a=5, b=6)])
    result, _ = chat(tiny_engine, options, script)
    assert [(c.name, json.loads(c.arguments)) for c in result.tool_calls] == [("add", {"a": 1, "b": 2})]
    assert result.finish_reason == "tool_calls"


def test_the_call_cap_and_the_budget_end_a_list(tiny_engine):
    script = "\n".join(call("add", a=i, b=i) for i in range(40))
    result, _ = chat(tiny_engine, ChatOptions(tools=[ADD], tool_choice="required", max_tool_calls=3), script)
    assert len(result.tool_calls) == 3 and result.finish_reason == "tool_calls"
    result, _ = chat(tiny_engine, ChatOptions(tools=[ADD], tool_choice="required", max_tool_calls=None), script,
                     max_tokens=120)
    assert result.finish_reason == "tool_calls" and not result.incomplete  # closed before the budget ran out
    assert 2 <= len(result.tool_calls) and all(c.complete for c in result.tool_calls)


@pytest.mark.parametrize("seed", range(6))
def test_held_calls_stream_the_same_result_in_any_chunking(seed):
    text = "\n".join([call("add", a=1, b=2), call("add", a=1, b=23), call("add", a=1, b=2)])
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), 15))
    s = ToolCallStream()
    events = [e for c in [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])] for e in s.push(c)]
    events += s.finish()
    assert [json.loads(c.arguments) for c in s.calls] == [{"a": 1, "b": 2}, {"a": 1, "b": 23}] and s.refused == 1
    for i, c in enumerate(s.calls):
        assert "".join(e.text for e in events if e.kind == "call_args" and e.index == i) == c.arguments
    assert [e.index for e in events if e.kind == "call_start"] == [0, 1]


WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_listed_names():
    from agentrt.grammar import listed_names

    assert listed_names("What is the weather in Paris and in Rome?") == [["Paris", "Rome"]]
    assert listed_names("Weather for Boston, MA and San Francisco, CA.") == [["Boston", "MA", "San Francisco", "CA"]]
    assert listed_names("Find the population of Tokyo, Delhi or Shanghai.") == [["Tokyo", "Delhi", "Shanghai"]]
    assert listed_names("What is the area of a circle of radius 5 in Python?") == []
    assert listed_names("Translate Hello from English to French.") == []


def test_a_list_goes_on_while_a_listed_name_is_in_no_call(tiny_engine):
    """Asked about Paris and Rome, a model that would stop after Paris may not end the list there; once
    both are in calls (or when only one was asked about) it may."""
    compiler = GrammarCompiler(tiny_engine.tokenizer, vocab_size=tiny_engine.vocab_size)
    options = ChatOptions(tools=[WEATHER], tool_choice="required")

    def may_end_after(question: str, calls: list[str]) -> bool:
        messages = [{"role": "user", "content": question}]
        _, matcher = anyio.run(lambda: prepare_chat(tiny_engine, compiler, messages, options))
        for t in tiny_engine.tokenizer.encode("\n".join(calls), add_special_tokens=False):
            assert matcher.accept_token(t)
        mask = torch.zeros((1, (tiny_engine.vocab_size + 31) // 32), dtype=torch.int32)
        matcher.fill_next_token_bitmask(mask, 0)
        return any(mask[0, t // 32].item() >> (t % 32) & 1 for t in matcher.stop_token_ids)

    paris, rome = call("weather", city="Paris"), call("weather", city="Rome")
    assert not may_end_after("What is the weather in Paris and in Rome?", [paris])
    assert may_end_after("What is the weather in Paris and in Rome?", [paris, rome])
    assert may_end_after("What is the weather in Paris?", [paris])
    assert may_end_after("What is the weather in Paris and in Rome?", [call("weather", city="Paris and Rome")])
    route = {**WEATHER, "function": {**WEATHER["function"], "name": "route", "parameters": {
        "type": "object", "properties": {"start": {"type": "string"}, "end": {"type": "string"}}}}}
    options = ChatOptions(tools=[route], tool_choice="required")  # one call that takes two names is the list
    assert may_end_after("Plan a route from New York, USA and then to Miami.",
                         [call("route", start="New York", end="Miami")])
