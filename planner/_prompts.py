"""Prompt text for the planner, DTA rounds, ReAct steps and the joiner (after LLMCompiler's
prompts, shortened: the grammar, not the prompt, enforces the format)."""

from __future__ import annotations

import json
from collections.abc import Iterable

from agentrt.planner._executor import ExecutionState
from agentrt.planner._ground import grounded_params, question_phrases
from agentrt.tools import Tool

__all__ = ["tool_catalogue", "tool_examples", "planner_prompt", "joiner_prompt", "react_prompt"]

_PLAN_RULES = """Write a plan of tool calls that answers the question, one per line:
Thought: <optional reasoning>
{a}. tool_name({{"arg": value}})
Arguments are JSON. To use the result of an earlier task N, write $N (or $N.key[0] for a part of it)
in place of a JSON value. {parallel}
End the plan with a numbered join() line.
Example:
{a}. search({{"query": "capital of France"}})
{b}. search({{"query": {b_arg}}})
{c}. join()"""


def tool_catalogue(tools: Iterable[Tool]) -> str:
    lines = []
    for t in tools:
        props = t.parameters.get("properties", {})
        required = set(t.parameters.get("required", []))
        args = ", ".join(
            f"{name}{'' if name in required else '?'}: {schema.get('type', 'any')}" for name, schema in props.items()
        )
        lines.append(f"- {t.name}({args}): {t.description}")
        lines.extend(f"    {name}: {doc}" for name, doc in t.param_docs.items())
    return "\n".join(lines)


def _observations(state: ExecutionState) -> str:
    if not state.tasks:
        return ""
    lines = ["Results so far:"]
    for tid, task in sorted(state.tasks.items()):
        result = state.results.get(tid)
        obs = result.observation(500) if result else "(not finished)"
        args = state.resolved_args.get(tid, task.to_json()["args"])
        lines.append(f"${tid} = {task.tool}({json.dumps(args, ensure_ascii=False)}) -> {obs}")
    return "\n".join(lines)


def _placeholders(t: Tool) -> dict:
    """`t`'s required arguments as placeholder values of the right types."""
    props = t.parameters.get("properties", {})
    args = {}
    for name in t.parameters.get("required", list(props)):
        kind = props.get(name, {}).get("type")
        args[name] = f"<{name}>" if kind == "string" else 2 if kind in ("integer", "number") else \
            [] if kind == "array" else {}
    return args


def _worked(question: str, calls: list[str]) -> str:
    lines = [f"Question: {question}"] + [f"{i}. {c}" for i, c in enumerate(calls, 1)]
    return "\n".join(lines + [f"{len(calls) + 1}. join()"])


def tool_examples(tools: Iterable[Tool], lookups: int = 2) -> str:
    """Worked plans built from the registered tools (not fixed content a model could copy).

    With a lookup tool (one argument its docstring grounds in the question) and a calculator: a sum
    over `lookups` names and a difference of two, with the names as letters (the grammar only lets
    the question's own names through). Otherwise a plan shape: one call per tool with placeholder
    values (a lookup only when the question names something), and a calculator combining earlier
    results, or computing the question's arithmetic, when there is one."""
    tools = list(tools)
    calc = next((t for t in tools if t.name == "calculator"), None)
    lookup = next(((t, p[0]) for t in tools if t is not calc and len(p := grounded_params(t)) == 1), None)
    if calc is not None and lookup is not None and lookups > 0:
        t, param = lookup
        subject = t.name.replace("_", " ")
        names = [chr(ord("A") + i) for i in range(max(2, min(lookups, 6)))]

        def calls(ns: list[str], expression: str) -> list[str]:
            looked = [f"{t.name}({json.dumps({**_placeholders(t), param: n}, ensure_ascii=False)})" for n in ns]
            return looked + [f"calculator({json.dumps({'expression': expression})})"]

        together = f"{', '.join(names[:-1])} and {names[-1]}"
        total = calls(names, " + ".join(f"${i}" for i in range(1, len(names) + 1)))
        diff = calls(names[:2], "$1 - $2")
        return "\n\n".join([_worked(f"What is the {subject} of {together} together?", total),
                             _worked(f"How much more is the {subject} of A than that of B?", diff)])
    lines: list[str] = []
    for t in tools:
        if t is calc or (grounded_params(t) and not lookups):  # the question names nothing to look up
            continue
        for _ in range(2 if calc is None and len(lines) < 2 else 1):
            lines.append(f"{len(lines) + 1}. {t.name}({json.dumps(_placeholders(t), ensure_ascii=False)})")
    if calc is not None:
        refs = " + ".join(f"${i}" for i in range(1, len(lines) + 1)) or "<arithmetic from the question>"
        lines.append(f'{len(lines) + 1}. calculator({json.dumps({"expression": refs})})')
    if not lines:
        return ""
    lines.append(f"{len(lines) + 1}. join()")
    return "\n".join(lines)


def planner_prompt(
    question: str, tools: Iterable[Tool], state: ExecutionState, *, first_id: int,
    parallel_only: bool = False, notes: Iterable[str] = (), examples: str | None = None,
) -> str:
    """`examples`: worked question/plan pairs for these tools, shown instead of the generic example
    (small models copy the shape of a close example far better than they follow rules)."""
    parallel = (
        "All calls in this round run at the same time, so they may only use results listed above."
        if parallel_only else "Tasks that do not depend on each other run in parallel."
    )
    b_arg = '"capital of Spain"' if parallel_only else f'"${first_id}.city"'
    rules = _PLAN_RULES.format(a=first_id, b=first_id + 1, c=first_id + 2, parallel=parallel, b_arg=b_arg)
    if examples:
        rules = rules[:rules.index("Example:")] + "Examples:\n" + examples.strip()
    elif not parallel_only and (shape := tool_examples(tools, len(question_phrases(question)))):
        rules = rules[:rules.index("Example:")] + ("Examples:\n" if "Question:" in shape else "Example:\n") + shape
    parts = [f"Tools:\n{tool_catalogue(tools)}", rules]
    if obs := _observations(state):
        parts.append(obs)
    parts.extend(notes)
    parts.append(f"Question: {question}\nPlan (number tasks from {first_id}):")
    return "\n\n".join(parts)


def joiner_prompt(question: str, state: ExecutionState, *, allow_replan: bool, notes: Iterable[str] = ()) -> str:
    choice = (
        "If the results answer the question, finish with the answer; if something is missing, write "
        "Replan with what is missing."
        if allow_replan else "Finish with the answer to the question."
    )
    parts = [f"Question: {question}", _observations(state) or "No tool results.", *notes, choice]
    ok = [tid for tid, r in sorted(state.results.items()) if r.ok]
    if ok:  # by reference: the runtime writes the value, the model need not copy it
        parts.append(f"To answer with a result, write its reference: Finish(${ok[-1]}) answers with the "
                     f"result of task {ok[-1]}.")
    return "\n\n".join(parts)


def react_prompt(question: str, tools: Iterable[Tool], state: ExecutionState, *, step_id: int) -> str:
    return "\n\n".join(p for p in (
        f"Tools:\n{tool_catalogue(tools)}",
        "Call one tool per step as `N. tool_name({\"arg\": value})` (use $N to reuse an earlier result), "
        "or answer: Finish($N) answers with the result of step N, Finish(text) with text.",
        _observations(state),
        f"Question: {question}\nStep {step_id}:",
    ) if p)
