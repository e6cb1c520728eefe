"""What an agent run streams (`Agent.stream`) and returns, and the one wire form the server's
`/v1/agent/runs` sends them in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

__all__ = ["TextDelta", "PlanDelta", "TaskPlanned", "ToolStart", "ToolEnd", "RunResult", "Final", "AgentEvent",
           "wire_event"]

T = TypeVar("T")


@dataclass
class TextDelta:
    text: str


@dataclass
class PlanDelta:
    """Plan, dta and react modes: the planner's (or joiner's) text as it is decoded."""

    text: str
    call: int = 0  # which model call of the run it comes from (the plan, its joiner, a replan, ...)


@dataclass
class TaskPlanned:
    """Plan, dta and react modes: a task parsed from the plan (it starts once its inputs exist)."""

    call_id: str  # the task's number in the plan
    name: str
    arguments: Any
    deps: list[str] = field(default_factory=list)  # the tasks whose results it takes


@dataclass
class ToolStart:
    call_id: str
    name: str
    arguments: dict


@dataclass
class ToolEnd:
    call_id: str
    name: str
    ok: bool
    observation: str
    value: Any = None
    seconds: float | None = None  # the tool's run time, where it was measured (plan modes)


@dataclass
class RunResult(Generic[T]):
    output: T
    text: str  # the final answer as the model wrote it
    mode: str
    tool_calls: list[ToolEnd] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    steps: int = 0
    tree: dict | None = None  # thread mode: the whole reasoning tree
    notes: list[str] = field(default_factory=list)  # what the backend could not do (e.g. no KV pruning)
    stats: dict[str, Any] = field(default_factory=dict)  # hogwild: workers' texts, tokens, finish reason


@dataclass
class Final:
    result: RunResult


AgentEvent = TextDelta | PlanDelta | TaskPlanned | ToolStart | ToolEnd | Final


def wire_event(ev: AgentEvent, observation_chars: int = 1000) -> dict[str, Any] | None:
    """The JSON object an event travels as over SSE (None: an event the wire does not carry)."""
    if isinstance(ev, TaskPlanned):
        return {"type": "task", "id": _task_id(ev.call_id), "tool": ev.name, "args": ev.arguments,
                "deps": [_task_id(d) for d in ev.deps]}
    if isinstance(ev, ToolStart):
        return {"type": "tool_start", "id": _task_id(ev.call_id), "tool": ev.name}
    if isinstance(ev, ToolEnd):
        out = {"type": "tool_end", "id": _task_id(ev.call_id), "tool": ev.name, "ok": ev.ok,
               "observation": ev.observation[:observation_chars]}
        if ev.seconds is not None:
            out["seconds"] = ev.seconds
        return out
    if isinstance(ev, PlanDelta):
        return {"type": "plan_delta", "text": ev.text, "call": ev.call}
    if isinstance(ev, TextDelta):
        return {"type": "text_delta", "text": ev.text}
    if isinstance(ev, Final):
        r = ev.result
        return {"type": "final", "answer": r.text, "mode": r.mode, "rounds": r.steps, "tasks": len(r.tool_calls),
                "ok": sum(c.ok for c in r.tool_calls), "notes": r.notes, **r.stats}
    return None


def _task_id(call_id: str) -> int | str:
    return int(call_id) if call_id.isdigit() else call_id
