"""Every constraint kind accepts what it should and rejects what it should, token by token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import BaseModel

from agentrt.errors import GrammarError, InvalidRequestError
from agentrt.grammar import (
    Choice,
    Ebnf,
    Json,
    JsonSchema,
    Lark,
    Regex,
    ToolCalls,
    parse_tool_calls,
    render_tool_call,
)

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "tags": {}},
    "required": ["name"],
}


def test_json_schema_accepts_compact_instances_and_rejects_others(accepts):
    c = JsonSchema(PERSON)
    assert accepts(c, '{"name":"Ann","age":31}')
    assert accepts(c, '{"name":"Ann","tags":[1,{"a":"b"}]}')  # untyped value is compact too
    assert not accepts(c, '{"name": "Ann"}')  # no free whitespace by default
    assert not accepts(c, '{"name":"Ann","tags":[1, 2]}')
    assert not accepts(c, '{"age":31}')  # required
    assert not accepts(c, '{"name":"Ann","extra":1}')  # only declared properties by default
    assert not accepts(c, '{"name":"Ann"', complete=True)


def test_json_schema_from_text_and_pydantic(accepts):
    class Point(BaseModel):
        x: int
        y: float

    assert accepts(JsonSchema(Point), '{"x":1,"y":2.5}')
    assert not accepts(JsonSchema(Point), '{"x":1.5,"y":2}')
    assert accepts(JsonSchema(json.dumps(PERSON)), '{"name":"x"}')
    with pytest.raises(GrammarError):
        JsonSchema("{not json")


def test_bounded_whitespace_and_custom_separators(accepts):
    loose = JsonSchema(PERSON, max_whitespace=2)
    assert accepts(loose, '{ "name" : "Ann" }')
    assert not accepts(loose, '{"name":   "Ann"}')  # three in a row
    spaced = JsonSchema(PERSON, separators=(", ", ": "))
    assert accepts(spaced, '{"name": "Ann", "age": 3}')
    assert not accepts(spaced, '{"name":"Ann"}')


def test_objects_and_arrays_that_declare_nothing_stay_open(accepts):
    assert accepts(JsonSchema({"type": "object"}), '{"any":[1,"x"]}')
    assert accepts(JsonSchema({"type": "array"}), '[1,"x",{}]')
    assert accepts(JsonSchema({"type": "dict"}), "{}")


def test_allow_undeclared_follows_json_schema_default(accepts):
    assert accepts(JsonSchema(PERSON, allow_undeclared=True), '{"name":"Ann","extra":[1]}')
    closed = dict(PERSON, additionalProperties=False)
    assert not accepts(JsonSchema(closed, allow_undeclared=True), '{"name":"Ann","extra":1}')


def test_length_caps_bound_strings_and_numbers(accepts):
    c = JsonSchema(PERSON, max_string_length=5, max_number_digits=3)
    assert accepts(c, '{"name":"abcde","age":123}')
    assert accepts(c, '{"name":"a\\"b"}')  # escapes still allowed under the cap
    assert not accepts(c, '{"name":"abcdef"}')
    assert not accepts(c, '{"name":"a","age":1234}')
    assert not accepts(c, '{"name":"a","tags":12345}')  # untyped numbers too
    assert not accepts(c, '{"name":"a","tags":["abcdef"]}')
    floats = JsonSchema({"type": "number"}, max_number_digits=2)
    assert accepts(floats, "12.25")
    assert not accepts(floats, "1.125")
    with pytest.raises(GrammarError):
        JsonSchema(PERSON, max_string_length=0)


def test_json_any_value(accepts):
    assert accepts(Json(), '[1,{"a":null,"b":true}]')
    assert accepts(Json(), '"just a string"')
    assert not accepts(Json(), "{'a':1}")
    assert not accepts(Json(), '{"a":1,}')


def test_regex(accepts):
    c = Regex(r"[a-z]+@[a-z]+\.(com|org)")
    assert accepts(c, "ann@example.org")
    assert not accepts(c, "ann@example.net")
    with pytest.raises(GrammarError):
        Regex("(unclosed").build()


def test_ebnf_text_and_file(accepts, tmp_path):
    grammar = 'root ::= "x=" num\nnum ::= [0-9]+\n'
    assert accepts(Ebnf(grammar), "x=42")
    assert not accepts(Ebnf(grammar), "x=4a")
    path = tmp_path / "g.ebnf"
    path.write_text(grammar)
    assert accepts(Ebnf(path), "x=7")
    with pytest.raises(GrammarError):
        Ebnf("root ::= undefined_rule").build()


def test_lark_text_file_and_priorities(accepts, tmp_path):
    text = 'start: "call " NAME ("," NAME)*\nNAME.2: /[a-z]+/\n'
    assert accepts(Lark(text), "call ab,cd")  # the priority `.2` is dropped, the language kept
    assert not accepts(Lark(text), "call AB")
    path = tmp_path / "plan.lark"
    path.write_text('%import common.NUMBER\nstart: "n=" NUMBER\n')
    assert accepts(Lark(str(path)), "n=3.5")
    with pytest.raises(GrammarError, match="template"):
        Lark('start: _sep{"a", ","}\n_sep{x, sep}: x (sep x)*').build()
    with pytest.raises(GrammarError):
        Lark(tmp_path / "missing.lark")


def test_lark_start_rule_and_the_planner_grammar(accepts):
    plan_lark = Path(__file__).parents[2] / "planner" / "plan.lark"
    if not plan_lark.exists():
        pytest.skip(f"{plan_lark} not found")
    plan = Lark(plan_lark, start="plan")
    assert accepts(plan, 'Thought: look it up\n1. search({"q":"x"})\n2. join()\n')
    assert not accepts(plan, "1. search(oops)\n")
    with pytest.raises(GrammarError, match="defines `start`"):
        Lark('start: "a"', start="other").build()


def test_choice(accepts):
    c = Choice(["yes", "no", 'say "hi"'])
    assert accepts(c, "no")
    assert accepts(c, 'say "hi"')
    assert not accepts(c, "nope")
    assert not accepts(c, "n", complete=True)
    with pytest.raises(GrammarError):
        Choice([])


WEATHER = {
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {
        "type": "dict",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"],
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}
CALL = render_tool_call("get_weather", {"city": "Paris", "days": 2})
TIME_CALL = render_tool_call("get_time", {})


def test_render_tool_call_format():
    assert CALL == '<tool_call>{"name":"get_weather","arguments":{"city":"Paris","days":2}}</tool_call>'


def test_tool_calls_auto_allows_text_and_constrains_calls(accepts):
    c = ToolCalls([WEATHER, TIME])
    assert accepts(c, "The answer is 4.")
    assert accepts(c, f"Let me check. {CALL}\n{TIME_CALL}")
    assert not accepts(c, '<tool_call>{"name":"get_weather","arguments":{"days":2}}</tool_call>')  # city
    assert not accepts(c, '<tool_call>{"name":"unknown","arguments":{}}</tool_call>')
    assert not accepts(c, '<tool_call>{"name":"get_weather","arguments":{"city":3}}</tool_call>')


def test_tool_calls_required_named_none_and_parallel(accepts):
    required = ToolCalls([WEATHER, TIME], "required")
    assert accepts(required, CALL)
    assert accepts(required, f"{CALL}\n{TIME_CALL}")
    assert not accepts(required, "No tools needed.")
    assert not accepts(required, f"Sure: {CALL}")
    named = ToolCalls([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}})
    assert accepts(named, TIME_CALL)
    assert not accepts(named, CALL)
    assert accepts(ToolCalls([WEATHER, TIME], {"name": "get_weather"}), CALL)
    single = ToolCalls([WEATHER, TIME], "required", parallel=False)
    assert accepts(single, CALL)
    assert not accepts(single, f"{CALL}\n{TIME_CALL}")
    auto_single = ToolCalls([WEATHER], parallel=False)
    assert accepts(auto_single, f"ok {CALL}")
    assert not accepts(auto_single, f"ok {CALL} {CALL}")
    none = ToolCalls([WEATHER], "none")
    assert accepts(none, "Plain answer.")
    assert not accepts(none, f"x {CALL}")


def test_tool_calls_bad_input_is_an_invalid_request():
    with pytest.raises(InvalidRequestError, match="not among the tools"):
        ToolCalls([WEATHER], {"name": "nope"})
    with pytest.raises(GrammarError, match="tool_choice"):
        ToolCalls([WEATHER], "sometimes")
    with pytest.raises(GrammarError, match="duplicate"):
        ToolCalls([WEATHER, WEATHER])
    with pytest.raises(GrammarError, match="at least one tool"):
        ToolCalls([], "required")
    with pytest.raises(GrammarError, match="invalid tool"):
        ToolCalls([{"description": "no name"}])


def test_parse_tool_calls_round_trips_rendered_calls():
    text, calls = parse_tool_calls(f"Checking. {CALL}\n{TIME_CALL}")
    assert text == "Checking."
    assert calls == [
        {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}},
        {"name": "get_time", "arguments": {}},
    ]
    text, calls = parse_tool_calls("<tool_call>{broken</tool_call>")
    assert calls == [] and "broken" in text


def test_constraint_keys_distinguish_options():
    assert JsonSchema(PERSON).key == JsonSchema(dict(PERSON)).key
    assert JsonSchema(PERSON).key != JsonSchema(PERSON, max_string_length=10).key
    assert ToolCalls([WEATHER]).key != ToolCalls([WEATHER], "required").key
    assert Regex("a").key != Choice(["a"]).key
