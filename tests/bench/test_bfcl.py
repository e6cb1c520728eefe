"""The BFCL harness: the AST checker's rules on hand-made cases, calls read out of replies, the BFCL
data files, and one run of `agentrt bench bfcl` through the in-process server on tiny-random."""

from __future__ import annotations

import json

import pytest

from bench.bfcl import (
    DEFAULT_DATA,
    Case,
    calls_from_message,
    calls_from_text,
    categories,
    check_call,
    check_case,
    free_text_messages,
    load_cases,
    main,
    standardize,
    tools_of,
)

AREA = {"name": "geometry.area", "description": "Area of a triangle.", "parameters": {
    "type": "dict",
    "properties": {
        "base": {"type": "integer"}, "height": {"type": "float"}, "unit": {"type": "string"},
        "exact": {"type": "boolean"}, "tags": {"type": "array", "items": {"type": "string"}},
        "options": {"type": "dict", "properties": {"round": {"type": "integer"}, "style": {"type": "string"}}},
        "points": {"type": "array", "items": {"type": "dict"}},
        "note": {"type": "string"},  # declared, but the answer leaves no room for it
    },
    "required": ["base", "height"]}}
AREA_ANSWER = {"geometry.area": {
    "base": [10], "height": [5.0, 5.5], "unit": ["cm", ""], "exact": ["", True],
    "tags": [["Right angle", "small"], ""], "options": [{"round": [2], "style": ["", "short"]}, ""],
    "points": [[{"x": [0], "y": [0]}, {"x": [3], "y": [4]}], ""]}}
WEATHER = {"name": "weather", "parameters": {"type": "dict", "properties": {"city": {"type": "string"}},
                                              "required": ["city"]}}


def area(**args) -> dict:
    return {"name": "geometry.area", "arguments": {"base": 10, "height": 5.0, **args}}


def verdict(call: dict):
    return check_call(AREA, call, AREA_ANSWER)


# --- the checker, rule by rule -----------------------------------------------------------------


def test_a_right_call_passes():
    assert verdict(area(unit="cm", exact=True)).ok


def test_a_wrong_function_name_fails():
    v = verdict({"name": "geometry_area", "arguments": {"base": 10, "height": 5.0}})
    assert (v.ok, v.kind) == (False, "wrong_name")


def test_a_missing_required_parameter_fails():
    v = verdict({"name": "geometry.area", "arguments": {"base": 10}})
    assert (v.ok, v.kind, v.detail) == (False, "missing_required", "height")


@pytest.mark.parametrize("extra", [{"colour": "red"}, {"note": "hi"}])
def test_an_unknown_parameter_fails(extra):
    # unknown to the schema, or declared but absent from the answer: BFCL rejects both
    v = verdict(area(**extra))
    assert (v.ok, v.kind) == (False, "unexpected_param")


@pytest.mark.parametrize("args", [{"base": 11}, {"height": 6.0}, {"unit": "inches"}, {"exact": False}])
def test_a_value_outside_the_allowed_ones_fails(args):
    v = verdict(area(**args))
    assert (v.ok, v.kind) == (False, "wrong_value")


def test_strings_compare_without_case_spaces_or_punctuation():
    assert standardize("April 1, 2024") == standardize("april 1 2024") == standardize("April-1/2024.")
    assert verdict(area(unit="C.M.")).ok and verdict(area(unit=" Cm ")).ok
    assert not verdict(area(unit="c m s")).ok


def test_an_omissible_value_may_be_left_out_but_others_may_not():
    assert verdict(area()).ok  # unit, exact, tags, options, points all allow ""
    answer = {"geometry.area": {**AREA_ANSWER["geometry.area"], "unit": ["cm"]}}
    v = check_call(AREA, area(), answer)
    assert (v.ok, v.kind, v.detail) == (False, "missing_param", "unit")


def test_an_int_is_accepted_for_a_float_but_not_the_other_way():
    assert verdict(area(height=5)).ok
    assert verdict(area(height=5.5)).ok
    v = verdict({"name": "geometry.area", "arguments": {"base": 10.0, "height": 5.0}})
    assert (v.ok, v.kind) == (False, "wrong_type")
    assert verdict(area(exact=1)).kind == "wrong_type"  # a number is no boolean
    assert verdict({"name": "geometry.area", "arguments": {"base": True, "height": 5.0}}).kind == "wrong_type"


def test_list_values_compare_item_by_item_in_order():
    assert verdict(area(tags=["right-angle", "SMALL"])).ok
    assert not verdict(area(tags=["small", "right angle"])).ok
    assert not verdict(area(tags=["right angle"])).ok
    assert not verdict(area(tags=["right angle", 3])).ok


def test_dict_values_check_each_key():
    assert verdict(area(options={"round": 2, "style": "Short"})).ok
    assert verdict(area(options={"round": 2})).ok  # style is omissible
    assert not verdict(area(options={"style": "short"})).ok  # round is not
    assert not verdict(area(options={"round": 2, "colour": "red"})).ok
    assert not verdict(area(options={"round": 3})).ok


def test_lists_of_dicts_match_dict_by_dict():
    assert verdict(area(points=[{"x": 0, "y": 0}, {"x": 3, "y": 4}])).ok
    assert not verdict(area(points=[{"x": 3, "y": 4}, {"x": 0, "y": 0}])).ok
    assert not verdict(area(points=[{"x": 0, "y": 0}])).ok
    assert not verdict(area(points=["x=0, y=0", "x=3, y=4"])).ok


def test_a_variable_written_as_a_string_is_compared_as_written():
    # BFCL answers sometimes name a variable where the schema wants a number: a string is then fine
    fn = {"name": "f", "parameters": {"type": "dict", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}
    answer = {"f": {"n": ["count"]}}
    assert check_call(fn, {"name": "f", "arguments": {"n": "count"}}, answer).ok
    assert not check_call(fn, {"name": "f", "arguments": {"n": "Count"}}, answer).ok


def test_multi_call_categories_match_in_any_order_and_count_calls():
    calls = [{"name": "weather", "arguments": {"city": "Paris"}}, {"name": "weather", "arguments": {"city": "Rome"}}]
    answers = [{"weather": {"city": ["rome"]}}, {"weather": {"city": ["paris"]}}]
    assert check_case("parallel", [WEATHER], calls, answers).ok
    assert check_case("live_parallel_multiple", [WEATHER], calls[::-1], answers).ok
    assert check_case("parallel", [WEATHER], calls[:1], answers).kind == "wrong_count"
    assert check_case("parallel", [WEATHER], calls + calls[:1], answers).kind == "wrong_count"
    twice = [calls[0], calls[0]]  # each call answers one expected call, not two
    assert not check_case("parallel", [WEATHER], twice, answers).ok


def test_single_call_categories_want_exactly_one_matching_call():
    call = {"name": "weather", "arguments": {"city": "Paris"}}
    answers = [{"weather": {"city": ["Paris"]}}]
    assert check_case("simple_python", [WEATHER], [call], answers).ok
    assert check_case("simple_python", [WEATHER], [call, call], answers).kind == "wrong_count"
    # `multiple`: several functions offered, the answer's one is checked against its own description
    assert check_case("multiple", [AREA, WEATHER], [call], answers).ok
    assert check_case("multiple", [AREA, WEATHER], [area()], answers).kind == "wrong_name"
    assert check_case("simple_python", [WEATHER], None, answers).kind == "invalid"


# --- calls out of replies ----------------------------------------------------------------------


def test_calls_from_tool_call_blocks():
    text = ('<tool_call>{"name": "weather", "arguments": {"city": "Paris"}}</tool_call>\n'
            '<tool_call>{"name": "weather", "arguments": {"city": "Rome"}}</tool_call>')
    assert calls_from_text(text) == [{"name": "weather", "arguments": {"city": "Paris"}},
                                     {"name": "weather", "arguments": {"city": "Rome"}}]


@pytest.mark.parametrize("text", [
    '{"name": "weather", "arguments": {"city": "Paris"}}',
    'Sure [here]:\n```json\n{"name": "weather", "parameters": {"city": "Paris"}}\n```',
    '[{"name": "weather", "arguments": "{\\"city\\": \\"Paris\\"}"}]',
])
def test_calls_from_a_bare_json_object(text):
    assert calls_from_text(text) == [{"name": "weather", "arguments": {"city": "Paris"}}]


@pytest.mark.parametrize("text", [
    "The weather in Paris is sunny.",
    '<tool_call>{"name": "weather", "arguments": {"city": "Paris"}</tool_call>',  # a brace short
    '<tool_call>{"name": "weather", "arguments": {"city": "Paris"}}',  # never closed
    '<tool_call>{"name": "weather", "arguments": {"city": "Paris"}}</tool_call><tool_call>weather(Rome)</tool_call>',
    '{"city": "Paris"}',  # no function name
    '{"name": "weather", "arguments": ["Paris"]}',
])
def test_text_without_a_well_formed_call_is_invalid(text):
    assert calls_from_text(text) is None


def test_calls_from_an_openai_message():
    def message(*args: str) -> dict:
        return {"role": "assistant", "content": None, "tool_calls": [
            {"id": f"c{i}", "type": "function", "function": {"name": "weather", "arguments": a}}
            for i, a in enumerate(args)]}

    assert calls_from_message(message('{"city":"Paris"}')) == [{"name": "weather", "arguments": {"city": "Paris"}}]
    assert calls_from_message(message('{"city":"Paris"}', '{"city":"Ro')) is None  # cut by max_tokens
    assert calls_from_message(message("[1]")) is None
    assert calls_from_message({"role": "assistant", "content": "Paris"}) is None


# --- the data ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir():
    if not DEFAULT_DATA.is_dir():
        pytest.skip(f"{DEFAULT_DATA} is absent: the shared BFCL data sits beside the checkout (../shared/data/bfcl)")
    return DEFAULT_DATA


def _ground_truth_calls(answers: list[dict]) -> list[dict]:
    """Calls built from each answer's first allowed values, leaving omissible parameters out."""
    def first(values: list):
        value = next(v for v in values if v != "")
        if isinstance(value, dict):
            return {k: first(vs) for k, vs in value.items() if any(v != "" for v in vs)}
        if isinstance(value, list) and value and isinstance(value[0], dict):
            return [first([v]) for v in value]
        return value

    return [{"name": name, "arguments": {p: first(vs) for p, vs in params.items() if any(v != "" for v in vs)}}
            for answer in answers for name, params in answer.items()]


def test_the_shared_categories_load_with_their_answers(data_dir):
    assert {"simple_python", "multiple", "live_simple"} <= set(categories(data_dir))
    cases = load_cases(data_dir, "live_simple")
    assert len(cases) == 258 and len(load_cases(data_dir, "simple_python", 60)) == 60
    assert all(c.messages[-1]["role"] == "user" and c.functions and c.answers for c in cases)
    assert any(c.messages[0]["role"] == "system" for c in cases)


def test_the_checker_accepts_every_ground_truth(data_dir):
    checked = 0
    for category in categories(data_dir):
        for case in load_cases(data_dir, category):
            params = [vs for a in case.answers for p in a.values() for vs in p.values()]
            if any(vs == [] for vs in params):  # two live_simple answers allow no value at all for a parameter
                continue
            verdict = check_case(category, case.functions, _ground_truth_calls(case.answers), case.answers)
            assert verdict.ok, (case.id, verdict)
            checked += 1
    assert checked > 800


def test_every_bfcl_function_becomes_a_tool_call_grammar(data_dir):
    # BFCL's dict / float / tuple / any types are normalised by the grammar layer, not here
    from agentrt.grammar import ToolCalls

    for category in categories(data_dir):
        for case in load_cases(data_dir, category)[::4]:  # ~20 ms a build with the default argument caps
            ToolCalls(tools_of(case), "required").build()


def test_both_arms_see_the_same_prompt():
    from agentrt.chat import ChatOptions, build_prompt
    from agentrt.engine.models import load_tokenizer

    tok = load_tokenizer("tiny-random")
    for messages in ([{"role": "user", "content": "Weather in Paris?"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]):
        case = Case("x", "simple_python", messages, [WEATHER], [])
        constrained = build_prompt(tok, messages, ChatOptions(tools=tools_of(case), tool_choice="required"))
        assert build_prompt(tok, free_text_messages(case), ChatOptions()) == constrained
        assert messages[0]["content"] in ("Weather in Paris?", "Be brief.")  # the case is left as it was


# --- end to end ----------------------------------------------------------------------------------

THERMOSTAT = {"name": "thermostat.set", "description": "Set the thermostat mode.", "parameters": {
    "type": "dict", "properties": {"mode": {"type": "string", "enum": ["cool", "heat", "off"]}, "eco": {"type": "boolean"}},
    "required": ["mode"]}}
TIMER = {"name": "set_timer", "description": "Start a kitchen timer.", "parameters": {
    "type": "dict", "properties": {"minutes": {"type": "integer", "minimum": 1, "maximum": 120},
                                   "label": {"type": "string", "maxLength": 12}},
    "required": ["minutes"]}}


def _write(path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_run_through_the_server_on_tiny_random(tmp_path, capsys):
    # bounded schemas, so that even random weights finish their call within max_tokens
    (tmp_path / "possible_answer").mkdir()
    _write(tmp_path / "BFCL_v4_simple_python.json", [
        {"id": "simple_python_0", "question": [[{"role": "user", "content": "Turn the heating on."}]],
         "function": [THERMOSTAT]},
        {"id": "simple_python_1", "question": [[{"role": "user", "content": "Ten minutes for the eggs."}]],
         "function": [TIMER]}])
    _write(tmp_path / "possible_answer" / "BFCL_v4_simple_python.json", [
        {"id": "simple_python_0", "ground_truth": [{"thermostat.set": {"mode": ["heat"], "eco": ["", False]}}]},
        {"id": "simple_python_1", "ground_truth": [{"set_timer": {"minutes": [10], "label": ["eggs", ""]}}]}])
    _write(tmp_path / "BFCL_v4_multiple.json", [
        {"id": "multiple_0", "question": [[{"role": "system", "content": "You run a kitchen."},
                                           {"role": "user", "content": "A 5 minute timer."}]],
         "function": [THERMOSTAT, TIMER]}])
    _write(tmp_path / "possible_answer" / "BFCL_v4_multiple.json", [
        {"id": "multiple_0", "ground_truth": [{"set_timer": {"minutes": [5], "label": [""]}}]}])
    _write(tmp_path / "BFCL_v4_irrelevance.json", [])  # no answers: not a category
    assert categories(tmp_path) == ["multiple", "simple_python"]

    out = tmp_path / "out.json"
    assert main(["--model", "tiny-random", "--data", str(tmp_path), "--json", str(out), "--max-tokens", "64"]) == 0
    result = json.loads(out.read_text())
    assert result["model"] == "tiny-random"
    rows = {(r["category"], r["arm"]): r for r in result["rows"]}
    assert set(rows) == {(c, a) for c in ("multiple", "simple_python") for a in ("constrained", "unconstrained")}
    assert all(set(r) == {"category", "arm", "n", "correct", "invalid"} for r in rows.values())
    assert rows["simple_python", "constrained"]["n"] == 2 and rows["multiple", "constrained"]["n"] == 1
    assert rows["simple_python", "constrained"]["invalid"] == rows["multiple", "constrained"]["invalid"] == 0
    assert "constrained" in capsys.readouterr().out


def test_an_unknown_category_is_refused(tmp_path, capsys):
    assert main(["--data", str(tmp_path), "--category", "parallel"]) == 2
    assert "parallel" in capsys.readouterr().err


def test_dotted_names_travel_as_openai_names_and_score_as_the_originals():
    from bench.bfcl import Case, api_name, original_names, tools_of

    fn = {"name": "math.factorial", "parameters": {"type": "object", "properties": {"n": {"type": "integer"}}}}
    case = Case("c", "simple", [{"role": "user", "content": "5!"}], [fn], [{"math.factorial": {"n": [5]}}])
    assert [t["function"]["name"] for t in tools_of(case)] == ["math_factorial"] == [api_name("math.factorial")]
    calls = original_names(case, [{"name": "math_factorial", "arguments": {"n": 5}}, {"name": "other", "arguments": {}}])
    assert [c["name"] for c in calls] == ["math.factorial", "other"] and original_names(case, None) is None
