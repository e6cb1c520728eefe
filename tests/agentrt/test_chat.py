"""Splitting model text into content and tool calls, and building chat prompts with tools."""

from __future__ import annotations

import json
import random

import pytest

from agentrt.chat import ChatOptions, ToolCallStream, build_prompt, chat_constraint, tool_signature
from agentrt.grammar import ToolSpec
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
    assert "def lookup():" in text and "Find a fact" in text and "<tool_call>" in text
    assert '<tool_call>{"name": "lookup", "arguments": {"q": "x"}}</tool_call>' in text
    assert "<tool_response>\n42\n</tool_response>" in text
    no_tools = tok.decode(build_prompt(tok, msgs[:1], ChatOptions(tools=tools, tool_choice="none")))
    assert "lookup" not in no_tools


def test_tools_are_described_as_python_signatures():
    spec = ToolSpec.parse({"name": "weather", "description": "Current weather.", "parameters": {
        "type": "dict", "required": ["city"], "properties": {
            "city": {"type": "string", "description": "A city."},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
            "days": {"type": "integer"}, "ratio": {"type": "float"}, "tags": {"type": "array"}}}})
    text = tool_signature(spec)
    head, doc = text.split("\n", 1)
    # schema order kept (the grammar writes arguments in that order); optional ones show their default
    assert head == ('def weather(city: str, unit: "celsius" | "fahrenheit" = "celsius", days: int = None, '
                    'ratio: float = None, tags: list = None):')
    assert doc.splitlines() == ['    """Current weather.', "    city: A city.", '    """']
    assert "{" not in text  # no JSON listing whose shape a model could copy into its calls


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
    obj = chat_constraint(ChatOptions(response_format={"type": "json_object"}))  # an object, with the caps
    assert isinstance(obj, grammar.JsonSchema) and obj.schema == {"type": "object"}
    with pytest.raises(InvalidRequestError):
        chat_constraint(ChatOptions(response_format={"type": "xml"}))


BARE = [  # the forms Qwen2.5's chat template teaches, written without the tags
    ('{"name": "add", "arguments": {"a": 5, "b": -3}}', [("add", {"a": 5, "b": -3})]),
    ('```json\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n```', [("add", {"a": 1, "b": 2})]),
    ('[{"name": "f", "arguments": {}}, {"name": "g", "arguments": "{\\"x\\": 1}"}]', [("f", {}), ("g", {"x": 1})]),
    ('{"name": "f", "arguments": {"x": 1}}\n{"name": "g", "arguments": {}}', [("f", {"x": 1}), ("g", {})]),
]


@pytest.mark.parametrize("text, calls", BARE)
def test_bare_json_calls_are_calls_when_tools_were_offered(text, calls):
    for cut in (1, 5, len(text) // 2):
        s = ToolCallStream(bare=True)
        events = [e for c in (text[:cut], text[cut:]) for e in s.push(c)] + s.finish()
        assert [(c.name, json.loads(c.arguments)) for c in s.calls] == calls and s.content == ""
        assert [e.name for e in events if e.kind == "call_start"] == [n for n, _ in calls]
        assert not [e for e in events if e.kind == "content"]
    plain = ToolCallStream()  # no tools offered (a JSON reply): content as written
    plain.push(text)
    plain.finish()
    assert not plain.calls and plain.content == text.strip()


@pytest.mark.parametrize("text", ['{"name": "f"}', '{"a": 1}', "The answer is 4.", '{"name": "f", "arguments": 3}',
                                  '{"name": "f", "arguments": {}} and more'])
def test_text_that_is_not_only_calls_stays_content(text):
    s = ToolCallStream(bare=True)
    events = s.push(text) + s.finish()
    assert not s.calls and s.content == text == "".join(e.text for e in events)


def test_a_bare_repeat_of_an_earlier_call_is_dropped():
    s = ToolCallStream([("add", {"a": 1})], bare=True)
    s.push('{"name": "add", "arguments": {"a": 1}}\n{"name": "add", "arguments": {"a": 2}}')
    s.finish()
    assert [json.loads(c.arguments) for c in s.calls] == [{"a": 2}] and s.refused == 1


@pytest.mark.parametrize("description, good, bad", [
    ("The location, in the format of 'City, State (abbr)', such as 'Berkeley, CA'.", ["Riga, Latvia"],
     ["Riga", "Riga,Latvia", "Riga, Latvia, Can you"]),
    ("Pickup point in the format of 'Street Address, City, State'.", ["1 Main St, Berkeley, CA"], ["Berkeley, CA"]),
    ("The day, in the format 'YYYY-MM-DD'.", ["2023-04-05"], ["April 5", "2023-4-5"]),
    ("Departure. Format: dd/mm/yyyy HH:MM.", ["15/03/2024 18:45"], ["15/03/2024"]),
    ("Where to go, in the format of 'City, State' or 'Airport Code'.", ["JFK", "Boston, MA"], []),  # one is free
    ("The person, in the format 'First Last'.", ["Karan"], []),
])
def test_a_stated_format_shapes_the_argument(tiny_parts, description, good, bad):
    """A string parameter whose description states its layout is decoded in that layout (a small model
    wrote "Riga" for a 'City, State' location); a layout it cannot read leaves the value free."""
    from agentrt.grammar import GrammarCompiler, Matcher

    tokenizer = tiny_parts[1]
    tool = {"name": "f", "parameters": {"type": "object", "properties": {
        "where": {"type": "string", "description": description}}, "required": ["where"]}}
    options = ChatOptions(tools=[tool], tool_choice="required", schema_options={"max_string_length": None})  # compiles faster
    compiled = GrammarCompiler(tokenizer).compile(chat_constraint(options, **options.schema_options))

    def accepts(value: str) -> bool:
        m = Matcher(compiled)
        text = '<tool_call>{"name": "f", "arguments": ' + json.dumps({"where": value}) + "}</tool_call>"
        return m.accept_string(text) and m.is_completed()

    assert all(accepts(v) for v in good) and not any(accepts(v) for v in bad)
