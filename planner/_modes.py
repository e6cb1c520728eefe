"""Mode drivers over an abstract text LLM: `plan` (LLMCompiler: streamed DAG plan, executor, joiner,
replan), `dta` (Divide-Then-Aggregate, DTA-Llama: rounds of independent parallel calls, each round
aggregating the last) and `react` (ReAct: one call per step, the baseline).

The LLM is any callable `llm(prompt, grammar) -> AsyncIterator[str]` yielding text chunks; `grammar`
is xgrammar EBNF (root rule `root`) the backend should decode under, or None when unconstrained.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from agentrt.errors import PlanError
from agentrt.planner._executor import ExecutionState, Executor
from agentrt.planner._ground import ground_tools, uncovered_phrases
from agentrt.planner._grammar import GrammarLimits, answer_numbers, expression_numbers, joiner_grammar, plan_grammar, react_grammar
from agentrt.planner._joiner import JoinerDecision, parse_joiner, resolve_answer
from agentrt.planner._parser import PlanParser, stream_tasks
from agentrt.planner._prompts import joiner_prompt, planner_prompt, react_prompt
from agentrt.planner._task import REF_RE, Task, parse_ref
from agentrt.tools import Tool, ToolRegistry

__all__ = ["TextLLM", "AgentRun", "run_plan", "run_dta", "run_react"]

log = logging.getLogger(__name__)


class TextLLM(Protocol):
    def __call__(self, prompt: str, grammar: str | None) -> AsyncIterator[str]: ...


@dataclass
class AgentRun:
    """The outcome of one mode run: the answer plus everything executed on the way."""

    mode: Literal["plan", "dta", "react"]
    answer: str | None
    state: ExecutionState
    rounds: int = 0
    outputs: list[str] = field(default_factory=list)  # raw LLM text, in call order
    decisions: list[JoinerDecision] = field(default_factory=list)
    plan_errors: list[str] = field(default_factory=list)

    @property
    def replans(self) -> int:
        return sum(d.action == "replan" for d in self.decisions)


def _registry(tools: ToolRegistry | Iterable[Tool]) -> ToolRegistry:
    return tools if isinstance(tools, ToolRegistry) else ToolRegistry(tools)


def _select(reg: ToolRegistry, question: str, top_k: int | None) -> ToolRegistry:
    """The tools offered for `question` (Tool RAG when `top_k`), with arguments their docstrings ground
    in the question narrowed to its phrases (`ground_tools`)."""
    chosen = reg if top_k is None or len(reg) <= top_k else reg.select(question, k=top_k)
    chosen = chosen if len(chosen) else reg  # nothing matched: offer everything rather than nothing
    return ToolRegistry(ground_tools(chosen, question))


async def _tee(chunks: AsyncIterable[str], sink: list[str]) -> AsyncIterator[str]:
    async for chunk in chunks:
        sink.append(chunk)
        yield chunk


@contextlib.asynccontextmanager
async def _closing(chunks: AsyncIterator[str]) -> AsyncIterator[AsyncIterator[str]]:
    """Close the LLM's stream when we stop reading early (after join()), so decoding stops too."""
    try:
        yield chunks
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()


async def _collect(chunks: AsyncIterator[str]) -> str:
    async with _closing(chunks) as it:
        return "".join([c async for c in it])


async def _guarded(tasks: AsyncIterator[Task], errors: list[str]) -> AsyncIterator[Task]:
    """Stop at a plan error (unconstrained decoding) and at a task that repeats one of the same plan exactly
    (the plan is done: a weak model would repeat it until max_tokens); tasks already dispatched still
    finish."""
    seen: set[str] = set()  # this plan's tasks (one repeating an earlier round's reuses its result)
    try:
        async for task in tasks:
            key = json.dumps([task.tool, task.to_json()["args"]], sort_keys=True, default=str)
            if key in seen:
                log.info("plan stopped at task %d, a repeat of an earlier one", task.id)
                aclose = getattr(tasks, "aclose", None)
                if aclose is not None:
                    await aclose()
                return
            seen.add(key)
            yield task
    except PlanError as e:
        log.info("plan stopped at an invalid line: %s", e)
        errors.append(str(e))


def _grounding(question: str, state: ExecutionState) -> dict:
    """An answer's numbers come from the question or the results (`joiner_grammar(numbers=)`), or are
    references to a result."""
    values = state.values()
    observations = [r.observation(500) for r in state.results.values() if r.ok]
    return {"numbers": answer_numbers(question, values.values(), observations), "refs": list(values)}


def _names_results(text: str, state: ExecutionState) -> bool:
    """`text` is nothing but references to successful results (`$3`, `$3 and $4`)."""
    refs = [parse_ref(m.group(0)) for m in REF_RE.finditer(text)]
    rest = re.sub(r"\band\b|[\s.,;:]", "", REF_RE.sub("", text))
    return bool(refs) and not rest and all(r is not None and r.task in state.values() for r in refs)


async def _join(
    llm: TextLLM, question: str, state: ExecutionState, run: AgentRun, *, allow_replan: bool,
    constrained: bool, limits: GrammarLimits, notes: list[str],
) -> JoinerDecision:
    prompt = joiner_prompt(question, state, allow_replan=allow_replan, notes=notes)
    grammar = joiner_grammar(allow_replan=allow_replan, limits=limits, **_grounding(question, state)) if constrained else None
    text = await _collect(llm(prompt, grammar))
    run.outputs.append(text)
    state.trace.mark("joiner")
    try:
        decision = parse_joiner(text)
    except PlanError:
        log.warning("joiner output is not Finish(...)/Replan(...); using it as the answer")
        decision = JoinerDecision("finish", text.strip())
    if decision.action == "replan" and (not allow_replan or _names_results(decision.text, state)):
        # a "reason" that is only references to finished results is an answer by reference
        decision = JoinerDecision("finish", decision.text, decision.thought)
    run.decisions.append(decision)
    return decision


async def _rounds(
    mode: Literal["plan", "dta"], question: str, llm: TextLLM, tools: ToolRegistry | Iterable[Tool], *,
    executor: Executor | None, max_rounds: int, tool_top_k: int | None, constrained: bool,
    limits: GrammarLimits, examples: str | None = None, state: ExecutionState | None = None,
) -> AgentRun:
    reg = _registry(tools)
    offered = _select(reg, question, tool_top_k)
    executor = executor or Executor(reg)
    state = state if state is not None else ExecutionState()  # the caller's, to watch it live
    run = AgentRun(mode, None, state)
    notes: list[str] = []
    for round_no in range(1, max_rounds + 1):
        run.rounds = round_no
        first_id = state.next_id
        known = [i for i, r in state.results.items() if r.ok]
        calls_before = len(state.calls)
        within = mode == "plan"
        prompt = planner_prompt(question, offered, state, first_id=first_id, parallel_only=not within, notes=notes,
                                examples=examples)
        done = [(t.tool, state.resolved_args.get(tid, t.to_json()["args"])) for tid, t in state.tasks.items()]
        grammar = (plan_grammar(offered, first_id=first_id, known_ids=known, refs_within_plan=within, limits=limits,
                                cover=uncovered_phrases(question, offered, done),
                                numbers=expression_numbers(question, state.values().values())) if constrained else None)
        parser = PlanParser(first_id=first_id, known_ids=known, tools=offered.names, refs_within_plan=within)
        raw: list[str] = []
        errors: list[str] = []
        state.trace.mark(f"plan {round_no}")
        async with _closing(llm(prompt, grammar)) as chunks:
            await executor.run(_guarded(stream_tasks(_tee(chunks, raw), parser), errors), state)
        run.outputs.append("".join(raw))
        run.plan_errors.extend(errors)
        notes = [f"The plan had an error: {e}" for e in errors]
        # a replan that called nothing new (only repeats of finished calls) will not get further
        fresh = round_no == 1 or len(state.calls) > calls_before or any(
            tid >= first_id and not r.ok for tid, r in state.results.items())
        decision = await _join(llm, question, state, run, allow_replan=round_no < max_rounds and fresh,
                               constrained=constrained, limits=limits, notes=notes)
        if decision.action == "finish":
            run.answer = resolve_answer(decision.text, state.values())
            return run
        notes = [f"Previous plan was not enough: {decision.text}. Plan only what is still missing; "
                 f"reuse results above by reference instead of calling tools again."]
    return run


async def run_plan(
    question: str, llm: TextLLM, tools: ToolRegistry | Iterable[Tool], *, executor: Executor | None = None,
    max_replans: int = 2, tool_top_k: int | None = None, constrained: bool = True,
    limits: GrammarLimits = GrammarLimits(), examples: str | None = None, state: ExecutionState | None = None,
) -> AgentRun:
    """LLMCompiler: stream a DAG plan, run tasks as they parse, join; replan at most `max_replans` times.

    A replan continues the task numbering: earlier results stay and can be referenced, and a call
    identical to a finished one reuses its result instead of running again.
    """
    return await _rounds("plan", question, llm, tools, executor=executor, max_rounds=max_replans + 1,
                         tool_top_k=tool_top_k, constrained=constrained, limits=limits, examples=examples,
                         state=state)


async def run_dta(
    question: str, llm: TextLLM, tools: ToolRegistry | Iterable[Tool], *, executor: Executor | None = None,
    max_rounds: int = 3, tool_top_k: int | None = None, constrained: bool = True,
    limits: GrammarLimits = GrammarLimits(), examples: str | None = None, state: ExecutionState | None = None,
) -> AgentRun:
    """Divide-Then-Aggregate: each round is a set of independent calls (references only to earlier
    rounds) run in parallel; the joiner finishes or asks for the next round."""
    return await _rounds("dta", question, llm, tools, executor=executor, max_rounds=max_rounds,
                         tool_top_k=tool_top_k, constrained=constrained, limits=limits, examples=examples,
                         state=state)


async def run_react(
    question: str, llm: TextLLM, tools: ToolRegistry | Iterable[Tool], *, executor: Executor | None = None,
    max_steps: int = 8, tool_top_k: int | None = None, constrained: bool = True,
    limits: GrammarLimits = GrammarLimits(), state: ExecutionState | None = None,
) -> AgentRun:
    """ReAct: one tool call per LLM step until `Finish(answer)`; after `max_steps` calls the model
    must answer."""
    reg = _registry(tools)
    offered = _select(reg, question, tool_top_k)
    executor = executor or Executor(reg)
    state = state if state is not None else ExecutionState()
    run = AgentRun("react", None, state)
    for step in range(1, max_steps + 1):
        run.rounds = step
        step_id = state.next_id
        known = [i for i, r in state.results.items() if r.ok]
        prompt = react_prompt(question, offered, state, step_id=step_id)
        grammar = (react_grammar(offered, step_id=step_id, known_ids=known, limits=limits,
                                 numbers=_grounding(question, state)["numbers"]) if constrained else None)
        text = await _collect(llm(prompt, grammar))
        run.outputs.append(text)
        body = text.strip()
        if "\n" in body and body.startswith("Thought:"):
            body = body.split("\n", 1)[1].strip()
        if body.startswith("Finish("):
            decision = parse_joiner(body)
            run.decisions.append(decision)
            run.answer = resolve_answer(decision.text, state.values())
            return run
        parser = PlanParser(first_id=step_id, known_ids=known, tools=offered.names)
        try:
            tasks = parser.feed(text) + parser.close()
        except PlanError as e:
            run.plan_errors.append(str(e))
            continue
        await executor.run(tasks[:1], state)
    decision = await _join(llm, question, state, run, allow_replan=False, constrained=constrained,
                           limits=limits, notes=[])
    run.answer = resolve_answer(decision.text, state.values())
    return run
