from __future__ import annotations

import pytest

from agentrt.errors import PlanError
from agentrt.planner import (
    PlanParser,
    Ref,
    ReferenceResolutionError,
    Template,
    parse_plan,
    parse_joiner,
    plan_lark,
    resolve,
    stream_tasks,
    validate_task,
)
from agentrt.tools import calculator

PLAN = """Thought: look both up, then compare
1. search({"query": "capital of France"})
2. search({"query": "capital of Spain", "k": 3})
Thought: combine
3. combine({"a": $1.items[0], "b": "$2", "both": [$1, "$2.items[1]"], "note": "from $1 and $2.name!", "n": null, "t": true, "x": -1.5e3})
4. join()
"""


def test_whole_plan() -> None:
    plan = parse_plan(PLAN, tools={"search", "combine"})
    assert plan.joined and [t.id for t in plan.tasks] == [1, 2, 3]
    assert plan.thoughts == ["look both up, then compare", "combine"]
    t1, t2, t3 = plan.tasks
    assert t1.args == {"query": "capital of France"} and t1.deps == frozenset() and t1.thought.startswith("look")
    assert t2.args == {"query": "capital of Spain", "k": 3}
    assert t3.deps == {1, 2} and t3.thought == "combine"
    assert t3.args["a"] == Ref(1, ("items", 0))
    assert t3.args["b"] == Ref(2)  # a whole-string reference is a structured reference
    assert t3.args["both"] == [Ref(1), Ref(2, ("items", 1))]
    assert t3.args["note"] == Template(("from ", Ref(1), " and ", Ref(2, ("name",)), "!"))
    assert (t3.args["n"], t3.args["t"], t3.args["x"]) == (None, True, -1500.0)
    assert t3.to_json()["args"]["both"] == ["$1", "$2.items[1]"]
    assert t3.to_json()["deps"] == [1, 2]


def test_streaming_emits_each_task_when_its_line_completes() -> None:
    parser = PlanParser()
    emitted: list[tuple[int, int]] = []  # (task id, chars fed so far)
    for i, ch in enumerate(PLAN):
        for task in parser.feed(ch):
            emitted.append((task.id, i))
    assert [tid for tid, _ in emitted] == [1, 2, 3]
    # each task comes out exactly at the newline that ends its line, not later
    newlines = [i for i, ch in enumerate(PLAN) if ch == "\n"]
    assert [pos for _, pos in emitted] == [newlines[1], newlines[2], newlines[4]]
    assert parser.joined and parser.close() == []


def test_multiline_json_args_and_final_line_without_newline() -> None:
    plan = parse_plan('1. f({\n  "a": [1,\n 2],\n "b": "x"\n})\n2. f({"a": $1})')
    assert [t.args for t in plan.tasks] == [{"a": [1, 2], "b": "x"}, {"a": Ref(1)}]
    assert not plan.joined


def test_thought_lines_may_hold_brackets_and_quotes() -> None:
    plan = parse_plan('Thought: a [b ( "c {\n1. f({})\nThought: )]}"\n2. join()')
    assert plan.thoughts == ['a [b ( "c {', ')]}"'] and [t.id for t in plan.tasks] == [1] and plan.joined


def test_escaped_dollar_is_not_a_reference() -> None:
    (task,) = parse_plan('1. f({"price": "\\u00241 and \\\\$ only"})').tasks
    assert task.args == {"price": "$1 and \\$ only"} and task.deps == frozenset()


@pytest.mark.parametrize(
    "text, message",
    [
        ('1. f({"a": $2})\n2. f({})', "only point to earlier tasks"),
        ('1. f({"a": $1})', "only point to earlier tasks"),
        ('1. f({})\n2. f({"a": [{"b": "$7.x"}]})', "earlier tasks"),
        ('1. f({"a": $0})', "unknown task"),
        ("2. f({})", "expected 1"),
        ("1. f({})\n3. f({})", "expected 2"),
        ("1. nope({})", "unknown tool 'nope'"),
        ('1. f({"a": })', "not a plan line"),
        ("1. f({'a': 1})", "not a plan line"),
        ("hello there", "not a plan line"),
        ("1. f({})\n2. join()\n3. f({})", "nothing may follow join()"),
        ("1. f({})\n5. join()", "join() is numbered 5"),
        ('1. f({"a": "\\x"})', "not a plan line"),
    ],
)
def test_invalid_plans_are_rejected_with_the_line(text: str, message: str) -> None:
    with pytest.raises(PlanError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        parse_plan(text, tools={"f"})
    assert info.value.line


def test_continued_numbering_and_known_ids() -> None:
    plan = parse_plan('4. f({"a": $2})\n5. f({"b": $4.x})', first_id=4, known_ids={1, 2})
    assert [t.deps for t in plan.tasks] == [{2}, {4}]
    with pytest.raises(PlanError, match="unknown task"):
        parse_plan('4. f({"a": $3})', first_id=4, known_ids={1, 2})  # 3 failed: not referable


def test_dta_round_forbids_references_within_the_round() -> None:
    parse_plan('3. f({"a": $1})\n4. f({"a": $2})', first_id=3, known_ids={1, 2}, refs_within_plan=False)
    with pytest.raises(PlanError, match="not allowed here"):
        parse_plan('3. f({})\n4. f({"a": $3})', first_id=3, known_ids={1, 2}, refs_within_plan=False)


@pytest.mark.anyio
async def test_stream_tasks_over_async_chunks() -> None:
    async def chunks():
        for i in range(0, len(PLAN), 7):
            yield PLAN[i : i + 7]
        yield "garbage that is never read"

    tasks = [t async for t in stream_tasks(chunks(), PlanParser())]
    assert [t.id for t in tasks] == [1, 2, 3]


def test_resolve_structured_values() -> None:
    results = {1: {"items": ["Paris", "Lyon"], "n": 2}, 2: "Madrid"}
    args = {"a": Ref(1, ("items", 0)), "b": [Ref(2)], "c": Template(("n=", Ref(1, ("n",)))), "d": Ref(1)}
    assert resolve(args, results) == {"a": "Paris", "b": ["Madrid"], "c": "n=2", "d": results[1]}
    with pytest.raises(ReferenceResolutionError, match=r"index \[5\] out of range"):
        resolve(Ref(1, ("items", 5)), results)
    with pytest.raises(ReferenceResolutionError, match="no key 'x'"):
        resolve(Ref(1, ("x",)), results)
    with pytest.raises(ReferenceResolutionError, match="has no result"):
        resolve(Ref(9), results)


def test_validate_task_ignores_reference_positions_only() -> None:
    plan = parse_plan('1. calculator({"expression": $0})\n2. calculator({"expression": 5})\n'
                      '3. calculator({})\n4. calculator({"expression": "1", "x": $1})', known_ids={0})
    problems = [validate_task(t, calculator) for t in plan.tasks]
    assert problems[0] == [] and problems[1] == []  # numbers are accepted as strings
    assert "Field required" in problems[2][0]
    assert "Extra inputs" in problems[3][0]


def test_joiner_language() -> None:
    assert parse_joiner("Finish(Paris is bigger (by far))").text == "Paris is bigger (by far)"
    d = parse_joiner("Thought: not enough\nReplan(need Spain's population)")
    assert (d.action, d.text, d.thought) == ("replan", "need Spain's population", "not enough")
    with pytest.raises(PlanError):
        parse_joiner("The answer is 4")


def test_lark_file_is_packaged() -> None:
    assert "join" in plan_lark()
