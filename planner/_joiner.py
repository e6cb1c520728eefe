"""The joiner's output language (LLMCompiler's joiner): `Finish(answer)` or `Replan(reason)`,
optionally after a `Thought:` line. Decoded under `joiner_grammar()`, parsed here. An answer may
name a task's result by reference (`Finish($3)`, `Finish(The total is $3.)`): `resolve_answer`
puts the value in, so a right calculation is a right answer without the model copying its digits."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from agentrt.errors import PlanError
from agentrt.planner._task import REF_RE, ReferenceResolutionError, parse_ref, resolve
from agentrt.tools import evaluate

__all__ = ["JoinerDecision", "parse_joiner", "resolve_answer"]

_ACTION_RE = re.compile(r"(Finish|Replan)\((.*)\)\s*\Z", re.DOTALL)


@dataclass(frozen=True)
class JoinerDecision:
    action: Literal["finish", "replan"]
    text: str
    thought: str | None = None


def parse_joiner(text: str) -> JoinerDecision:
    """Parse `[Thought: ...\\n]Finish(answer)` / `Replan(reason)`; raises PlanError otherwise."""
    body = text.strip()
    thought = None
    if body.startswith("Thought:"):
        first, _, body = body.partition("\n")
        thought = first[len("Thought:"):].strip()
        body = body.strip()
    m = _ACTION_RE.match(body)
    if not m:
        raise PlanError("the joiner must answer Finish(answer) or Replan(reason)", body[:200])
    return JoinerDecision("finish" if m.group(1) == "Finish" else "replan", m.group(2).strip(), thought)


def resolve_answer(text: str, values: Mapping[int, Any]) -> str:
    """`text` with each `$N` / `$N.path` that names a result in `values` replaced by that value (a
    string as it is, anything else as JSON); a reference to no result stays as written. An answer
    that is then arithmetic over numbers (`$1 - $2`, `(3 + 4) * 2`) is its value."""

    def one(m: re.Match[str]) -> str:
        if m.end() < len(m.string) and m.string[m.end()].isdigit():
            return m.group(0)
        ref = parse_ref(m.group(0))
        try:
            value = resolve(ref, values)
        except ReferenceResolutionError:
            return m.group(0)
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)

    resolved = REF_RE.sub(one, text)
    if _ARITHMETIC.fullmatch(resolved.strip()):  # `Finish($1 - $2)`: arithmetic over results is worked out
        try:
            return json.dumps(evaluate(resolved.strip()))
        except (ValueError, ArithmeticError):
            pass
    return resolved


# numbers joined by operators with spaces around them ("2 + 3", "($1 - $2) / 2"): a date (2024-01-05)
# or a phone number (555-1234) is not one
_NUM = r"\(*\s*-?\d+(?:\.\d+)?\s*\)*"
_ARITHMETIC = re.compile(rf"{_NUM}(?:\s+[-+*/]\s+{_NUM})+")
