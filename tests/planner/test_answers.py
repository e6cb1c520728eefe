"""Answers by reference (`Finish($3)` is task 3's value, put in by the runtime) and arguments grounded
in the question (a parameter whose docstring says so takes only a phrase of the question)."""

from __future__ import annotations

import anyio
import pytest
import xgrammar as xgr

from agentrt.planner import plan_grammar, run_plan
from agentrt.planner._ground import ground_tools, question_phrases
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
