"""How the terminal draws a plan run (`agentrt chat` in plan modes, `agentrt demo`): the plan as it is
decoded and its tasks as they start and end, built from the agent's events alone."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Group, RenderableType
from rich.markup import escape
from rich.panel import Panel
from rich.spinner import Spinner
from rich.table import Table

from agentrt.events import AgentEvent, PlanDelta, TaskPlanned, ToolEnd, ToolStart

__all__ = ["PlanBoard", "plan_view", "clip"]


@dataclass
class BoardTask:
    id: str
    tool: str
    args: Any
    deps: list[str]
    resolved: Any = None  # the arguments it ran with (references filled in)
    start: float | None = None  # seconds since the board began
    seconds: float | None = None
    ok: bool | None = None
    observation: str = ""


@dataclass
class PlanBoard:
    """A plan run as its events tell it: each model call's decoded text and each task's state and times."""

    texts: dict[int, list[str]] = field(default_factory=dict)  # model call -> its text pieces
    tasks: dict[str, BoardTask] = field(default_factory=dict)
    origin: float = field(default_factory=time.perf_counter)

    def add(self, ev: AgentEvent) -> None:
        if isinstance(ev, PlanDelta):
            self.texts.setdefault(ev.call, []).append(ev.text)
        elif isinstance(ev, TaskPlanned):
            self.tasks[ev.call_id] = BoardTask(ev.call_id, ev.name, ev.arguments, ev.deps)
        elif isinstance(ev, ToolStart) and ev.call_id in self.tasks:
            t = self.tasks[ev.call_id]
            t.start, t.resolved = time.perf_counter() - self.origin, ev.arguments
        elif isinstance(ev, ToolEnd) and ev.call_id in self.tasks:
            t = self.tasks[ev.call_id]
            t.ok, t.observation = ev.ok, ev.observation
            t.seconds = ev.seconds if ev.seconds is not None else (
                time.perf_counter() - self.origin - (t.start or 0.0))

    def text(self, call: int | None = None) -> str:
        """The text of model call `call` (None: the latest)."""
        if not self.texts:
            return ""
        return "".join(self.texts.get(max(self.texts) if call is None else call, []))

    def tool_seconds(self) -> tuple[float, float]:
        """(wall time from the first tool start to the last tool end, the sum of the tools' times)."""
        done = [t for t in self.tasks.values() if t.start is not None and t.seconds is not None]
        if not done:
            return 0.0, 0.0
        wall = max(t.start + t.seconds for t in done) - min(t.start for t in done)
        return wall, sum(t.seconds for t in done)


def plan_view(board: PlanBoard, call: int | None = None) -> RenderableType:
    """The plan being decoded (model call `call`, None: the latest) and its tasks (status, start, duration)."""
    table = Table(title="tasks (run as soon as their line is parsed)", expand=True)
    for col in ("#", "call", "deps", "status", "start s", "time s"):
        table.add_column(col)
    for t in sorted(board.tasks.values(), key=lambda t: (len(t.id), t.id)):
        if t.ok is not None:
            status = ("[green]ok[/] " if t.ok else "[red]error[/] ") + escape(clip(t.observation, 40))
        elif t.start is not None:
            status = Spinner("dots", text="running")
        else:
            status = "waiting"
        args = json.dumps(t.args, ensure_ascii=False)
        start = f"{t.start:.2f}" if t.start is not None else ""
        took = f"{t.seconds:.2f}" if t.seconds is not None else ""
        table.add_row(t.id, escape(f"{t.tool}({args})"), ",".join(t.deps) or "-", status, start, took)
    elapsed = time.perf_counter() - board.origin
    plan = Panel(escape(board.text(call)) or "…", title=f"plan being decoded ({elapsed:.1f}s)")
    return Group(plan, table)


def clip(text: str, n: int = 200) -> str:
    """`text` on one line, at most `n` characters (an ellipsis marks a cut)."""
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 1] + "…"
