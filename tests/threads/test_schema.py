"""The tree schema as a grammar: what it lets a model write, and what it refuses."""

from __future__ import annotations

import json

import jsonschema
import pytest

from agentrt.errors import GrammarError, InvalidRequestError
from agentrt.grammar import Ebnf
from agentrt.threads import TREE_SEPARATORS, ThreadSchema
from agentrt.tools import tool


@tool
def lookup(key: str, limit: int = 3) -> dict:
    """Look a key up.

    Args:
        key: What to look up.
        limit: How many hits.
    """
    return {"key": key}


def task(thought="t", tooluse=None, subtasks=None, conclusion="c") -> dict:
    return {"thought": thought, "tooluse": tooluse, "subtasks": subtasks, "conclusion": conclusion}


CALC = {"tool_name": "add", "parameters": {"a": 40, "b": 2}, "tool_result": 42}
TREE = {"reasoning": [task("add", CALC, [task("a", subtasks=[task("deep")]), task("b")], "42")],
        "answer": "42"}


def dump(tree) -> str:
    return json.dumps(tree, separators=TREE_SEPARATORS, ensure_ascii=False)


def accepted(compiler, constraint, text: str) -> bool:
    m = compiler.compile(constraint).matcher()
    return m.accept_string(text) and m.is_completed()


def test_a_tree_with_nested_subtasks_and_a_tool_call_is_accepted_and_validates(tiny_backend, add):
    schema = ThreadSchema([add, lookup])
    assert accepted(tiny_backend.compiler, schema, dump(TREE))
    jsonschema.validate(TREE, schema.json_schema())


@pytest.mark.parametrize("change", ["order", "tool", "params", "depth", "extra", "empty"])
def test_what_the_grammar_refuses(tiny_backend, change, add):
    schema = ThreadSchema([add, lookup], max_depth=3)
    tree = json.loads(json.dumps(TREE))
    top = tree["reasoning"][0]
    if change == "order":  # the keys come in TIM's order
        tree["reasoning"][0] = {"conclusion": "c", **{k: v for k, v in top.items() if k != "conclusion"}}
    elif change == "tool":  # only registered tools
        top["tooluse"]["tool_name"] = "shell"
    elif change == "params":  # the named tool's parameter schema
        top["tooluse"]["parameters"] = {"a": 1}
    elif change == "depth":  # nothing below max_depth
        top["subtasks"][0]["subtasks"][0]["subtasks"] = [task()]
    elif change == "extra":
        top["note"] = "x"
    else:
        top["subtasks"] = []
    assert not accepted(tiny_backend.compiler, schema, dump(tree))
    if change != "order":  # JSON schema has no property order
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(tree, schema.json_schema())


def test_answer_schema_and_require_tool(tiny_backend, add):
    schema = ThreadSchema([add], answer_schema={"type": "object", "properties": {"n": {"type": "integer"}},
                                                       "required": ["n"]}, require_tool=True)
    tree = {**TREE, "answer": {"n": 42}}
    assert accepted(tiny_backend.compiler, schema, dump(tree))
    assert not accepted(tiny_backend.compiler, schema, dump(TREE))  # a string answer
    no_tool = {"reasoning": [task(), task(tooluse=CALC)], "answer": {"n": 1}}
    assert not accepted(tiny_backend.compiler, schema, dump(no_tool))  # the first task must call a tool
    assert accepted(tiny_backend.compiler, ThreadSchema([add]), dump({**no_tool, "answer": "1"}))


def test_a_tool_result_of_any_json_is_accepted_uncapped(tiny_backend, add):
    schema = ThreadSchema([add], max_text_chars=4)
    result = {"error": "ValueError: " + "x" * 300, "nested": [1.5e-7, None, True, "é\n"]}
    tree = {"reasoning": [task("ab", {**CALC, "tool_result": result}, None, "cd")], "answer": "ok"}
    assert accepted(tiny_backend.compiler, schema, dump(tree))
    assert schema.render_result(result) in dump(tree)
    too_long = {"reasoning": [task("abcde")], "answer": "ok"}
    assert not accepted(tiny_backend.compiler, schema, dump(too_long))


def test_resume_at_accepts_the_rest_of_a_tree_after_a_tool_result(tiny_backend, add):
    schema = ThreadSchema([add])
    text = dump({"reasoning": [task("a", subtasks=[task("b", CALC)])], "answer": "x"})
    rest = text[text.index('"tool_result": 42') + len('"tool_result": 42'):]
    assert accepted(tiny_backend.compiler, Ebnf(schema.ebnf(resume_at=(0, 0))[0]), rest)
    assert not accepted(tiny_backend.compiler, Ebnf(schema.ebnf(resume_at=(0,))[0]), rest)
    text = dump({"reasoning": [task("a", subtasks=[task("b", CALC), task("c")])], "answer": "x"})
    rest = text[text.index('"tool_result": 42') + len('"tool_result": 42'):]  # it adds a second subtask
    capped = ThreadSchema([add], max_items=2)
    assert accepted(tiny_backend.compiler, Ebnf(capped.ebnf(resume_at=(0, 0))[0]), rest)
    assert not accepted(tiny_backend.compiler, Ebnf(capped.ebnf(resume_at=(0, 1))[0]), rest)  # a third


def test_max_items_bounds_every_list(tiny_backend, add):
    schema = ThreadSchema([add], max_items=2)
    assert accepted(tiny_backend.compiler, schema, dump(TREE))
    three = {"reasoning": [task(), task(), task()], "answer": "x"}
    assert not accepted(tiny_backend.compiler, schema, dump(three))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(three, schema.json_schema())


def test_bad_options_are_clear_errors(add):
    with pytest.raises(GrammarError, match="answer schema") as err:
        ThreadSchema([add], answer_schema={"type": "bogus"}).ebnf()
    assert err.value.param == "answer_schema"
    with pytest.raises(InvalidRequestError) as err:
        ThreadSchema([add], max_depth=0)
    assert err.value.param == "max_depth"
    with pytest.raises(InvalidRequestError, match="at least one tool"):
        ThreadSchema([], require_tool=True)
