"""Grounding string arguments in the question: a tool parameter whose docstring says its value comes
from the question (`city: A city named in the question.`) may only be a phrase of the question under
the plan grammar, so a small model cannot copy a value from an example or invent one. A plan also
covers the question: every phrase is passed to a grounded argument, in the question's order, before
any other call or join() (`plan_grammar(cover=...)`), so a model copying a two-lookup example still
looks up all three cities a question names.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable

from agentrt.tools import Tool

__all__ = ["question_phrases", "ground_tools", "grounded_params", "uncovered_phrases"]

_GROUNDED = re.compile(r"\b(?:in|from) the (?:question|request)\b", re.IGNORECASE)
_QUOTED = re.compile(r"\"([^\"]{1,60})\"|'([^']{1,60})'")
_NAME = re.compile(r"[A-Z][\w'.-]*(?:\s+(?:of\s+|de\s+|la\s+)?[A-Z][\w'.-]*)*")
_OPENERS = {"how", "what", "which", "who", "whom", "whose", "when", "where", "why", "is", "are", "do", "does",
            "did", "can", "could", "would", "will", "please", "tell", "give", "find", "compute", "add", "take",
            "i", "you", "we", "my", "your", "our", "the", "a", "an", "and", "or", "then", "if", "by", "in", "on", "at", "for", "of", "to", "with",
            "from", "between", "compared", "after", "before", "since", "given", "using", "assuming", "suppose",
            "let", "let's", "calculate", "count", "list", "show", "name", "what's", "how's", "so", "now", "also",
            "sum", "subtract", "multiply", "divide", "together", "combined", "total"}


def question_phrases(question: str) -> list[str]:
    """The names a question mentions: quoted strings and runs of capitalised words, less a sentence's
    opening word ("How", "What", ...), in order of appearance, once each."""
    found: list[str] = [a or b for a, b in _QUOTED.findall(question)]
    for m in _NAME.finditer(question):
        words = m.group(0).rstrip(".").split()
        while words and words[0].lower() in _OPENERS:
            words = words[1:]
        if words:
            found.append(" ".join(words))
    return list(dict.fromkeys(p for p in found if p))


def grounded_params(t: Tool) -> list[str]:
    """`t`'s string parameters whose docstring says their value comes from the question."""
    props = t.parameters.get("properties", {})
    return [n for n, doc in t.param_docs.items() if _GROUNDED.search(doc) and props.get(n, {}).get("type") == "string"]


def uncovered_phrases(question: str, tools: Iterable[Tool], done: Iterable[tuple[str, dict]]) -> list[str]:
    """The question's phrases that no call in `done` ((tool name, arguments) pairs) has passed to a
    grounded parameter yet, in the question's order; empty when no tool grounds an argument."""
    grounded = {t.name: grounded_params(t) for t in tools}
    if not any(grounded.values()):
        return []
    used = {args.get(n) for name, args in done if isinstance(args, dict) for n in grounded.get(name, ())}
    return [p for p in question_phrases(question) if p not in used]


def ground_tools(tools: Iterable[Tool], question: str) -> list[Tool]:
    """`tools`, each string parameter that its docstring grounds in the question narrowed to an enum of
    the question's phrases (copies; the originals are untouched). Unchanged when the question names
    nothing."""
    phrases = question_phrases(question)
    out = []
    for t in tools:
        grounded = grounded_params(t)
        if not phrases or not grounded:
            out.append(t)
            continue
        g = copy.copy(t)
        g.parameters = copy.deepcopy(t.parameters)
        for name in grounded:
            g.parameters["properties"][name]["enum"] = phrases
        out.append(g)
    return out
