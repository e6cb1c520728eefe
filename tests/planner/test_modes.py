"""Mode drivers with a scripted LLM: the real parser, grammar, executor and joiner, no model.

The scripted LLM also checks, with xgrammar over the SmolLM2 tokenizer, that every text it returns
is accepted by the grammar it was handed, so the scripts are plans a constrained model could write.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest
import xgrammar as xgr

from agentrt.planner import Executor, run_dta, run_plan, run_react
from agentrt.tools import ToolContext, ToolRegistry, calculator, tool

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def checker(tokenizer, compiler):
    def accepts(grammar: str, text: str) -> bool:
        matcher = xgr.GrammarMatcher(compiler.compile_grammar(grammar))
        ok = all(matcher.accept_token(t) for t in tokenizer.encode(text, add_special_tokens=False))
        return ok and matcher.accept_token(tokenizer.eos_token_id)

    return accepts


class ScriptedLLM:
    """Returns fixed texts in order, streamed in small chunks; records prompts and grammars."""

    def __init__(self, outputs: list[str], accepts=None, chunk: int = 6) -> None:
        self.outputs = list(outputs)
        self.accepts = accepts
        self.chunk = chunk
        self.prompts: list[str] = []
        self.grammars: list[str | None] = []
        self.hooks: dict[int, anyio.Event] = {}  # call index -> wait for this after the first line

    async def __call__(self, prompt: str, grammar: str | None) -> AsyncIterator[str]:
        index = len(self.prompts)
        self.prompts.append(prompt)
        self.grammars.append(grammar)
        text = self.outputs.pop(0)
        if self.accepts is not None and grammar is not None:
            assert self.accepts(grammar, text), f"the grammar rejects the scripted output {text!r}"
        first_line_end = text.find("\n") + 1
        for i in range(0, len(text), self.chunk):
            if index in self.hooks and i >= first_line_end > 0:
                await self.hooks.pop(index).wait()
            yield text[i : i + self.chunk]
            await anyio.sleep(0)


def make_tools(calls: list[str]) -> ToolRegistry:
    @tool
    async def search(ctx: ToolContext, query: str) -> dict:
        """Search an encyclopedia.

        Args:
            query: what to look up.
        """
        calls.append(query)
        facts = {"capital of France": "Paris", "capital of Spain": "Madrid", "Paris": 2100000, "Madrid": 3300000}
        return {"answer": facts.get(query, "unknown"), "query": query}

    return ToolRegistry([search, calculator])


PLAN = """Thought: look up both capitals, then both populations
1. search({"query": "capital of France"})
2. search({"query": "capital of Spain"})
3. search({"query": "$1.answer"})
4. search({"query": "$2.answer"})
5. calculator({"expression": "$4.answer - $3.answer"})
6. join()"""


async def test_plan_mode_end_to_end(checker) -> None:
    calls: list[str] = []
    llm = ScriptedLLM([PLAN, "Thought: Madrid is larger\nFinish(Madrid, by 1200000 people)"], checker)
    run = await run_plan("Which capital is larger, France's or Spain's, and by how much?", llm, make_tools(calls))
    assert run.answer == "Madrid, by 1200000 people" and run.replans == 0 and run.rounds == 1
    assert run.state.results[5].value == 1200000
    assert sorted(calls) == sorted(["capital of France", "capital of Spain", "Paris", "Madrid"])
    assert "search(query?" not in llm.prompts[0] and "search(query: string)" in llm.prompts[0]
    assert "$5 = calculator" in llm.prompts[1] and "1200000" in llm.prompts[1]  # the joiner sees results
    assert "Replan(" in llm.grammars[1]


async def test_plan_mode_dispatches_before_the_plan_is_complete(checker) -> None:
    calls: list[str] = []
    first_ran = anyio.Event()

    @tool
    async def probe(x: int) -> int:
        """Signal that task 1 runs."""
        first_ran.set()
        return x

    reg = make_tools(calls)
    reg.add(probe)
    llm = ScriptedLLM(['1. probe({"x": 1})\n2. calculator({"expression": "$1 + 1"})\n3. join()', "Finish(2)"], checker)
    llm.hooks[0] = first_ran  # the LLM keeps writing only after task 1 has started
    with anyio.fail_after(10):
        run = await run_plan("q", llm, reg)
    assert run.answer == "2" and run.state.results[2].value == 2


async def test_replan_continues_numbering_and_never_reruns(checker) -> None:
    calls: list[str] = []
    plan2 = ('4. search({"query": "capital of France"})\n'  # identical to finished task 1: reused
             '5. search({"query": "$1.answer"})\n6. join()')
    llm = ScriptedLLM([
        '1. search({"query": "capital of France"})\n2. calculator({"expression": "1 / 0"})\n'
        '3. search({"query": "$2"})\n4. join()',
        "Thought: the calculation failed\nReplan(need the population of $1 instead)",
        plan2,
        "Finish(2100000)",
    ], checker)
    run = await run_plan("population of France's capital?", llm, make_tools(calls), max_replans=2)
    assert run.answer == "2100000" and run.replans == 1 and run.rounds == 2
    assert calls == ["capital of France", "Paris"]  # task 4 reused task 1's result; 3 was skipped
    assert run.state.results[2].kind == "error" and run.state.results[3].kind == "skipped"
    assert run.state.results[4].value == run.state.results[1].value
    assert "number tasks from 4" in llm.prompts[2] and "need the population" in llm.prompts[2]
    assert "division by zero" in llm.prompts[2]  # the replan sees earlier results, errors included


async def test_max_replans_forces_a_finish(checker) -> None:
    calls: list[str] = []
    llm = ScriptedLLM([
        '1. search({"query": "x"})\n2. join()', "Replan(more)",
        '2. search({"query": "y"})\n3. join()', "Finish(gave up)",
    ], checker)
    run = await run_plan("q", llm, make_tools(calls), max_replans=1)
    assert run.answer == "gave up" and run.rounds == 2
    assert "Replan(" in llm.grammars[1] and "Replan(" not in llm.grammars[3]


async def test_unconstrained_plan_error_reaches_the_joiner() -> None:
    calls: list[str] = []
    llm = ScriptedLLM([
        '1. search({"query": "capital of France"})\n2. search({"query": $7})\n3. join()', "Finish(Paris)",
    ])
    run = await run_plan("q", llm, make_tools(calls), constrained=False)
    assert llm.grammars == [None, None]
    assert run.answer == "Paris" and calls == ["capital of France"]
    assert len(run.plan_errors) == 1 and "$7" in run.plan_errors[0]
    assert "The plan had an error" in llm.prompts[1]


async def test_dta_rounds_aggregate_the_previous_round(checker) -> None:
    calls: list[str] = []
    llm = ScriptedLLM([
        '1. search({"query": "capital of France"})\n2. search({"query": "capital of Spain"})\n3. join()',
        "Replan(now the populations)",
        '3. search({"query": "$1.answer"})\n4. search({"query": "$2.answer"})\n5. join()',
        "Finish(Madrid)",
    ], checker)
    run = await run_dta("which capital is larger?", llm, make_tools(calls))
    assert run.answer == "Madrid" and run.rounds == 2
    assert calls[:2] == ["capital of France", "capital of Spain"] and sorted(calls[2:]) == ["Madrid", "Paris"]
    assert "run at the same time" in llm.prompts[0]


async def test_react_one_call_per_step(checker) -> None:
    calls: list[str] = []
    llm = ScriptedLLM([
        'Thought: first France\n1. search({"query": "capital of France"})',
        '2. search({"query": "$1.answer"})',
        "Thought: done\nFinish(2100000)",
    ], checker)
    run = await run_react("population of France's capital?", llm, make_tools(calls))
    assert run.answer == "2100000" and calls == ["capital of France", "Paris"] and run.rounds == 3
    assert "Step 2:" in llm.prompts[1] and "Paris" in llm.prompts[1]


async def test_react_step_cap_forces_an_answer(checker) -> None:
    calls: list[str] = []
    llm = ScriptedLLM(['1. search({"query": "a"})', '2. search({"query": "b"})', "Finish(enough)"], checker)
    run = await run_react("q", llm, make_tools(calls), max_steps=2)
    assert run.answer == "enough" and calls == ["a", "b"] and "Replan(" not in llm.grammars[2]


async def test_tool_rag_trims_the_prompt_and_grammar(checker) -> None:
    calls: list[str] = []
    reg = make_tools(calls)
    for name in ("send_email", "translate_text", "stock_price"):
        def fn(text: str) -> str:
            return text

        fn.__name__, fn.__doc__ = name, f"{name.replace('_', ' ')} tool."
        reg.add(tool(fn))
    llm = ScriptedLLM(['1. search({"query": "capital of France"})\n2. join()', "Finish(Paris)"], checker)
    executor = Executor(reg)
    run = await run_plan("search the capital of France", llm, reg, executor=executor, tool_top_k=1)
    assert run.answer == "Paris"
    assert "- search(" in llm.prompts[0] and "send_email" not in llm.prompts[0]
    assert "send_email" not in llm.grammars[0]
