"""The decoding grammars, compiled by xgrammar over the SmolLM2 tokenizer and driven token by token."""

from __future__ import annotations

from typing import Annotated, Literal

import pytest
import numpy as np
import xgrammar as xgr
from pydantic import BaseModel, Field

from agentrt.errors import PlanError
from agentrt.planner import (
    GrammarLimits,
    PlanParser,
    joiner_grammar,
    parse_joiner,
    parse_plan,
    plan_grammar,
    react_grammar,
    validate_task,
)
from agentrt.tools import ToolRegistry, calculator, tool


class Place(BaseModel):
    city: str
    country: str | None = None


@tool
def search(query: Annotated[str, Field(max_length=40)], k: Annotated[int, Field(ge=1, le=5)] = 3) -> list[str]:
    """Search the web.

    Args:
        query: what to look for.
        k: how many results.
    """
    return []


@tool
def weather(place: Place, unit: Literal["c", "f"] = "c", days: list[int] = []) -> dict:  # noqa: B006
    """Weather for a place."""
    return {}


@tool
def combine(values: list) -> str:  # items of any JSON type
    """Combine values."""
    return ""


TOOLS = ToolRegistry([search, weather, calculator, combine])


def accepts(compiler, tokenizer, grammar: str, text: str) -> bool:
    """Feed `text` as real tokens, then the end-of-sequence token: True iff the grammar takes it all."""
    matcher = xgr.GrammarMatcher(compiler.compile_grammar(grammar))
    for token in tokenizer.encode(text, add_special_tokens=False):
        if not matcher.accept_token(token):
            return False
    return matcher.accept_token(tokenizer.eos_token_id) and matcher.is_terminated()


VALID = [
    '1. search({"query": "capital of France"})\n2. join()',
    '1. join()',
    'Thought: two lookups, then weather\n1. search({"query": "capital of France", "k": 2})\n'
    '2. search({"query":"capital of Spain"})\n'
    'Thought: now the weather\n'
    '3. weather({"place": {"city": "$1[0]"}, "unit": "f", "days": [1, $2.n]})\n'
    '4. combine({"values": [$1, "$3.temp", {"a": [true, null, -2.5e3]}, "price in $ euro"]})\n'
    '5. calculator({"expression": "2 * (3 + 4) - $2.n / $1[0]"})\n6. join()',
    '1. weather({"place": $0.best})\n2. join()',  # with known_ids={0}
]

INVALID = [
    ('1. nope({"query": "x"})\n2. join()', "unknown tool"),
    ('1. search({"query": $1})\n2. join()', "self reference"),
    ('1. search({"query": "a"})\n2. search({"query": $3})\n3. join()', "forward reference"),
    ('1. search({"query": "a"})\n2. search({"query": "$5.x"})\n3. join()', "unknown quoted reference"),
    ('1. search({"query": "a", "k": 9})\n2. join()', "k above its maximum"),
    ('1. search({"k": 2})\n2. join()', "missing required argument"),
    ('1. search({"query": "a", "extra": 1})\n2. join()', "unknown argument"),
    ('1. weather({"place": {"city": 3}})\n2. join()', "wrong type"),
    ('1. weather({"place": {"city": "x"}, "unit": "kelvin"})\n2. join()', "not in enum"),
    ('1. search({"query": "' + "x" * 41 + '"})\n2. join()', "string over maxLength"),
    ('2. search({"query": "a"})\n3. join()', "numbering"),
    ('1. search({"query": "a"})', "no join"),
    ('1. search({"query": "a"})\n2. join()\n3. search({"query": "b"})', "text after join"),
    ('1. search({"query": "costs $1"})\n2. join()', "self reference inside a string"),
    ('1. search({"query": "a"})\n2. search({"query": "x $12 y"})\n3. join()', "$1 followed by a digit"),
    ('1. search({"query": "a"})\n2. search({"query": "x $2"})\n3. join()', "self reference at string end"),
    ('1. search({"query": "a"})\n2. join()  ', "trailing whitespace"),
]


@pytest.mark.parametrize("text", VALID)
def test_valid_plans_are_accepted(compiler, tokenizer, text: str) -> None:
    known = {0} if "$0" in text else None
    grammar = plan_grammar(TOOLS, known_ids=known)
    assert accepts(compiler, tokenizer, grammar, text)
    plan = parse_plan(text, tools=TOOLS.names, known_ids=known or ())  # and the parser agrees
    assert plan.joined and all(validate_task(t, TOOLS[t.tool]) == [] for t in plan.tasks)


@pytest.mark.parametrize("text, why", INVALID)
def test_invalid_plans_cannot_be_decoded(compiler, tokenizer, text: str, why: str) -> None:
    assert not accepts(compiler, tokenizer, plan_grammar(TOOLS), text), why


def test_task_cap(compiler, tokenizer) -> None:
    grammar = plan_grammar([calculator], limits=GrammarLimits(max_tasks=2))
    two = '1. calculator({"expression": "1"})\n2. calculator({"expression": $1})\n3. join()'
    three = two.replace("3. join()", '3. calculator({"expression": "2"})\n4. join()')
    assert accepts(compiler, tokenizer, grammar, two)
    assert not accepts(compiler, tokenizer, grammar, three)


def test_a_string_with_min_length_one_cannot_be_empty(compiler, tokenizer) -> None:
    # calculator's expression has minLength 1: empty is refused with and without references and bounds
    for limits in (GrammarLimits(), GrammarLimits(max_string_chars=8)):
        grammar = plan_grammar([calculator], limits=limits)
        assert not accepts(compiler, tokenizer, grammar, '1. calculator({"expression": ""})\n2. join()')
        assert accepts(compiler, tokenizer, grammar, '1. calculator({"expression": "2"})\n2. join()')
        assert not accepts(compiler, tokenizer, grammar, '1. calculator({"expression": "1"})\n'
                           '2. calculator({"expression": ""})\n3. join()')  # task 2 may interpolate $1
        assert accepts(compiler, tokenizer, grammar, '1. calculator({"expression": "1"})\n'
                       '2. calculator({"expression": "$1"})\n3. calculator({"expression": "$2 + 1"})\n4. join()')


def test_replan_numbering_and_known_ids(compiler, tokenizer) -> None:
    # round two starts at 4; tasks 1 and 3 finished (2 failed, so it cannot be referenced)
    grammar = plan_grammar(TOOLS, first_id=4, known_ids={1, 3})
    assert accepts(compiler, tokenizer, grammar, '4. combine({"values": [$1, $3]})\n5. combine({"values": [$4]})\n6. join()')
    assert not accepts(compiler, tokenizer, grammar, '4. combine({"values": [$2]})\n5. join()')
    assert not accepts(compiler, tokenizer, grammar, '1. combine({"values": [$3]})\n2. join()')


def test_dta_round_grammar_forbids_refs_within_round(compiler, tokenizer) -> None:
    grammar = plan_grammar(TOOLS, first_id=3, known_ids={1, 2}, refs_within_plan=False)
    assert accepts(compiler, tokenizer, grammar, '3. combine({"values": [$1]})\n4. combine({"values": [$2]})\n5. join()')
    assert not accepts(compiler, tokenizer, grammar, '3. combine({"values": [$1]})\n4. combine({"values": [$3]})\n5. join()')


def test_react_and_joiner_grammars(compiler, tokenizer) -> None:
    react = react_grammar(TOOLS, step_id=3, known_ids={1, 2})
    assert accepts(compiler, tokenizer, react, 'Thought: need more\n3. search({"query": "$2.next"})')
    assert accepts(compiler, tokenizer, react, "Finish(Paris)")
    assert not accepts(compiler, tokenizer, react, '3. search({"query": "a"})\n4. search({"query": "b"})')
    assert not accepts(compiler, tokenizer, react, '3. search({"query": $3})')
    joiner = joiner_grammar()
    for text in ("Finish(Paris (the capital))", "Thought: missing Spain\nReplan(look up Spain)"):
        assert accepts(compiler, tokenizer, joiner, text)
        parse_joiner(text)
    assert not accepts(compiler, tokenizer, joiner, "Paris")
    assert not accepts(compiler, tokenizer, joiner_grammar(allow_replan=False), "Replan(again)")


def test_reserved_and_empty(compiler) -> None:
    @tool
    def join() -> None:
        """Clashes with the plan language."""

    with pytest.raises(PlanError, match="reserved"):
        plan_grammar([join])
    with pytest.raises(PlanError, match="without tools"):
        plan_grammar([])


def _sample(compiler, tokenizer, grammar: str, rng: np.random.Generator, max_steps: int = 2000) -> str:
    """Decode like a random model: pick uniformly among the tokens the grammar allows."""
    compiled = compiler.compile_grammar(grammar)
    vocab = compiled.tokenizer_info.vocab_size
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    ids: list[int] = []
    for _ in range(max_steps):
        matcher.fill_next_token_bitmask(bitmask)
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")[:vocab]
        token = int(rng.choice(np.flatnonzero(bits)))
        assert matcher.accept_token(token)
        if matcher.is_terminated():
            return tokenizer.decode(ids)
        ids.append(token)
    raise AssertionError("a bounded grammar must terminate")


def test_random_decoding_under_the_grammar_always_parses_and_validates(compiler, tokenizer) -> None:
    """A random model under the plan grammar writes only plans the parser accepts and whose
    arguments validate: the grammar and the parser describe the same language."""
    rng = np.random.default_rng(0)
    limits = GrammarLimits(max_tasks=4, max_thought_chars=12, max_string_chars=8, max_array_items=3,
                           max_object_entries=3, max_int_digits=4)
    grammar = plan_grammar(TOOLS, first_id=2, known_ids={1}, limits=limits)
    for _ in range(12):
        text = _sample(compiler, tokenizer, grammar, rng)
        parser = PlanParser(first_id=2, known_ids={1}, tools=TOOLS.names)
        tasks = parser.feed(text) + parser.close()
        assert parser.joined, text
        for task in tasks:
            assert validate_task(task, TOOLS[task.tool]) == [], text
