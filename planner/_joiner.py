"""The joiner's output language (LLMCompiler's joiner): `Finish(answer)` or `Replan(reason)`,
optionally after a `Thought:` line. Decoded under `joiner_grammar()`, parsed here."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from agentrt.errors import PlanError

__all__ = ["JoinerDecision", "parse_joiner"]

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
