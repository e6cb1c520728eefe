"""Per-task execution trace, exportable as Chrome trace-event JSON (open in Perfetto or chrome://tracing).

LLMCompiler reports only end-to-end latency; a trace shows where a plan actually waited.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Trace", "TaskSpan"]


@dataclass
class TaskSpan:
    """One task's life: queued (dependencies met) -> start (tool running) -> end. Times in seconds."""

    task_id: int
    tool: str
    queued: float
    start: float | None = None
    end: float | None = None
    args: Any = None
    status: str = "pending"
    result_bytes: int = 0
    error: str | None = None
    attempts: int = 0

    @property
    def duration(self) -> float:
        return (self.end or 0.0) - (self.start or 0.0) if self.start is not None else 0.0


@dataclass
class Trace:
    origin: float = field(default_factory=time.perf_counter)
    spans: dict[int, TaskSpan] = field(default_factory=dict)
    events: list[tuple[str, float]] = field(default_factory=list)
    # called as listener(kind, span) with kind "task" (parsed), "start" (tool running), "end";
    # on the executor's event loop, so a listener must not block
    listeners: list[Callable[[str, TaskSpan], None]] = field(default_factory=list)

    def notify(self, kind: str, span: TaskSpan) -> None:
        for listener in self.listeners:
            listener(kind, span)

    def now(self) -> float:
        return time.perf_counter() - self.origin

    def mark(self, name: str) -> None:
        """An instant event (plan started, plan finished, joiner decided, ...)."""
        self.events.append((name, self.now()))

    def span(self, task_id: int, tool: str) -> TaskSpan:
        s = self.spans[task_id] = TaskSpan(task_id, tool, queued=self.now())
        return s

    def makespan(self) -> float:
        ends = [s.end for s in self.spans.values() if s.end is not None]
        return max(ends) - min(s.queued for s in self.spans.values()) if ends else 0.0

    def to_chrome(self) -> dict[str, Any]:
        """Chrome trace-event JSON: one complete ("X") event per task, lanes chosen so spans never overlap."""
        events: list[dict[str, Any]] = []
        lanes: list[float] = []  # end time of the last span in each lane
        for s in sorted(self.spans.values(), key=lambda s: (s.start if s.start is not None else s.queued)):
            begin = s.start if s.start is not None else s.queued
            end = s.end if s.end is not None else begin
            lane = next((i for i, free in enumerate(lanes) if free <= begin), len(lanes))
            if lane == len(lanes):
                lanes.append(end)
            lanes[lane] = end
            events.append({
                "name": f"${s.task_id} {s.tool}", "cat": s.status, "ph": "X", "pid": 1, "tid": lane + 1,
                "ts": round(begin * 1e6, 3), "dur": round((end - begin) * 1e6, 3),
                "args": {"task": s.task_id, "args": _jsonable(s.args), "status": s.status,
                         "result_bytes": s.result_bytes, "error": s.error, "attempts": s.attempts,
                         "queued_us": round(s.queued * 1e6, 3)},
            })
        for name, t in self.events:
            events.append({"name": name, "ph": "i", "s": "g", "pid": 1, "tid": 0, "ts": round(t * 1e6, 3)})
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def write_chrome(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_chrome()), encoding="utf-8")


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return str(value)
