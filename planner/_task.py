"""Plan items as data: tasks, references between them, and reference resolution.

A reference `$N.items[0]` (LLMCompiler's `$N` placeholders, extended with paths) names a value
inside an earlier task's structured result; resolving it yields that value, not its text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Ref", "Template", "Task", "ReferenceResolutionError", "resolve", "iter_refs", "parse_ref"]

REF_RE = re.compile(r"\$([0-9]+)((?:\.[A-Za-z_][A-Za-z0-9_]*|\[[0-9]+\])*)")
_SEG_RE = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[([0-9]+)\]")


class ReferenceResolutionError(LookupError):
    pass


@dataclass(frozen=True)
class Ref:
    """`$task.path`: the value at `path` (keys and indices) inside task `task`'s result."""

    task: int
    path: tuple[str | int, ...] = ()

    def __str__(self) -> str:
        return f"${self.task}" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in self.path)


@dataclass(frozen=True)
class Template:
    """A string with references interpolated as text: "population of $1" ."""

    parts: tuple[str | Ref, ...]

    def __str__(self) -> str:
        return "".join(str(p) for p in self.parts)


def parse_ref(text: str) -> Ref | None:
    """`$3.a[0]` -> Ref(3, ("a", 0)); None if `text` is not exactly one reference."""
    m = REF_RE.fullmatch(text)
    if not m:
        return None
    path = tuple(key if key else int(idx) for key, idx in _SEG_RE.findall(m.group(2)))
    return Ref(int(m.group(1)), path)


def split_template(raw: str) -> str | Ref | Template:
    """A JSON string's raw inner text (escapes not yet decoded): a whole reference, a template with
    references, or plain text. References are found in the raw text, so an escaped `\\u0024` is
    never mistaken for one."""
    ref = parse_ref(raw)
    if ref is not None:
        return ref
    parts: list[str | Ref] = []
    pos = 0
    for m in REF_RE.finditer(raw):
        if m.end() < len(raw) and raw[m.end()].isdigit():
            continue
        if m.start() > pos:
            parts.append(_decode(raw[pos : m.start()]))
        parts.append(parse_ref(m.group(0)))  # type: ignore[arg-type]
        pos = m.end()
    if not parts:
        return _decode(raw)
    if pos < len(raw):
        parts.append(_decode(raw[pos:]))
    return Template(tuple(parts))


def _decode(raw: str) -> str:
    return json.loads(f'"{raw}"')


def iter_refs(value: Any) -> Iterator[Ref]:
    """Every reference inside a parsed argument value."""
    if isinstance(value, Ref):
        yield value
    elif isinstance(value, Template):
        yield from (p for p in value.parts if isinstance(p, Ref))
    elif isinstance(value, dict):
        for v in value.values():
            yield from iter_refs(v)
    elif isinstance(value, list):
        for v in value:
            yield from iter_refs(v)


@dataclass
class Task:
    """One numbered plan item: call `tool` with `args` (which may hold Refs) once `deps` are done."""

    id: int
    tool: str
    args: dict[str, Any]
    deps: frozenset[int] = frozenset()
    thought: str | None = None
    line: str = ""

    def __post_init__(self) -> None:
        if not self.deps:
            self.deps = frozenset(r.task for r in iter_refs(self.args))

    def to_json(self) -> dict[str, Any]:
        """A JSON-able view (references written as "$N.path" strings), e.g. for an HTTP response."""
        return {"id": self.id, "tool": self.tool, "args": _render(self.args), "deps": sorted(self.deps),
                "thought": self.thought}


def _render(value: Any) -> Any:
    if isinstance(value, (Ref, Template)):
        return str(value)
    if isinstance(value, dict):
        return {k: _render(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_render(v) for v in value]
    return value


def _walk(value: Any, ref: Ref) -> Any:
    for seg in ref.path:
        if isinstance(seg, int):
            if not isinstance(value, list) or not -len(value) <= seg < len(value):
                size = len(value) if isinstance(value, list) else type(value).__name__
                raise ReferenceResolutionError(f"{ref}: index [{seg}] out of range (value is {size})")
            value = value[seg]
        else:
            if not isinstance(value, dict) or seg not in value:
                keys = ", ".join(map(str, value)) if isinstance(value, dict) else type(value).__name__
                raise ReferenceResolutionError(f"{ref}: no key {seg!r} (available: {keys})")
            value = value[seg]
    return value


def resolve(value: Any, results: Mapping[int, Any]) -> Any:
    """Replace references in `value` with the structured results they point to."""
    if isinstance(value, Ref):
        if value.task not in results:
            raise ReferenceResolutionError(f"{value}: task {value.task} has no result")
        return _walk(results[value.task], value)
    if isinstance(value, Template):
        out = []
        for p in value.parts:
            v = resolve(p, results) if isinstance(p, Ref) else p
            out.append(v if isinstance(v, str) else json.dumps(v, ensure_ascii=False))
        return "".join(out)
    if isinstance(value, dict):
        return {k: resolve(v, results) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, results) for v in value]
    return value
