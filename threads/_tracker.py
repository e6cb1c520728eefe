"""Follows a reasoning tree (thread mode's `{"reasoning": [Task], "answer": ...}`) as it is decoded, byte by
byte, and reports where its parts open and close: the events thread mode pauses for tools and prunes on.

The input is any JSON text of the tree (the grammar guarantees it is well formed; whitespace is skipped).
Offsets are byte offsets into the UTF-8 stream, so a caller feeding token bytes can map them to tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = ["StructureTracker", "TreeEvent", "EVENT_KINDS"]

EVENT_KINDS = (
    "task",  # a task object opened; `path` is its index path, e.g. (0, 2) = reasoning[0].subtasks[2]
    "thought",  # its thought is complete: data = the text
    "tool_call",  # tooluse.parameters complete: data = {"tool_name", "arguments"}
    "tool_result",  # tooluse.tool_result complete: data = the value
    "subtasks_open",  # its subtask list opened: offset = first byte inside the list
    "subtasks_close",  # the list closed: offset = the "]"; data = (first byte inside, "]" offset)
    "conclusion_start",  # its conclusion opened: data = the closed subtask list's span, or None
    "conclusion",  # its conclusion is complete: data = the text
    "task_end",  # the task object closed
    "answer_start",  # the answer value began
    "answer",  # the answer is complete: data = the value
    "end",  # the tree closed
)


@dataclass
class TreeEvent:
    kind: str
    offset: int  # byte offset of the byte that triggered the event
    path: tuple[int, ...] = ()
    data: Any = None

    @property
    def depth(self) -> int:
        return len(self.path)


@dataclass
class _Frame:
    kind: str  # "{" or "["
    role: str  # root | tasks | task | tooluse | opaque
    start: int
    path: tuple[int, ...] = ()
    key: str | None = None  # objects: the key whose value comes next
    count: int = 0  # arrays: items so far
    tool_name: str | None = None  # tooluse objects
    subtasks: tuple[int, int] | None = None  # task objects: the closed subtask list's span


@dataclass
class _Value:
    """A scalar or string value being read: where it began and what it is for."""

    start: int
    role: str  # key | text | opaque
    parent: _Frame | None


class StructureTracker:
    """Feed bytes (or text) of a tree as it streams; `feed` returns the events those bytes completed."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self._stack: list[_Frame] = []
        self._value: _Value | None = None  # a string or scalar in progress
        self._escape = False
        self.finished = False

    @property
    def offset(self) -> int:
        return len(self.buffer)

    def feed(self, data: bytes | str) -> list[TreeEvent]:
        if isinstance(data, str):
            data = data.encode()
        events: list[TreeEvent] = []
        for b in data:
            self._byte(b, events)
        return events

    # --- the scanner ---------------------------------------------------------------------------------
    def _byte(self, b: int, events: list[TreeEvent]) -> None:
        pos = len(self.buffer)
        self.buffer.append(b)
        v = self._value
        if v is not None:
            if self._escape:
                self._escape = False
                return
            if self._in_string():
                if b == 0x5C:  # backslash
                    self._escape = True
                elif b == 0x22 and pos > v.start:  # the closing quote
                    self._value = None
                    self._string_done(v, pos, events)
                return
            if b not in b",}] \t\r\n":  # a number or literal goes on
                return
            self._value = None
            self._scalar_done(v, pos, events)
        if b in b" \t\r\n:":
            return
        top = self._stack[-1] if self._stack else None
        if b == 0x2C:  # ,
            if top is not None and top.kind == "{":
                top.key = None
            return
        if b in b"}]":
            self._close(pos, events)
            return
        if top is not None and top.kind == "{" and top.key is None:  # a key starts
            self._value = _Value(pos, "key", top)
            return
        self._open_value(b, pos, top, events)

    def _in_string(self) -> bool:
        return self.buffer[self._value.start] == 0x22

    def _open_value(self, b: int, pos: int, parent: _Frame | None, events: list[TreeEvent]) -> None:
        role = _role_of(parent)
        if parent is not None and parent.kind == "[":
            parent.count += 1
        if b in b"{[":
            path = parent.path if parent is not None else ()
            if role == "task":
                path = path + (parent.count - 1,)
                events.append(TreeEvent("task", pos, path))
            elif role == "tasks" and parent is not None and parent.role == "task":
                events.append(TreeEvent("subtasks_open", pos + 1, path))
            self._stack.append(_Frame(chr(b), role, pos, path))
            if role == "answer":
                events.append(TreeEvent("answer_start", pos, ()))
            return
        if role == "answer":
            events.append(TreeEvent("answer_start", pos, ()))
        elif role == "text" and parent is not None and parent.key == "conclusion":
            events.append(TreeEvent("conclusion_start", pos, parent.path, parent.subtasks))
        self._value = _Value(pos, role, parent)

    def _close(self, pos: int, events: list[TreeEvent]) -> None:
        frame = self._stack.pop()
        parent = self._stack[-1] if self._stack else None
        if frame.role == "tasks" and parent is not None and parent.role == "task":
            parent.subtasks = (frame.start + 1, pos)
            events.append(TreeEvent("subtasks_close", pos, parent.path, parent.subtasks))
        elif frame.role == "task":
            events.append(TreeEvent("task_end", pos, frame.path))
        elif frame.role == "root":
            self.finished = True
            events.append(TreeEvent("end", pos))
        self._done(frame.role, frame.start, pos + 1, parent, events)

    def _string_done(self, v: _Value, pos: int, events: list[TreeEvent]) -> None:
        if v.role == "key":
            v.parent.key = json.loads(self.buffer[v.start:pos + 1])
            return
        self._done(v.role, v.start, pos + 1, v.parent, events)

    def _scalar_done(self, v: _Value, end: int, events: list[TreeEvent]) -> None:
        self._done(v.role, v.start, end, v.parent, events)

    def _done(self, role: str, start: int, end: int, parent: _Frame | None, events: list[TreeEvent]) -> None:
        """A value at `parent[parent.key]` spanning bytes [start, end) is complete."""
        if parent is None or parent.kind != "{":
            return
        key = parent.key
        if parent.role == "task" and key in ("thought", "conclusion"):
            events.append(TreeEvent(key, end - 1, parent.path, self._json(start, end)))
        elif parent.role == "tooluse" and key == "tool_name":
            parent.tool_name = self._json(start, end)
        elif parent.role == "tooluse" and key == "parameters":
            owner = self._stack[-2] if len(self._stack) >= 2 else None
            events.append(TreeEvent("tool_call", end - 1, owner.path if owner else (),
                                    {"tool_name": parent.tool_name, "arguments": self._json(start, end)}))
        elif parent.role == "tooluse" and key == "tool_result":
            owner = self._stack[-2] if len(self._stack) >= 2 else None
            path = owner.path if owner else ()
            events.append(TreeEvent("tool_result", end - 1, path, self._json(start, end)))
        elif parent.role == "root" and key == "answer":
            events.append(TreeEvent("answer", end - 1, (), self._json(start, end)))

    def _json(self, start: int, end: int) -> Any:
        return json.loads(self.buffer[start:end])

    def text(self) -> str:
        return self.buffer.decode(errors="replace")


def _role_of(parent: _Frame | None) -> str:
    """What a value placed in `parent` (at its current key or next index) is for."""
    if parent is None:
        return "root"
    if parent.role == "opaque":
        return "opaque"
    if parent.kind == "[":
        return "task" if parent.role == "tasks" else "opaque"
    key = parent.key
    if parent.role == "root":
        return {"reasoning": "tasks", "answer": "answer"}.get(key, "opaque")
    if parent.role == "task":
        roles = {"thought": "text", "conclusion": "text", "tooluse": "tooluse", "subtasks": "tasks"}
        return roles.get(key, "opaque")
    return "opaque"  # inside tooluse: tool_name, parameters, tool_result
