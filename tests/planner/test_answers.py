"""Answers by reference (`Finish($3)` is task 3's value, put in by the runtime) and arguments grounded
in the question (a parameter whose docstring says so takes only a phrase of the question)."""

from __future__ import annotations

import json

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
    text = tool_examples(ground_tools([population, calculator], q), q)
    assert not any(c in text for c in ("Lyon", "Porto", "Oslo"))
    assert '"$1 + $2 + $3"' in text and "$4" not in text  # a sum over as many names as the question has
    shape = tool_examples([search, calculator])  # no lookup the question grounds: the plan's shape
    assert "search(" in shape and '"$1"' in shape and "Question:" not in shape
    # a question that names nothing to look up: no lookup in the example, the calculator computes
    plain = tool_examples([population, calculator], "What is 6 + 7?")
    assert "population" not in plain and plain.startswith("1. calculator(") and "2. join()" in plain


def _expression(question: str) -> str:
    text = tool_examples(ground_tools([population, calculator], question), question)
    line = next(ln for ln in text.splitlines() if "calculator(" in ln)
    return json.loads(line[line.index("(") + 1:-1])["expression"]


def test_the_worked_example_is_the_one_closest_to_the_question():
    # the example a small model copies has the arithmetic the question's wording asks for
    assert _expression("How many people live in Lyon and Oslo combined?") == "$1 + $2"
    assert _expression("Add the populations of Lyon, Porto and Oslo.") == "$1 + $2 + $3"
    assert _expression("How many more people live in Lyon than in Porto?") == "$1 - $2"
    assert _expression("By how much does Oslo's population exceed Lyon's?") == "$1 - $2"
    assert _expression("How much smaller is Porto than Lyon in population?") == "$2 - $1"
    assert _expression("What is the ratio of the population of Oslo to that of Porto?") == "$1 / $2"
    assert _expression("What is the average population of Lyon, Porto and Oslo?") == "($1 + $2 + $3) / 3"
    single = tool_examples(ground_tools([population, calculator], "What is the population of Lyon?"),
                           "What is the population of Lyon?")
    assert "calculator(" not in single and single.count("population(") == 1
    # no wording to go by: a sum and a difference
    both = tool_examples(ground_tools([population, calculator], "Lyon and Porto?"), "Lyon and Porto?")
    assert '"$1 + $2"' in both and '"$1 - $2"' in both


def test_a_replan_that_names_only_a_result_is_an_answer():
    plan = ('1. population({"city": "Lyon"})\n2. population({"city": "Porto"})\n'
            '3. calculator({"expression": "$1 - $2"})\n4. join()')
    outputs = [plan, "Replan($3)"]

    async def llm(prompt: str, grammar: str | None):
        yield outputs.pop(0)

    run = anyio.run(lambda: run_plan("How many more people live in Lyon than in Porto?", llm,
                                     ToolRegistry([population, calculator])))
    assert run.answer == str(522250 - 231800) and run.rounds == 1


def test_a_replan_that_calls_nothing_new_is_the_last():
    """A replan whose calls all repeat finished ones learnt nothing: the joiner must then finish, and is
    pointed at the result that combines the others, not at the repeats."""
    plan = ('1. population({"city": "Lyon"})\n2. population({"city": "Porto"})\n'
            '3. calculator({"expression": "$1 + $2"})\n4. join()')
    again = '4. population({"city": "Lyon"})\n5. population({"city": "Porto"})\n6. join()'
    outputs = [plan, "Replan(more data)", again, "Replan(still more)", "never asked"]
    grammars, prompts = [], []

    async def llm(prompt: str, grammar: str | None):
        grammars.append(grammar)
        prompts.append(prompt)
        yield outputs.pop(0)

    run = anyio.run(lambda: run_plan("How many people live in Lyon and Porto together?", llm,
                                     ToolRegistry([population, calculator]), max_replans=3))
    assert run.rounds == 2 and outputs == ["never asked"]
    assert "Replan(" in grammars[1] and "Replan(" not in grammars[3]  # the second join may only finish
    assert "Finish($3)" in prompts[3]  # the sum, not the repeated lookup $5
    assert run.answer == "still more"  # a forced finish keeps the text it was given


def test_an_answer_writes_only_numbers_the_question_or_a_result_gave(compiler, tokenizer):
    from agentrt.planner import joiner_grammar
    from agentrt.planner._grammar import answer_numbers

    numbers = answer_numbers("How many more people live in Lyon than in 2 other cities?", [522250, 231800, 290450.5],
                             ["Lyon has 12 districts"])
    assert numbers == ["2", "522250", "231800", "290450.5", "12"]
    grammar = joiner_grammar(numbers=numbers, refs=[1, 2, 3])
    assert _full(compiler, tokenizer, grammar, "Finish($3)")
    assert _full(compiler, tokenizer, grammar, "Finish(About 290450.5 more (in 2 cities), see $1.)")
    assert _full(compiler, tokenizer, grammar, "Thought: 1 + 1 is 2\nFinish(Lyon)")
    assert _full(compiler, tokenizer, grammar, "Replan(look up 7 more cities)")  # a reason is free text
    assert not _full(compiler, tokenizer, grammar, "Finish(290450)")  # a number nobody gave
    assert not _full(compiler, tokenizer, grammar, "Finish(1029547)")
    assert not _full(compiler, tokenizer, grammar, "Finish($4)")  # no such result
    assert _full(compiler, tokenizer, joiner_grammar(), "Finish(1029547)")  # ungrounded: anything


def test_an_answer_that_is_arithmetic_over_results_is_worked_out():
    values = {1: 1982097, 2: 643452}
    assert resolve_answer("$1 - $2", values) == str(1982097 - 643452)
    assert resolve_answer("($1 + $2) / 2", values) == json.dumps((1982097 + 643452) / 2)
    assert resolve_answer("1982097 + 643452", values) == str(1982097 + 643452)
    for text in ("555-1234", "2024-01-05", "$1 people", "1 + x", "$3 - $1"):  # not arithmetic over known numbers
        assert resolve_answer(text, values) == text.replace("$1", "1982097")


def test_a_calculation_uses_the_question_numbers_and_the_example_only_its_shape(compiler, tokenizer):
    from agentrt.planner._grammar import expression_numbers

    q = "What is 17 times 23 plus 4?"
    example = tool_examples([population, calculator], q)
    assert example.startswith("Question: What is 16 times 27 plus 35?") and '"16 * 27 + 35"' in example
    numbers = expression_numbers(q, [])
    assert numbers == ["17", "23", "4"]  # a question's own numbers: no constants to wander onto
    assert "2" in expression_numbers("What is the average population of Lyon and Porto?", [])
    grammar = plan_grammar([population, calculator], numbers=numbers)
    assert _full(compiler, tokenizer, grammar, '1. calculator({"expression": "17 * 23 + 4"})\n2. join()')
    assert _full(compiler, tokenizer, grammar, '1. calculator({"expression": "sqrt(17) - (23 / 4)"})\n2. join()')
    assert not _full(compiler, tokenizer, grammar, '1. calculator({"expression": "16 * 27 + 35"})\n2. join()')
    assert not _full(compiler, tokenizer, grammar, '1. calculator({"expression": "17 times 23"})\n2. join()')
    refs = plan_grammar([population, calculator], numbers=expression_numbers("Lyon and Porto?", []))
    assert _full(compiler, tokenizer, refs, '1. population({"city": "Lyon"})\n2. population({"city": "Porto"})\n'
                 '3. calculator({"expression": "($1 + $2) / 2"})\n4. join()')
