"""Plans decoded by real models under the plan grammar: every one parses and validates."""

from __future__ import annotations

import asyncio
from typing import Annotated

import pytest
from pydantic import Field

from agentrt.planner import ExecutionState, GrammarLimits, PlanParser, plan_grammar, validate_task
from agentrt.planner._prompts import planner_prompt
from agentrt.engine.sampling import SamplingParams
from agentrt.tools import ToolRegistry, calculator, tool


@tool
def search(query: Annotated[str, Field(max_length=60)]) -> list[str]:
    """Search the web and return the top result titles.

    Args:
        query: What to search for.
    """
    return [query]


@tool
def weather(city: str, unit: str = "c") -> dict:
    """Current weather in a city.

    Args:
        city: City name.
        unit: "c" or "f".
    """
    return {"city": city}


@tool
def population(city: str) -> int:
    """Number of people living in a city.

    Args:
        city: City name.
    """
    return 1


TOOLS = ToolRegistry([search, weather, population, calculator])
CITIES = ["Paris", "Rome", "Berlin", "Madrid", "Vienna", "Lisbon", "Oslo", "Cairo", "Lima", "Tokyo"]
TEMPLATES = [
    "What is the weather in {a} and in {b}?",
    "How many people live in {a} and {b} together?",
    "Which is bigger, {a} or {b}?",
    "Search for the history of {a}.",
    "What is the population of {a} times two?",
]
QUESTIONS = [t.format(a=CITIES[i % 10], b=CITIES[(i * 3 + 1) % 10]) for i in range(10) for t in TEMPLATES]
LIMITS = GrammarLimits(max_tasks=4, max_thought_chars=80)


def decode_plans(engine, questions: list[str], limits: GrammarLimits = LIMITS) -> list[str]:
    from agentrt.backends import LocalBackend

    backend = LocalBackend(engine)
    grammar = plan_grammar(TOOLS, limits=limits)
    # room for the longest plan LIMITS allow (4 tasks of 80-character thoughts and capped arguments, then
    # join()): this checks what the grammar admits, not how a plan ends when the budget runs out first
    params = SamplingParams(max_tokens=512, temperature=0.0)

    async def one(q: str) -> str:
        prompt = planner_prompt(q, TOOLS, ExecutionState(), first_id=1)
        return "".join([t async for t in backend.text(prompt, grammar, params)])

    async def all_of_them() -> list[str]:
        return await asyncio.gather(*(one(q) for q in questions))

    return asyncio.run(all_of_them())


def check(text: str) -> None:
    parser = PlanParser(tools=TOOLS.names)
    tasks = parser.feed(text) + parser.close()
    assert parser.joined, text
    for task in tasks:
        errors = validate_task(task, TOOLS[task.tool])
        if task.id > 1:  # a string that may interpolate earlier results has no maxLength chain in the
            # grammar (plan_grammar: compile time); the tool's validation reports it to the joiner
            errors = [e for e in errors if "at most" not in e or "characters" not in e]
        assert errors == [], text


def test_tiny_random_plans_parse_and_validate(tiny_engine):
    # a random model reaches join() only because the grammar bounds every free-text span
    tight = GrammarLimits(max_tasks=3, max_thought_chars=6, max_string_chars=6, max_int_digits=3,
                          max_array_items=2, max_object_entries=2)
    texts = decode_plans(tiny_engine, QUESTIONS[:8], tight)
    for text in texts:
        check(text)
    assert tiny_engine.pool.num_in_use == 0


@pytest.mark.slow
def test_smollm2_plans_for_20_queries_all_parse_and_validate(smol_engine):
    # four cities through every template (the whole fifty decode the same shapes, at 2.5x the suite time)
    texts = decode_plans(smol_engine, QUESTIONS[:20])
    assert len(texts) == 20
    for text in texts:
        check(text)
