"""ToolRegistry: the set of tools an agent may call, by name, with per-query selection (Tool RAG)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from agentrt.errors import ToolError
from agentrt.tools._rag import ToolIndex
from agentrt.tools._tool import Tool

__all__ = ["ToolRegistry"]


class ToolRegistry:
    """Tools by name. Plain functions are wrapped with `@tool` defaults when added."""

    def __init__(self, tools: Iterable[Tool | Callable[..., Any]] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        self._index: ToolIndex | None = None
        for t in tools:
            self.add(t)

    def add(self, t: Tool | Callable[..., Any], *, replace: bool = False) -> Tool:
        t = t if isinstance(t, Tool) else Tool(t)
        if t.name in self._tools and not replace:
            raise ToolError(f"a tool named {t.name!r} is already registered; pass replace=True to override it")
        self._tools[t.name] = t
        self._index = None
        return t

    def remove(self, name: str) -> None:
        self._tools.pop(name)
        self._index = None

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def __getitem__(self, name: str) -> Tool:
        try:
            return self._tools[name]
        except KeyError:
            raise KeyError(f"no tool named {name!r}; registered: {', '.join(self._tools) or '(none)'}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[Tool]:
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def specs(self) -> list[dict[str, Any]]:
        return [t.spec() for t in self]

    def select(self, query: str, k: int = 5, min_score: float = 0.1, *, embed=None) -> ToolRegistry:
        """A registry holding only the (at most k) tools relevant to `query`: BM25, or with `embed`
        (an `Embedder`, see `sentence_embedder`) cosine similarity above `min_score`."""
        if embed is not None:
            index = ToolIndex(self._tools.values(), embed=embed)
        else:
            if self._index is None:
                self._index = ToolIndex(self._tools.values())
            index = self._index
        return ToolRegistry(st.tool for st in index.search(query, k=k, min_score=min_score))
