"""Prompt text for the planner, DTA rounds, ReAct steps and the joiner (after LLMCompiler's
prompts, shortened: the grammar, not the prompt, enforces the format)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable

from agentrt.planner._executor import ExecutionState
from agentrt.planner._ground import grounded_params, question_phrases
from agentrt.tools import Tool

__all__ = ["tool_catalogue", "tool_examples", "planner_prompt", "joiner_prompt", "react_prompt", "answer_ref"]

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


# Worked questions a lookup tool and a calculator answer, over letter names: the question with
# {s} (the tool's subject) and {names}, how many names it takes (None: as many as the question
# names), and the calculator expression over the lookups' results (None: the lookup answers).
# A small model copies the shape of the example closest to its question, so `tool_examples` shows
# the one whose wording is closest (in-context example retrieval, as TinyAgent does).
_SHAPES: list[tuple[str, int | None, str | None]] = [
    ("What is the {s} of {names} together?", None, "+"),
    ("What is the total {s} of {names}?", None, "+"),
    ("What is the combined {s} of {names}, all in all?", None, "+"),
    ("How much is the {s} of {names} altogether?", None, "+"),
    ("Add up the {s} of {names}.", None, "+"),
    ("What is the sum of the {s} of {names}, added together?", None, "+"),
    ("What is the {s} of A plus the {s} of B?", 2, "+"),
    ("How much more is the {s} of A than that of B?", 2, "$1 - $2"),
    ("How much bigger, larger or greater is the {s} of A than that of B?", 2, "$1 - $2"),
    ("How much higher is the {s} of A compared to B?", 2, "$1 - $2"),
    ("What is the difference between the {s} of A and B?", 2, "$1 - $2"),
    ("By how much does the {s} of A exceed or outnumber that of B?", 2, "$1 - $2"),
    ("What is the {s} of A minus the {s} of B?", 2, "$1 - $2"),
    ("How much less is the {s} of A than that of B?", 2, "$2 - $1"),
    ("How much smaller or lower is the {s} of A than that of B?", 2, "$2 - $1"),
    ("How many fewer does A have than B in {s}?", 2, "$2 - $1"),
    ("How many times the {s} of B is the {s} of A?", 2, "$1 / $2"),
    ("What is the ratio of the {s} of A to that of B?", 2, "$1 / $2"),
    ("What is the average {s} of {names}, on average?", None, "mean"),
    ("What is the {s} of A?", 1, None),
    ("What is the {s} of A plus 10?", 1, "$1 + 10"),
    ("What is the {s} of A minus 10?", 1, "$1 - 10"),
    ("What is the {s} of A times 2?", 1, "$1 * 2"),
    ("What is the {s} of A divided by 2?", 1, "$1 / 2"),
]
_WORD = re.compile(r"[a-z]+")
# words that say nothing about the arithmetic a question asks for
_FUNCTION_WORDS = set("""a an and are as be by can could did do does for from has have how i if in is it its
many much of on or our people that the their them there these they this those to us was we were what which
who will with would you your""".split())


def _stem(word: str) -> str:
    for end in ("ing", "ed", "er", "es", "e", "s"):
        if word.endswith(end) and len(word) - len(end) >= 3:
            return word[:-len(end)]
    return word


def _words(text: str) -> set[str]:
    return {_stem(w) for w in _WORD.findall(text.lower()) if len(w) > 1 and w not in _FUNCTION_WORDS}


def _closest_shapes(question: str, subject: str, names: int) -> list[int]:
    """Indices of the `_SHAPES` that fit a question naming `names` things (one lookup, or two and more),
    closest to `question` first: shared words weighted by their rarity among the shapes (idf),
    ignoring the subject's words (every shape has them). Empty when no shape shares a word."""
    texts = [_words(q.format(s=subject, names="")) - _words(subject) for q, _, _ in _SHAPES]
    df = {w: sum(w in t for t in texts) for t in texts for w in t}
    asked = _words(question)
    scores = {i: sum(math.log(len(texts) / df[w]) for w in t & asked) for i, t in enumerate(texts)
              if (_SHAPES[i][1] == 1) == (names == 1)}
    return sorted((i for i in scores if scores[i] > 0), key=lambda i: -scores[i])


def _expression(op: str, n: int) -> str:
    refs = [f"${i}" for i in range(1, n + 1)]
    if op == "+":
        return " + ".join(refs)
    if op == "mean":
        return f"({' + '.join(refs)}) / {n}"
    return op


# arithmetic as a question words it, and as the calculator writes it
_SPOKEN = [("multiplied by", "*"), ("divided by", "/"), ("to the power of", "**"), ("times", "*"), ("plus", "+"),
           ("minus", "-"), ("over", "/")]
_SPOKEN_RE = re.compile(r"\b(" + "|".join(w for w, _ in _SPOKEN) + r")\b", re.IGNORECASE)
_EXAMPLE_NUMBERS = ["16", "27", "35", "48", "59", "62"]  # none a small constant the grammar always allows


def _spoken_arithmetic(question: str) -> tuple[str, list[str]] | None:
    """A worked calculation with the question's operator words in its order over other numbers
    (which the plan grammar's grounded numbers refuse, so only the shape can be copied), or None
    when the question words no arithmetic."""
    words = [m.group(1).lower() for m in _SPOKEN_RE.finditer(question)][:len(_EXAMPLE_NUMBERS) - 1]
    if not words:
        return None
    symbol = dict(_SPOKEN)
    spoken = " ".join(f"{n} {w}" for n, w in zip(_EXAMPLE_NUMBERS, words)) + f" {_EXAMPLE_NUMBERS[len(words)]}"
    written = " ".join(f"{n} {symbol[w]}" for n, w in zip(_EXAMPLE_NUMBERS, words)) + f" {_EXAMPLE_NUMBERS[len(words)]}"
    return f"What is {spoken}?", [f"calculator({json.dumps({'expression': written})})"]


def tool_examples(tools: Iterable[Tool], question: str = "", *, lookups: int | None = None) -> str:
    """Worked plans built from the registered tools (not fixed content a model could copy).

    With a lookup tool (one argument its docstring grounds in the question) and a calculator: the
    worked question closest in wording to `question` (a sum, a difference either way round, a ratio,
    an average or a single lookup), over as many letter names as it needs (the question's count for
    sums), the names as letters (the grammar only lets the question's own names through); with no
    close one, a sum and a difference. Otherwise a plan shape: one call per tool with placeholder
    values (a lookup only when the question names something), and a calculator combining earlier
    results, or computing the question's arithmetic, when there is one. `lookups`: how many names
    the question has (default: counted in `question`)."""
    tools = list(tools)
    lookups = len(question_phrases(question)) if lookups is None else lookups
    calc = next((t for t in tools if t.name == "calculator"), None)
    lookup = next(((t, p[0]) for t in tools if t is not calc and len(p := grounded_params(t)) == 1), None)
    if calc is not None and lookup is not None and lookups > 0:
        t, param = lookup
        subject = re.sub(r"^(?:get|fetch|find|lookup|look_up|search|query)_", "", t.name).replace("_", " ")
        many = max(2, min(lookups, 6))

        def worked(shape: int) -> str:
            text, n, op = _SHAPES[shape]
            names = [chr(ord("A") + i) for i in range(n or many)]
            together = f"{', '.join(names[:-1])} and {names[-1]}" if len(names) > 1 else names[0]
            calls = [f"{t.name}({json.dumps({**_placeholders(t), param: x}, ensure_ascii=False)})" for x in names]
            if op is not None:
                calls.append(f"calculator({json.dumps({'expression': _expression(op, len(names))})})")
            return _worked(text.format(s=subject, names=together), calls)

        closest = _closest_shapes(question, subject, lookups)
        if closest:
            return worked(closest[0])
        if lookups == 1:
            return worked(next(i for i, x in enumerate(_SHAPES) if x[1] == 1 and x[2] is None))
        return "\n\n".join([worked(0), worked(next(i for i, x in enumerate(_SHAPES) if x[2] == "$1 - $2"))])
    if calc is not None and not lookups and (spoken := _spoken_arithmetic(question)):
        return _worked(*spoken)
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
    elif not parallel_only and (shape := tool_examples(tools, question)):
        rules = rules[:rules.index("Example:")] + ("Examples:\n" if "Question:" in shape else "Example:\n") + shape
    parts = [f"Tools:\n{tool_catalogue(tools)}", rules]
    if obs := _observations(state):
        parts.append(obs)
    parts.extend(notes)
    parts.append(f"Question: {question}\nPlan (number tasks from {first_id}):")
    return "\n\n".join(parts)


def answer_ref(state: ExecutionState) -> int | None:
    """The result most likely to answer the question: the last successful task that combines earlier
    results (depends on them) and that no later task consumed, else the last successful task."""
    ok = [tid for tid, r in sorted(state.results.items()) if r.ok]
    consumed = {d for t in state.tasks.values() for d in t.deps}
    combined = [tid for tid in ok if state.tasks[tid].deps and tid not in consumed] if ok else []
    return (combined or ok or [None])[-1]


def joiner_prompt(question: str, state: ExecutionState, *, allow_replan: bool, notes: Iterable[str] = ()) -> str:
    parts = [f"Question: {question}", _observations(state) or "No tool results.", *notes]
    ref = answer_ref(state)
    # by reference: the runtime writes the value, the model need not copy it; the answer comes first,
    # since a small model tends to take the first action it reads
    finish = (f"If the results answer the question, write Finish(${ref}): it answers with the result of task {ref}."
              if ref is not None else "Finish with the answer to the question.")
    if allow_replan:
        finish += " Only if a result the question needs is missing, write Replan and, in parentheses, name it."
    parts.append(finish)
    return "\n\n".join(parts)


def react_prompt(question: str, tools: Iterable[Tool], state: ExecutionState, *, step_id: int) -> str:
    return "\n\n".join(p for p in (
        f"Tools:\n{tool_catalogue(tools)}",
        "Call one tool per step as `N. tool_name({\"arg\": value})` (use $N to reuse an earlier result), "
        "or answer: Finish($N) answers with the result of step N, Finish(text) with text.",
        _observations(state),
        f"Question: {question}\nStep {step_id}:",
    ) if p)
