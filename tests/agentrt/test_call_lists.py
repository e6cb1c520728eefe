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

    assert listed_names("What is the weather in Paris and in Rome?") == [["Paris"], ["Rome"]]
    assert listed_names("How many people live in Tokyo, and how many in Cairo?") == [["Tokyo"], ["Cairo"]]
    assert listed_names("Find the population of Tokyo, Delhi or Shanghai.") == [["Tokyo"], ["Delhi"], ["Shanghai"]]
    assert listed_names("Add 3 and 4, and also add 10 and 20.") == [["3"], ["4"], ["10"], ["20"]]
    assert listed_names("Get the price of IBM and add $1,200 and 30.") == [["IBM"], ["1200"], ["30"]]
    assert listed_names("Im at Riga, Latvia, Can you tell me the temperature?") == [["Riga, Latvia"]]  # one place
    assert listed_names("What is the area of a circle of radius 5 in Python?") == [["5", "Python"]]  # one part
    assert listed_names("Paris is nice. It has 10% more.") == []  # sentence openers, a percentage


def test_a_list_goes_on_while_a_listed_name_is_in_no_call(tiny_engine):
    """Asked about Paris and Rome, a model that would stop after Paris may not end the list there; once
    both are in calls (or when only one was asked about) it may."""

    def may_end_after(question: str, calls: list[str], tools=(WEATHER,)) -> bool:
        matcher = _matcher(tiny_engine, question, list(tools))
        return bool(set(matcher.stop_token_ids) & _allowed(tiny_engine, matcher, "\n".join(calls)))

    paris, rome = call("weather", city="Paris"), call("weather", city="Rome")
    assert not may_end_after("What is the weather in Paris and in Rome?", [paris])
    assert may_end_after("What is the weather in Paris and in Rome?", [paris, rome])
    assert may_end_after("What is the weather in Paris?", [paris])
    assert may_end_after("What is the weather in Paris and in Rome?", [call("weather", city="Paris and Rome")])
    route = {**WEATHER, "function": {**WEATHER["function"], "name": "route", "parameters": {
        "type": "object", "properties": {"start": {"type": "string"}, "end": {"type": "string"}}}}}
    # one call that takes two names is the list
    assert may_end_after("Plan a route from New York, USA and then to Miami.",
                         [call("route", start="New York", end="Miami")], tools=[route])


def _matcher(engine, question: str, tools: list[dict]):
    compiler = GrammarCompiler(engine.tokenizer, vocab_size=engine.vocab_size)
    messages = [{"role": "user", "content": question}]
    _, matcher = anyio.run(lambda: prepare_chat(engine, compiler, messages, ChatOptions(tools=tools, tool_choice="required")))
    return matcher


def _allowed(engine, matcher, text: str) -> set[int]:
    """The tokens `matcher` allows after `text` (from its start)."""
    matcher.reset()
    for t in engine.tokenizer.encode(text, add_special_tokens=False):
        assert matcher.accept_token(t)
    mask = torch.zeros((1, (engine.vocab_size + 31) // 32), dtype=torch.int32)
    matcher.fill_next_token_bitmask(mask, 0)
    return {t for t in range(engine.vocab_size) if mask[0, t // 32].item() >> (t % 32) & 1}


def test_a_list_goes_on_for_the_parts_no_call_took_yet(tiny_engine):
    """"Add 3 and 4, and also add 10 and 20": after add(3, 4) the list may not end, and the next call's
    numbers may not start as 3 or 4 (a weak model repeats its first call); after add(10, 20) it may end."""
    matcher = _matcher(tiny_engine, "Add 3 and 4, and also add 10 and 20.", [ADD, MUL])
    tok = tiny_engine.tokenizer

    def allowed(text: str) -> set[int]:
        return _allowed(tiny_engine, matcher, text)

    first, second = call("add", a=3, b=4), call("add", a=10, b=20)
    opening = call("add", a=1, b=2).split('"a": ')[0] + '"a": '
    assert not set(matcher.stop_token_ids) & allowed(first)
    opened = allowed(first + "\n" + opening)
    digit = {d: tok.convert_tokens_to_ids(d) for d in "1234"}
    assert digit["3"] not in opened and digit["4"] not in opened and digit["1"] in opened
    assert set(matcher.stop_token_ids) & allowed(first + "\n" + second)
    # after a call that took no part of the request nothing is steered: a value may start as 3
    assert digit["3"] in allowed(call("mul", a=7, b=8) + "\n" + opening)


def test_a_value_begun_as_a_name_of_the_request_is_written_to_its_end(tiny_engine):
    """A value that has begun as one of the request's names or numbers goes on as it: "Mariposa, CA",
    not "Maraposi" or "Mariposa" alone; 200000 for "$200,000", not 200."""
    where = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {
        "location": {"type": "string"}, "cost": {"type": "number"}}, "required": ["location", "cost"]}}}
    matcher = _matcher(tiny_engine, "Weather at Mariposa, CA, for $200,000?", [where])
    tok = tiny_engine.tokenizer
    head = '<tool_call>{"name": "weather", "arguments": {"location": "'
    texts = {i: tok.decode([i]) for i in _allowed(tiny_engine, matcher, head + "Mari")}
    assert texts and all(("posa, ca" + '"').startswith(t.lower()) or t.lower().startswith("posa, ca") for t in texts.values())
    assert tok.convert_tokens_to_ids('"') not in _allowed(tiny_engine, matcher, head + "Mariposa")
    number = _allowed(tiny_engine, matcher, head + 'Mariposa, CA", "cost": 200')
    assert tok.convert_tokens_to_ids("}") not in number and tok.convert_tokens_to_ids("0") in number
    free = _allowed(tiny_engine, matcher, head + "Lon")  # a name the request does not write is free
    assert tok.convert_tokens_to_ids('"') in free


def test_a_value_in_a_stated_format_still_closes_near_the_budget(tiny_engine):
    """A 'City, State' value that a model never gives its comma is steered to one near max_tokens, so the
    call ends complete instead of being cut inside the string."""
    tool = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {
        "location": {"type": "string", "description": "The place, in the format of 'City, State'."}},
        "required": ["location"]}}}
    script = '<tool_call>{"name": "weather", "arguments": {"location": "' + "Tel Aviv " * 80
    result, _ = chat(tiny_engine, ChatOptions(tools=[tool], tool_choice="required"), script, max_tokens=60)
    assert not result.incomplete and [c.complete for c in result.tool_calls] == [True]
    assert ", " in json.loads(result.tool_calls[0].arguments)["location"]
