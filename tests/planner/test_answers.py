"""Answers by reference (`Finish($3)` is task 3's value, put in by the runtime) and arguments grounded
in the question (a parameter whose docstring says so takes only a phrase of the question)."""

from __future__ import annotations

import anyio
import xgrammar as xgr

from agentrt.planner import GrammarLimits, plan_grammar, run_plan
from agentrt.planner._ground import ground_tools, question_phrases, uncovered_phrases
from agentrt.planner._prompts import tool_examples
from agentrt.planner._joiner import resolve_answer
from agentrt.tools import ToolRegistry, calculator, tool


@tool
def population(city: str) -> int:
    """Number of people living in a city.

    Args:
        city: A city named in the question.
    """
    return {"Lyon": 522250, "Porto": 231800, "Oslo": 709000}.get(city, 0)


@tool
def search(query: str) -> str:
    """Search the web.

    Args:
        query: What to search for.
    """
    return query


def test_references_in_an_answer_become_the_values():
    values = {3: 8728859, 4: {"city": "Oslo", "n": [1, 2]}, 5: "Lyon"}
    assert resolve_answer("$3", values) == "8728859"
    assert resolve_answer("The total is $3 people; $4.city, $4.n[1], $5.", values) == "The total is 8728859 people; Oslo, 2, Lyon."
    assert resolve_answer("$9 and $31 stay", values) == "$9 and $31 stay"  # no such result / not $3 then a digit


def test_question_phrases_and_grounded_parameters():
    q = 'How many people live in Lyon and New York? What about "Porto"?'
    assert question_phrases(q) == ["Porto", "Lyon", "New York"]
    grounded = {t.name: t for t in ground_tools([population, search, calculator], q)}
    assert grounded["population"].parameters["properties"]["city"]["enum"] == ["Porto", "Lyon", "New York"]
    assert "enum" not in grounded["search"].parameters["properties"]["query"]  # its docstring does not ground it
    assert "enum" not in population.parameters["properties"]["city"]  # the original is untouched
    assert ground_tools([population], "how many people live there?")[0] is population  # nothing named


def test_a_grounded_argument_cannot_be_copied_from_an_example(compiler, tokenizer):
    tools = ground_tools([population, calculator], "How many people live in Lyon and Porto together?")

    def accepts(text: str) -> bool:
        m = xgr.GrammarMatcher(compiler.compile_grammar(plan_grammar(tools)))
        return all(m.accept_token(t) for t in tokenizer.encode(text, add_special_tokens=False))

    assert accepts('1. population({"city": "Lyon"})\n')
    assert not accepts('1. population({"city": "Madrid"})\n')


def test_the_joiner_answers_by_reference():
    plan = ('1. population({"city": "Lyon"})\n2. population({"city": "Porto"})\n'
            '3. calculator({"expression": "$1 + $2"})\n4. join()')
    prompts = []

    async def llm(prompt: str, grammar: str | None):
        prompts.append(prompt)
        yield plan if len(prompts) == 1 else "Finish($3)"

    run = anyio.run(lambda: run_plan("How many people live in Lyon and Porto together?", llm,
                                     ToolRegistry([population, calculator])))
    assert run.answer == str(522250 + 231800)
    assert "Finish($3)" in prompts[1]  # the joiner is told how to answer by reference


def test_a_plan_that_repeats_a_task_ends_there():
    plan = '1. population({"city": "Lyon"})\n2. population({"city": "Lyon"})\n' + "".join(
        f'{i}. population({{"city": "Oslo"}})\n' for i in range(3, 40))
    outputs = [plan, "Finish($1)"]

    async def llm(prompt: str, grammar: str | None):
        yield outputs.pop(0)

    run = anyio.run(lambda: run_plan("How many people live in Lyon?", llm, ToolRegistry([population]),
                                     max_replans=0))
    assert sorted(run.state.tasks) == [1] and run.answer == "522250"


def _full(compiler, tokenizer, grammar: str, text: str) -> bool:
    """`text` then end-of-sequence: True iff the grammar takes it all and ends there."""
    m = xgr.GrammarMatcher(compiler.compile_grammar(grammar))
    ok = all(m.accept_token(t) for t in tokenizer.encode(text, add_special_tokens=False))
    return ok and m.accept_token(tokenizer.eos_token_id) and m.is_terminated()


def test_a_plan_covers_every_name_of_the_question_before_combining(compiler, tokenizer):
    q = "How many people live in Lyon, Porto and Oslo together?"
    tools = ground_tools([population, search, calculator], q)
    cover = uncovered_phrases(q, tools, [])
    assert cover == ["Lyon", "Porto", "Oslo"]
    grammar = plan_grammar(tools, cover=cover, limits=GrammarLimits(max_tasks=5))
    look = [f'{i}. population({{"city": "{c}"}})\n' for i, c in enumerate(cover, 1)]
    assert _full(compiler, tokenizer, grammar, "".join(look) + '4. calculator({"expression": "$1 + $2 + $3"})\n5. join()')
    assert _full(compiler, tokenizer, grammar, "".join(look) + "4. join()")
    assert not _full(compiler, tokenizer, grammar, "".join(look[:2]) + '3. calculator({"expression": "$1 + $2"})\n4. join()')
    assert not _full(compiler, tokenizer, grammar, "".join(look[:2]) + "3. join()")  # Oslo never looked up
    assert not _full(compiler, tokenizer, grammar, '1. population({"city": "Porto"})\n2. join()')  # out of order
    assert not _full(compiler, tokenizer, grammar, '1. search({"query": "Lyon"})\n2. join()')  # not a lookup
    # after the question is covered any call goes, names included
    assert _full(compiler, tokenizer, grammar, "".join(look) + '4. search({"query": "x"})\n5. population({"city": "Lyon"})\n6. join()')
    # a replan covers only what earlier rounds did not, and no lookup tool means nothing to cover
    assert uncovered_phrases(q, tools, [("population", {"city": "Lyon"}), ("search", {"query": "Porto"})]) == ["Porto", "Oslo"]
    assert uncovered_phrases(q, [search, calculator], []) == []
    # more names than tasks: no cover (the plan could not end)
    assert "_c0" not in plan_grammar(tools, cover=cover, limits=GrammarLimits(max_tasks=3))


def test_run_plan_decodes_under_the_cover(compiler, tokenizer):
    grammars = []

    async def llm(prompt: str, grammar: str | None):
        grammars.append(grammar)
        yield "1. join()" if len(grammars) == 1 else "Finish(none)"

    anyio.run(lambda: run_plan("How many people live in Lyon and Porto together?", llm,
                               ToolRegistry([population, calculator]), max_replans=0))
    assert not _full(compiler, tokenizer, grammars[0], "1. join()")
    assert _full(compiler, tokenizer, grammars[0], '1. population({"city": "Lyon"})\n'
                 '2. population({"city": "Porto"})\n3. join()')


def test_worked_examples_come_from_the_tools_not_the_question():
    q = "How many people live in Lyon, Porto and Oslo together?"
    text = tool_examples(ground_tools([population, calculator], q), lookups=3)
    assert not any(c in text for c in ("Lyon", "Porto", "Oslo"))
    assert '"$1 + $2 + $3"' in text and '"$1 - $2"' in text  # a sum over as many names, and a difference
    shape = tool_examples([search, calculator])  # no lookup the question grounds: the plan's shape
    assert "search(" in shape and '"$1"' in shape and "Question:" not in shape
    # a question that names nothing to look up: no lookup in the example, the calculator computes
    plain = tool_examples([population, calculator], lookups=0)
    assert "population" not in plain and plain.startswith("1. calculator(") and "2. join()" in plain
