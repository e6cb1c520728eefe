"""Streaming plan parser: feed the planner's text as it is decoded, get each task the moment its
line completes (LLMCompiler's "Task Fetching Unit" without its regex-over-the-whole-text rescans).

Lines are parsed with `plan.lark`; the parser checks numbering, tool names and that references
point only to earlier tasks, raising PlanError with the offending line otherwise.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterable, AsyncIterator, Collection, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

import lark
import pydantic

from agentrt.errors import PlanError
from agentrt.planner._task import Ref, Task, Template, iter_refs, parse_ref, split_template
from agentrt.tools import Tool

__all__ = ["PlanParser", "Plan", "parse_plan", "stream_tasks", "plan_lark", "validate_task"]

log = logging.getLogger(__name__)


def plan_lark() -> str:
    """The text of the plan language's Lark grammar (planner/plan.lark)."""
    return resources.files("agentrt.planner").joinpath("plan.lark").read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def _lark() -> lark.Lark:
    return lark.Lark(plan_lark(), start=["plan", "line"], parser="lalr", maybe_placeholders=False)


class _ToValues(lark.Transformer):
    def string(self, items: list[lark.Token]) -> Any:
        return split_template(str(items[0])[1:-1])

    def number(self, items: list[lark.Token]) -> Any:
        return json.loads(items[0])

    def ref(self, items: list[lark.Token]) -> Any:
        return parse_ref(str(items[0]))

    def true(self, _: list[Any]) -> bool:
        return True

    def false(self, _: list[Any]) -> bool:
        return False

    def null(self, _: list[Any]) -> None:
        return None

    def object(self, items: list[Any]) -> dict[str, Any]:
        return dict(items)

    def pair(self, items: list[Any]) -> tuple[str, Any]:
        return json.loads(items[0]), items[1]

    def array(self, items: list[Any]) -> list[Any]:
        return list(items)


@dataclass
class Plan:
    tasks: list[Task] = field(default_factory=list)
    thoughts: list[str] = field(default_factory=list)
    joined: bool = False


class PlanParser:
    """Incremental parser. `feed(chunk)` returns the tasks whose lines completed; `close()` the rest.

    Args:
        first_id: the number the first task must carry (after a replan, numbering continues).
        known_ids: ids of tasks from earlier rounds that references may point to.
        tools: if given, the tool names a task may call.
        refs_within_plan: False forbids references between tasks of this plan (DTA rounds).
    """

    def __init__(
        self,
        *,
        first_id: int = 1,
        known_ids: Iterable[int] = (),
        tools: Collection[str] | None = None,
        refs_within_plan: bool = True,
    ) -> None:
        self.next_id = first_id
        self.known_ids = set(known_ids)
        self.tools = tools
        self.refs_within_plan = refs_within_plan
        self.plan = Plan()
        self._buf: list[str] = []
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._thought: bool | None = None  # is the current line a Thought line (None: not known yet)
        self._pending_thought: str | None = None

    @property
    def joined(self) -> bool:
        return self.plan.joined

    def feed(self, chunk: str) -> list[Task]:
        out: list[Task] = []
        for ch in chunk:
            if ch in '"\\(){}[]\n' and self._thought is None:
                # decided at the first structural character: thought text may hold anything
                self._thought = "".join(self._buf).lstrip().startswith("Thought:")
            if self._thought:
                pass
            elif self._in_string:
                if self._escape:
                    self._escape = False
                elif ch == "\\":
                    self._escape = True
                elif ch == '"':
                    self._in_string = False
                elif ch == "\n":  # JSON strings cannot hold raw newlines: the line is over (and invalid)
                    self._in_string = False
                    self._depth = 0
            elif ch == '"':
                self._in_string = True
            elif ch in "({[":
                self._depth += 1
            elif ch in ")}]":
                self._depth -= 1
            if ch == "\n" and (self._thought or (self._depth <= 0 and not self._in_string)):
                task = self._line("".join(self._buf))
                self._buf.clear()
                self._depth, self._thought = 0, None
                if task is not None:
                    out.append(task)
            else:
                self._buf.append(ch)
        return out

    def close(self) -> list[Task]:
        """End of text: parse what remains (a final line needs no newline)."""
        task = self._line("".join(self._buf))
        self._buf.clear()
        return [task] if task is not None else []

    def _line(self, text: str) -> Task | None:
        line = text.strip()
        if not line:
            return None
        if self.plan.joined:
            raise PlanError("nothing may follow join()", line)
        try:
            # an item may span lines (pretty-printed JSON); raw newlines cannot occur inside JSON strings
            tree = _lark().parse(line.replace("\r", " ").replace("\n", " "), start="line")
        except lark.exceptions.LarkError as e:
            raise PlanError(f"not a plan line ({type(e).__name__}: {str(e).splitlines()[0]})", line) from e
        if not tree.children:
            return None
        item = tree.children[0]
        if item.data == "thought":
            thought = str(item.children[0])[len("Thought:"):].strip()
            self.plan.thoughts.append(thought)
            self._pending_thought = thought
            return None
        if item.data == "join":
            if item.children and int(item.children[0]) != self.next_id:
                raise PlanError(f"join() is numbered {item.children[0]}, expected {self.next_id}", line)
            self.plan.joined = True
            return None
        return self._task(item, line)

    def _task(self, item: lark.Tree, line: str) -> Task:
        tid, name = int(item.children[0]), str(item.children[1])
        if tid != self.next_id:
            raise PlanError(f"task is numbered {tid}, expected {self.next_id} (tasks are numbered consecutively)", line)
        if self.tools is not None and name not in self.tools:
            raise PlanError(f"unknown tool {name!r}; available: {', '.join(sorted(self.tools)) or '(none)'}", line)
        try:
            args = _ToValues().transform(item.children[2]) if len(item.children) > 2 else {}
        except lark.exceptions.VisitError as e:
            raise PlanError(f"bad argument value ({e.orig_exc})", line) from e
        allowed = set(self.known_ids)
        if self.refs_within_plan:
            allowed.update(t.id for t in self.plan.tasks)
        for ref in iter_refs(args):
            if ref.task >= tid:
                raise PlanError(f"task {tid} refers to ${ref.task}: references may only point to earlier tasks", line)
            if ref.task not in allowed:
                where = "an unknown task" if self.refs_within_plan else "a task of this round (not allowed here)"
                raise PlanError(f"task {tid} refers to ${ref.task}, {where}", line)
        task = Task(id=tid, tool=name, args=args, thought=self._pending_thought, line=line)
        self._pending_thought = None
        self.plan.tasks.append(task)
        self.next_id += 1
        return task


def parse_plan(text: str, **options: Any) -> Plan:
    """Parse a whole plan (options as for PlanParser)."""
    parser = PlanParser(**options)
    parser.feed(text)
    parser.close()
    return parser.plan


async def stream_tasks(chunks: AsyncIterable[str], parser: PlanParser) -> AsyncIterator[Task]:
    """Yield tasks from streamed text as soon as each line completes; stops reading after join()."""
    async for chunk in chunks:
        for task in parser.feed(chunk):
            yield task
        if parser.joined:
            break
    for task in parser.close():
        yield task


def _placeholders(value: Any, loc: tuple[Any, ...], refs: list[tuple[Any, ...]]) -> Any:
    if isinstance(value, Ref):
        refs.append(loc)
        return None
    if isinstance(value, Template):  # a string, but its length is known only at run time
        refs.append(loc)
        return "".join(p for p in value.parts if isinstance(p, str))
    if isinstance(value, dict):
        return {k: _placeholders(v, (*loc, k), refs) for k, v in value.items()}
    if isinstance(value, list):
        return [_placeholders(v, (*loc, i), refs) for i, v in enumerate(value)]
    return value


def validate_task(task: Task, tool: Tool) -> list[str]:
    """Static check of a task's arguments against the tool's schema; positions holding references or
    interpolated strings are not checked (their values exist only at run time). Returns the problems
    found ([] = valid)."""
    refs: list[tuple[Any, ...]] = []
    args = _placeholders(task.args, (), refs)
    try:
        tool.validate(args)
    except pydantic.ValidationError as e:
        return [
            f"{'.'.join(map(str, err['loc'])) or '(arguments)'}: {err['msg']}"
            for err in e.errors(include_url=False)
            if err["type"] == "extra_forbidden" or not any(err["loc"][: len(r)] == r for r in refs)
        ]
    return []
